"""QLoRA memory: the base model's weights in 4-bit NF4 against the same LoRA run on fp32 weights, each in its own process.

    python bench/qlora_memory.py                       # SmolLM2-135M (model: default), 2 steps, batch 2, max length 128
    python bench/qlora_memory.py --steps 4 --precision auto

Each run is `tunelab.train` on 16 Alpaca rows with LoRA r=16 alpha=32 on all linear layers (qlora: the same LoRA on the
4-bit base, double quantization, compute dtype auto), no validation, in a fresh process so peak RSS is its own.
Printed per run: bytes of the frozen base weights (parameters and buffers that do not train, each storage counted
once, measured right after the method is attached; bitsandbytes' scales included), the trainable bytes, peak RSS, RSS
after the last step (anonymous / file-backed: LoRA's fp32 weights are pages of the memory-mapped safetensors file), wall
time and the last train loss; then qlora/lora ratios. The issue's target: base weights <= 0.35x. QLoRA's peak RSS is
reached while loading: quantizing reads every page of the fp32 file, which stays mapped until loading ends.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def tensor_bytes(model) -> tuple[int, int]:
    """(frozen bytes, trainable bytes) of the model's parameters and buffers, each storage once."""
    seen: set[int] = set()
    frozen = trainable = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        size = tensor.untyped_storage().nbytes()
        if tensor.requires_grad:
            trainable += size
        else:
            frozen += size
        # bitsandbytes keeps each 4-bit weight's scales (absmax, and the nested ones) beside the tensor, not as buffers
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for extra in (state.absmax, getattr(state, "code", None), *(
                    (state.state2.absmax, state.state2.code) if getattr(state, "nested", False) else ())):
                if extra is not None and extra.untyped_storage().data_ptr() not in seen:
                    seen.add(extra.untyped_storage().data_ptr())
                    frozen += extra.untyped_storage().nbytes()
    return frozen, trainable


def rss_now() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def child(method: str, args) -> dict:
    from tunelab import load_config, train
    from tunelab.train import loop

    measured = {}
    attach, save = loop.attach_method, loop.save_model

    def attach_and_measure(model, cfg):
        model = attach(model, cfg)
        measured["base_bytes"], measured["trainable_bytes"] = tensor_bytes(model)
        return model

    def measure_and_save(model, tokenizer, out):
        measured["rss_trained"] = rss_now()  # after the last step, model and optimizer still alive
        save(model, tokenizer, out)

    loop.attach_method, loop.save_model = attach_and_measure, measure_and_save
    rows = json.loads(SHARED.read_text(encoding="utf-8"))[:16]
    with tempfile.TemporaryDirectory(prefix="qlora-memory-") as tmp:
        data = Path(tmp) / "train.json"
        data.write_text(json.dumps(rows), encoding="utf-8")
        cfg = load_config({
            "model": args.model,
            "data": {"train": str(data), "format": "alpaca", "max_length": 128},
            "method": {"name": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": args.steps, "batch_size": 2, "precision": args.precision, "eval_at_start": False,
                         "learning_rate": 2e-4, "seed": 0},
            "output": {"dir": str(Path(tmp) / "run")},
        })
        started = time.perf_counter()
        result = train(cfg, quiet=True)
        wall = time.perf_counter() - started
    return {**measured, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": round(wall, 1), "final_train_loss": result.summary["final_train_loss"],
            "precision": result.summary["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    results = {}
    for method in ("lora", "qlora"):
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--steps", str(args.steps),
               "--precision", args.precision]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        r = results[method]
        rss = r["rss_trained"]
        print(f"{method:6s} base weights {r['base_bytes'] / 2**20:6.1f} MiB | trainable {r['trainable_bytes'] / 2**20:4.1f} MiB | "
              f"peak RSS {r['peak_rss_mib']:6.1f} MiB | RSS after the last step {rss['VmRSS']:6.1f} MiB (anonymous "
              f"{rss['RssAnon']:.1f}, file {rss['RssFile']:.1f}) | {r['wall_s']} s | loss {r['final_train_loss']:.4f} | {r['precision']}")
    lora, qlora = results["lora"], results["qlora"]
    print(f"qlora / lora: base weights {qlora['base_bytes'] / lora['base_bytes']:.3f}x (target <= 0.35x) | "
          f"peak RSS {qlora['peak_rss_mib'] / lora['peak_rss_mib']:.3f}x | "
          f"RSS after the last step {qlora['rss_trained']['VmRSS'] / lora['rss_trained']['VmRSS']:.3f}x")


if __name__ == "__main__":
    main()
