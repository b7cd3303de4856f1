"""One LoRA linear layer, forward + backward: PEFT's modules against tunelab's fused layer (train/lora_fused.py).

    python bench/lora_layer.py                 # SmolLM2-135M's shapes, 256 tokens, rank 16, bf16 autocast, one core
    python bench/lora_layer.py --tokens 512 --rank 64 --threads 2

Both run as the training loop runs them: frozen base weight in bf16, fp32 adapters, the input cast once and shared.
Prints milliseconds per call and the largest difference of the gradients (input, A, B) relative to PEFT's.
"""

from __future__ import annotations

import argparse

import torch
from timing import ms_per_call
from torch import nn

from tunelab.train.lora_fused import use_fused_lora
from tunelab.train.precision import share_input_casts, store_frozen_in

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # q/o, k/v, gate/up, down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.tokens} tokens, rank {args.rank}, bf16 autocast, {args.threads} thread(s); ms per forward + backward")
    print(f"{'in -> out':>12} | {'PEFT':>7} | {'fused':>7} | speed-up | max rel diff of gradients")
    for fan_in, fan_out in SHAPES:
        _compare(fan_in, fan_out, args.tokens, args.rank, args.repeat)


def _compare(fan_in: int, fan_out: int, tokens: int, rank: int, repeat: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(fan_in, fan_out, bias=False)),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B.default.weight.normal_(0, 0.02)
    store_frozen_in(model, torch.bfloat16)
    share_input_casts(model, torch.bfloat16)
    x = torch.randn(tokens, fan_in, requires_grad=True)
    grad = torch.randn(tokens, fan_out).bfloat16()
    trained = (x, layer.lora_A.default.weight, layer.lora_B.default.weight)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.backward(grad)

    results = []
    for fused in (False, True):
        if fused:
            use_fused_lora(model)
        for t in trained:
            t.grad = None
        step()
        grads = [t.grad.clone() for t in trained]
        results.append((ms_per_call(step, repeat, warmup=3), grads))
    (peft_ms, ref), (fused_ms, mine) = results
    diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(mine, ref))
    print(f"{fan_in:>5} -> {fan_out:<4} | {peft_ms:7.3f} | {fused_ms:7.3f} | {peft_ms / fused_ms:7.2f}x | {diff:.4f}")


if __name__ == "__main__":
    main()
