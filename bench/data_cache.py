"""How long `train` spends on data before its first step: the first time (read, validate, pipeline, tokenize) against
the second time (cache hit: fingerprint the files, memory-map the tokenized Arrow files).

    python bench/data_cache.py                       # ../shared/data/alpaca_en_demo.json, SmolLM2 tokenizer
    python bench/data_cache.py --copies 10 --steps   # 10x the rows, with clean + pii + dedupe + split turned on

Both runs happen in this process against a fresh, empty cache directory; the ratio is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA if DEFAULT_DATA.exists() else REPO / "src/tunelab/demo/data/train.jsonl"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--copies", type=int, default=1, help="Repeat the rows this many times (each copy made distinct).")
    parser.add_argument("--steps", action="store_true", help="Also run clean, pii, dedupe (exact) and a 70/15/15 split.")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    os.environ["TUNELAB_DATA_CACHE"] = str(work / "cache")
    from tunelab.config import load_config
    from tunelab.data.dataset import prepare_data
    from tunelab.data.readers import read_records
    from tunelab.models.loading import load_tokenizer, resolve_model

    rows = [r.row for r in read_records(args.data)]
    data_file = work / "train.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for copy in range(args.copies):
            for row in rows:
                row = dict(row)
                if copy:
                    key = "instruction" if "instruction" in row else next(iter(row))
                    row[key] = f"{row[key]} (variant {copy})"
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    data: dict = {"train": str(data_file), "max_length": args.max_length, "validation": 0.05}
    if args.steps:
        data.update(validation=None, clean=True, pii=True, dedupe=True, split=True)
    cfg = load_config({"model": args.model, "data": data})
    tokenizer = load_tokenizer(resolve_model(args.model))

    results = []
    for label in ("first run (prepare + tokenize)", "second run (cache hit)"):
        start = time.perf_counter()
        prepared = prepare_data(cfg.data, tokenizer, seed=0)
        n = len(prepared.train)
        _ = prepared.train[n - 1], sum(len(e.input_ids) for e in prepared.train)  # touch every row, as training will
        seconds = time.perf_counter() - start
        results.append(seconds)
        print(f"{label:34s} {seconds:8.3f} s  cache_hit={prepared.cache_hit}  train rows={n}  "
              f"tokens={prepared.train_tokens}", flush=True)
    print(f"rows in file: {len(rows) * args.copies}; steps: {'clean+pii+dedupe+split' if args.steps else 'none'}; "
          f"speed-up of the second run: {results[0] / results[1]:.0f}x", flush=True)
    print(f"python {sys.version.split()[0]}", flush=True)


if __name__ == "__main__":
    main()
