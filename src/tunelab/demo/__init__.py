"""The demo: teach SmolLM2-135M-Instruct a support-ticket extraction format it cannot do zero-shot.

    tunelab demo            # fine-tunes the embedded model (LoRA) and prints exact match before and after

The data (src/tunelab/demo/data, written for this project by scripts/make_demo_data.py) asks for one line of JSON
with product, category, urgency and order_id from a customer message. The metric compares the parsed JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
FIELDS = ("product", "category", "urgency", "order_id")


def demo_config(output_dir: str = "runs/demo", **training) -> dict:
    """The demo run as a config dict (configs/demo.yaml is the same run with repo-relative paths)."""
    return {
        "model": "default",
        "data": {
            "train": str(DATA_DIR / "train.jsonl"),
            "validation": str(DATA_DIR / "validation.jsonl"),
            "test": str(DATA_DIR / "test.jsonl"),  # never trained on; `tunelab report` scores it
            "format": "prompt_response",
            "max_length": 256,
        },
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"epochs": 2, "batch_size": 8, "learning_rate": 2.0e-3, "schedule": "cosine", "warmup_ratio": 0.05,
                     "eval_every": 40, "seed": 0, **training},
        "output": {"dir": output_dir},
    }


def load_test_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / "test.jsonl").read_text().splitlines() if line.strip()]


def score(predictions: list[str], references: list[str]) -> dict:
    """Exact match of the parsed JSON, valid-JSON rate and per-field accuracy."""
    exact = valid = 0
    field_hits = dict.fromkeys(FIELDS, 0)
    for pred, ref in zip(predictions, references):
        gold = json.loads(ref)
        try:
            got = json.loads(pred)
        except json.JSONDecodeError:
            continue
        if not isinstance(got, dict):
            continue
        valid += 1
        exact += got == gold
        for f in FIELDS:
            field_hits[f] += got.get(f, "<missing>") == gold[f]
    n = max(len(references), 1)
    return {"exact_match": exact / n, "valid_json": valid / n, **{f"{f}_acc": field_hits[f] / n for f in FIELDS}, "n": len(references)}


def evaluate_target(model, tokenizer, rows: list[dict]) -> tuple[dict, list[str]]:
    from tunelab.generate import generate

    preds = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=48, batch_size=20)
    return score(preds, [r["response"] for r in rows]), preds


@dataclass
class DemoResult:
    before: dict
    after: dict
    predictions: list[str]
    rows: list[dict]
    run_dir: Path
    summary: dict


def run_demo(output_dir: str = "runs/demo", epochs: float = 2, overwrite: bool = True,
             log: Callable[[str], None] = print) -> DemoResult:
    """Score the base model, fine-tune it (LoRA), score the result; writes demo_scores.json into the run directory."""
    from tunelab.config import load_config
    from tunelab.generate import load_for_inference
    from tunelab.train.loop import train

    cfg = demo_config(output_dir, epochs=epochs)
    cfg["output"]["overwrite"] = overwrite
    config = load_config(cfg)
    rows = load_test_rows()
    clock = time.perf_counter()
    log(f"1/3 scoring the base model on {len(rows)} held-out tickets...")
    base, tokenizer = load_for_inference("default")
    before, _ = evaluate_target(base, tokenizer, rows)
    del base
    log(f"    {time.perf_counter() - clock:.0f}s\n2/3 fine-tuning (LoRA)...")
    result = train(config)
    log("3/3 scoring the fine-tuned model...")
    clock = time.perf_counter()
    tuned, tokenizer = load_for_inference(result.run_dir)
    after, predictions = evaluate_target(tuned, tokenizer, rows)
    log(f"    {time.perf_counter() - clock:.0f}s")
    (result.run_dir / "demo_scores.json").write_text(json.dumps({"base": before, "fine_tuned": after}, indent=2))
    return DemoResult(before, after, predictions, rows, result.run_dir, result.summary)
