"""CPU attention: tunelab's blocked matmul attention (train/attention.py) against transformers' SDPA path, one core.

    python bench/attention.py              # SmolLM2-135M's heads (9 query, 3 key/value, dim 64), bf16
    python bench/attention.py --dtype fp32 --threads 2

Prints milliseconds per call, forward alone and forward + backward, for single unpadded rows (SDPA's causal kernel) and
padded batches (an explicit mask), and the largest difference of the outputs and gradients relative to SDPA's.
"""

from __future__ import annotations

import argparse

import torch
from timing import ms_per_call
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tunelab.train.attention import short_attention_forward

SHAPES = ((1, 128), (2, 128), (4, 128), (1, 256), (2, 256), (1, 384), (1, 512), (2, 512), (1, 768), (1, 1024), (2, 1024),
          (1, 2048))


class _Layer(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3  # SDPA's path repeats the key/value heads by this


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    heads, kv_heads, dim = 9, 3, 64
    print(f"{args.dtype}, {args.threads} thread(s), {heads}/{kv_heads} heads of {dim}; ms per call")
    print(f"{'batch x tokens':>16} {'mask':>6} | {'SDPA fwd':>9} {'fwd+bwd':>9} | {'tunelab fwd':>11} {'fwd+bwd':>9} | "
          f"{'speed-up fwd':>12} {'fwd+bwd':>8} | max rel diff")
    for batch, length in SHAPES:
        _compare(batch, length, heads, kv_heads, dim, dtype, args.repeat)


def _compare(batch: int, length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, repeat: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(batch, heads, length, dim).to(dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, length, dim).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, length, dim).to(dtype).requires_grad_()
    mask = None
    if batch > 1:  # right padding: every row after the first is 30 tokens shorter
        keep = torch.arange(length)[None] < torch.tensor([length] + [length - 30] * (batch - 1))[:, None]
        mask = (torch.ones(length, length, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]
    grad = torch.randn(batch, length, heads, dim).to(dtype)
    layer = _Layer()
    times, results = [], []
    for attend in (sdpa_attention_forward, short_attention_forward):
        def forward(attend=attend):
            with torch.no_grad():
                attend(layer, q, k, v, mask, scaling=dim**-0.5)

        def both(attend=attend):
            out, _ = attend(layer, q, k, v, mask, scaling=dim**-0.5)
            out.backward(grad)

        times.append((ms_per_call(forward, repeat), ms_per_call(both, repeat)))
        q.grad = k.grad = v.grad = None
        out, _ = attend(layer, q, k, v, mask, scaling=dim**-0.5)
        out.backward(grad)
        results.append([t.detach().float() for t in (out, q.grad, k.grad, v.grad)])
        q.grad = k.grad = v.grad = None
    diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(results[1], results[0]))
    (sf, sb), (tf, tb) = times
    print(f"{batch:>7} x {length:<6} {'yes' if mask is not None else 'no':>6} | {sf:9.2f} {sb:9.2f} | {tf:11.2f} "
          f"{tb:9.2f} | {sf / tf:11.2f}x {sb / tb:7.2f}x | {diff:.4f}", flush=True)


if __name__ == "__main__":
    main()
