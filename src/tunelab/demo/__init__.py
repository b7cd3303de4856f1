"""The demo: teach SmolLM2-135M-Instruct a support-ticket extraction format it cannot do zero-shot.

    tunelab demo            # fine-tunes the embedded model (LoRA) and prints exact match before and after

The data (src/tunelab/demo/data, written for this project by scripts/make_demo_data.py) asks for one line of JSON
with product, category, urgency and order_id from a customer message. The metric compares the parsed JSON.
"""

from __future__ import annotations

import json
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
            "format": "prompt_response",
            "max_length": 256,
        },
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"epochs": 2, "batch_size": 8, "learning_rate": 1.0e-3, "schedule": "cosine", "warmup_ratio": 0.05,
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
