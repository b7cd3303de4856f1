"""Perplexity evaluation: tunelab's batched path (`tunelab eval --perplexity`) against a naive per-row loop, one run.

    python bench/eval_perplexity.py                  # 500 Alpaca rows, SmolLM2-135M-Instruct, fp32 and bf16
    python bench/eval_perplexity.py --rows 100 --data my_rows.jsonl

The naive loop is what a user writes first: one row at a time, `model(input_ids, labels=labels).loss` (the full logits
tensor at every position), token-weighted, on the model as transformers loads it. tunelab (the model as `tunelab eval`
loads it) sorts rows by length, batches them, runs batches side by side on the cores, attention as blocked matmuls,
runs a prefix every row shares once, and the LM head only where labels are scored, chunked. Both score the same tokenized rows (assistant tokens only), so the losses must agree.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


@torch.no_grad()
def naive_loss(model, encoded) -> float:
    total, count = 0.0, 0
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([e.labels])
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--data", default=str(SHARED) if SHARED.is_file() else None, help="rows in any tunelab format")
    p.add_argument("--model", default="default")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    from tunelab.evaluate.runner import EvalRequest, load_eval_model, run_perplexity
    from tunelab.generate import load_for_inference

    if args.data is None:
        from tunelab.demo import DATA_DIR

        args.data = str(DATA_DIR / "train.jsonl")
    model, tokenizer = load_for_inference(args.model)
    print(f"{args.rows} rows of {args.data} | {args.model} | {torch.get_num_threads()} threads")

    from tunelab.config import load_config
    from tunelab.data.dataset import encode_all
    from tunelab.data.pipeline import read_rows, to_example

    cfg = load_config({"data": {"train": args.data, "max_length": 2048}}).data
    records, fmt = read_rows(cfg.train, "data", None, [])
    encoded = encode_all([to_example(r, fmt) for r in records[: args.rows]], tokenizer, cfg)

    start = time.perf_counter()
    ref = naive_loss(model, encoded)
    naive_s = time.perf_counter() - start
    print(f"naive per-row loop (fp32):  loss {ref:.5f}  ppl {math.exp(ref):.3f}  {naive_s:6.1f} s")
    del model
    model, tokenizer = load_eval_model(args.model)  # what `tunelab eval` scores with
    for precision in ("fp32", "bf16"):
        req = EvalRequest(target=args.model, perplexity=args.data, limit=args.rows, batch_size=args.batch_size, precision=precision)
        out = run_perplexity(model, tokenizer, req)
        print(f"tunelab eval --perplexity ({precision}): loss {out['loss']:.5f}  ppl {out['perplexity']:.3f}  "
              f"{out['seconds']:6.1f} s  -> {naive_s / out['seconds']:.2f}x  (loss {out['loss'] - ref:+.5f})")


if __name__ == "__main__":
    main()
