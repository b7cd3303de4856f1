"""Training throughput and memory: tunelab against TRL's SFTTrainer on the same model, rows and LoRA, in one run.

    python bench/train_throughput.py                   # 64 Alpaca rows, batch 8, max length 512, 1 epoch, 1 round
    python bench/train_throughput.py --rounds 2        # tunelab, TRL, TRL, tunelab: the median of each
    python bench/train_throughput.py --rows 16 --only tunelab

Each training run is its own process (so peak RSS is its own): SmolLM2-135M-Instruct (the embedded default), LoRA r=16
alpha=32 dropout 0 on all linear layers, batch 8, max length 512, lr 2e-4, linear decay without warmup, one epoch, seed 0.
TRL runs `SFTTrainer` with its defaults plus `use_cpu=True` (bf16 autocast on, gradient checkpointing on, no packing) on
the same rows as prompt/completion conversations, so both train on the assistant tokens only. tunelab runs its defaults.

Printed for each: tokens trained (real tokens, no padding), wall time of the training loop (model loading and tokenization
excluded for both), tokens/s, peak RSS at the end of training, final train loss, eval loss on a fixed held-out slice
(the same fp32 code scores both), and tunelab/TRL ratios. MFU = 4 x params x tokens/s over a bf16 matmul peak measured
at start (the issue's LoRA-step estimate: forward 2PT + backward through activations 2PT).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
HELD_OUT = 32
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def load_rows(path: Path | None, n: int) -> tuple[list[dict], list[dict]]:
    """(n training rows, HELD_OUT held-out rows): Alpaca rows from the shared dataset, else the demo data."""
    if path is None:
        path = SHARED if SHARED.is_file() else None
    if path is not None:
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        from tunelab.demo import DATA_DIR

        rows = [json.loads(line) for line in (DATA_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n], rows[-HELD_OUT:]


def to_messages(rows: list[dict]) -> list[list[dict]]:
    from tunelab.data.formats import to_examples
    from tunelab.data.readers import Record

    examples, _ = to_examples([Record("rows", i + 1, row) for i, row in enumerate(rows)], None)
    return [ex.messages for ex in examples]


def heldout_loss(model, tokenizer, rows: list[dict]) -> float:
    """fp32 token-mean loss on the assistant tokens of the held-out rows (tunelab's tokenization for both)."""
    import torch

    from tunelab.data.formats import Example
    from tunelab.data.tokenize import encode_example
    from tunelab.train.loop import evaluate_loss

    encoded = [encode_example(Example(f"held-out {i}", m), tokenizer, 512)[0] for i, m in enumerate(to_messages(rows))]
    model.float()
    return evaluate_loss(model, encoded, 8, tokenizer.pad_token_id, torch.device("cpu"), None)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_tunelab(rows: list[dict], held: list[dict], work: Path, args) -> dict:
    from tunelab import load_config, train
    from tunelab.generate import load_for_inference

    data = work / "train.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    cfg = load_config({
        "model": args.model,
        "data": {"train": str(data), "validation": None, "format": "alpaca", "max_length": 512, "cache": False},
        "method": {"name": "lora", "target_modules": "all-linear", **LORA},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 2e-4, "schedule": "linear", "warmup_steps": 0,
                     "eval_at_start": False, "seed": 0, **dict(kv.split("=", 1) for kv in args.tunelab_set)},
        "output": {"dir": str(work / "run")},
    })
    result = train(cfg, quiet=True)
    rss = peak_rss_mb()
    s = result.summary
    loop_s = s["tokens_trained"] / s["tokens_per_s"]
    model, tokenizer = load_for_inference(result.run_dir)
    return {"tokens": s["tokens_trained"], "loop_s": loop_s, "rss_mb": rss, "train_loss": s["final_train_loss"],
            "eval_loss": heldout_loss(model, tokenizer, held), "steps": s["steps"], "precision": s["precision"]}


