"""Data-parallel training on one machine: `tunelab train --nproc N` against the same run in one process.

    python bench/train_ddp.py                       # 64 Alpaca rows, 1 process vs 2 (gloo), same global batch of 8
    python bench/train_ddp.py --nproc 2 --rows 32 --set precision=fp32

Both runs train SmolLM2-135M-Instruct with LoRA r=16 on all linear layers on the same rows (batch 8, max length 512,
lr 2e-4, linear decay, one epoch, seed 0): the single process with all cores, the N processes with cores / N threads
each. Printed for each: tokens trained, loop time (from summary.json: model loading excluded), tokens/s, and the
largest per-step difference in train loss between the two runs (equal global batches, so the losses should agree up
to floating-point reduction order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import LORA, load_rows


def run(config: Path, nproc: int) -> tuple[dict, list[dict]]:
    cmd = [sys.executable, "-m", "tunelab", "train", str(config), "--quiet"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(yaml.safe_load(config.read_text())["output"]["dir"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return json.loads((run_dir / "summary.json").read_text()), records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--data", type=Path, default=None, help="Alpaca JSON file (default ../shared/data/alpaca_en_demo.json)")
    p.add_argument("--set", action="append", default=[], help="extra training.KEY=VALUE for both runs")
    args = p.parse_args()

    rows, _ = load_rows(args.data, args.rows)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        work = Path(tmp)
        data = work / "train.json"
        data.write_text(json.dumps(rows), encoding="utf-8")
        results = {}
        for nproc in (1, args.nproc):
            cfg = {
                "model": "default",
                "data": {"train": str(data), "validation": None, "format": "alpaca", "max_length": 512},
                "method": {"name": "lora", "target_modules": "all-linear", **LORA},
                "training": {"epochs": 1, "batch_size": 8, "learning_rate": 2e-4, "schedule": "linear", "warmup_steps": 0,
                             "eval_at_start": False, "seed": 0,
                             **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}},
                "output": {"dir": str(work / f"run-{nproc}")},
            }
            path = work / f"run-{nproc}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            summary, records = run(path, nproc)
            loop_s = summary["tokens_trained"] / summary["tokens_per_s"]
            results[nproc] = (summary, records)
            print(f"  {nproc} process{'es' if nproc > 1 else '  '}  {summary['tokens_trained']:6d} tokens  {loop_s:7.1f} s  "
                  f"{summary['tokens_per_s']:7.1f} tok/s  {summary['precision']}  final train loss "
                  f"{summary['final_train_loss']:.4f}", flush=True)
    (one, one_records), (many, many_records) = results[1], results[args.nproc]
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(one_records, many_records) if "train_loss" in a]
    worst = max(abs(a - b) for a, b in losses)
    print(f"| processes | tokens/s | ratio | largest per-step train-loss difference ({len(losses)} steps) |")
    print("|---|---|---|---|")
    print(f"| 1 | {one['tokens_per_s']:.1f} | 1.00x | – |")
    print(f"| {args.nproc} (gloo) | {many['tokens_per_s']:.1f} | {many['tokens_per_s'] / one['tokens_per_s']:.2f}x | {worst:.2e} |")


if __name__ == "__main__":
    main()