def run_trl(rows: list[dict], held: list[dict], work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.loading import load_model, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    conversations = to_messages(rows)
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in conversations])
    config = SFTConfig(
        output_dir=str(work / "trl"), use_cpu=True, max_length=512, per_device_train_batch_size=8, learning_rate=2e-4,
        num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, save_strategy="no", report_to=[],
        logging_steps=1, seed=0, disable_tqdm=True,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    out = trainer.train()
    loop_s = time.perf_counter() - start
    rss = peak_rss_mb()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    with torch.no_grad():
        eval_loss = heldout_loss(trainer.model, tokenizer, held)
    return {"tokens": tokens, "loop_s": loop_s, "rss_mb": rss, "train_loss": losses[-1] if losses else out.training_loss,
            "eval_loss": eval_loss, "steps": out.global_step, "precision": "bf16" if config.bf16 else "fp32"}


def matmul_peak_gflops(dtype_name: str = "bfloat16", n: int = 2048, seconds: float = 3.0) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def worker(args) -> None:
    rows, held = load_rows(args.data, args.rows)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-") as tmp:
        result = (run_tunelab if args.worker == "tunelab" else run_trl)(rows, held, Path(tmp), args)
    print("RESULT " + json.dumps(result))


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--rows", str(args.rows), "--model", args.model]
    if args.data:
        cmd += ["--data", str(args.data)]
    for kv in args.tunelab_set:
        cmd += ["--tunelab-set", kv]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_s"] = result["tokens"] / result["loop_s"]
    print(f"  {name:8s} {result['tokens']:6d} tokens  {result['loop_s']:7.1f} s  {result['tokens_per_s']:7.1f} tok/s  "
          f"peak RSS {result['rss_mb']:6.0f} MB  train loss {result['train_loss']:.4f}  eval loss {result['eval_loss']:.4f}",
          flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="training rows (default 64)")
    p.add_argument("--data", type=Path, default=None, help="Alpaca JSON file (default ../shared/data/alpaca_en_demo.json)")
    p.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=1, help="alternations (odd rounds run TRL first)")
    p.add_argument("--only", choices=["tunelab", "trl"], default=None)
    p.add_argument("--tunelab-set", action="append", default=[], help="extra training.KEY=VALUE for tunelab (A/B runs)")
    p.add_argument("--worker", choices=["tunelab", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    peak = matmul_peak_gflops()
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads) | {args.rows} rows, batch 8, "
          f"max length 512, LoRA r=16 all-linear, 1 epoch", flush=True)
    results: dict[str, list[dict]] = {"tunelab": [], "trl": []}
    for r in range(args.rounds):
        order = ["tunelab", "trl"] if r % 2 == 0 else ["trl", "tunelab"]
        for name in order:
            if args.only in (None, name):
                results[name].append(spawn(name, args))

    from tunelab.models.loading import load_model, resolve_model

    params = sum(p.numel() for p in load_model(resolve_model(args.model)).parameters())

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print("\n| | tokens | loop s | tokens/s | peak RSS MB | train loss | eval loss | MFU |\n|---|---|---|---|---|---|---|---|")
    for name in ("tunelab", "trl"):
        if results[name]:
            tps = median(name, "tokens_per_s")
            print(f"| {name} | {results[name][0]['tokens']} | {median(name, 'loop_s'):.1f} | {tps:.1f} | "
                  f"{median(name, 'rss_mb'):.0f} | {median(name, 'train_loss'):.4f} | {median(name, 'eval_loss'):.4f} | "
                  f"{4 * params * tps / 1e9 / peak:.1%} |")
    if results["tunelab"] and results["trl"]:
        print(f"\ntunelab/TRL: tokens/s {median('tunelab', 'tokens_per_s') / median('trl', 'tokens_per_s'):.2f}x, "
              f"peak RSS {median('tunelab', 'rss_mb') / median('trl', 'rss_mb'):.2f}x, "
              f"eval loss {median('tunelab', 'eval_loss') - median('trl', 'eval_loss'):+.4f}")


if __name__ == "__main__":
    main()
