"""Sentiment classification on the demo reviews: fine-tuned classifiers against the majority-class baseline.

    python bench/classify_sentiment.py                          # MiniLM full, MiniLM frozen (head only), SmolLM2 + LoRA
    python bench/classify_sentiment.py --runs minilm            # just one of them
    python bench/classify_sentiment.py --runs lora --set training.epochs=2

Each run is `tunelab.train` on one of the shipped configs (configs/classify-minilm.yaml, classify-minilm-frozen.yaml,
classify-lora.yaml: 120 hand-written product/movie reviews, 30 validation, 30 test) into a temporary directory, then
`tunelab eval`'s scoring of the test split (evaluate/classifier.py): accuracy and macro-F1, next to the majority-class
baseline (always the most frequent training label; the training split is 60/60, so the first label in sorted order).
Printed: one row per run with the test scores, the training wall time and the scoring time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"minilm": "classify-minilm.yaml", "frozen": "classify-minilm-frozen.yaml", "lora": "classify-lora.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run, e.g. training.epochs=2")
    args = parser.parse_args()

    import tunelab
    from tunelab.evaluate.classifier import evaluate_classifier

    rows = []
    with tempfile.TemporaryDirectory(prefix="classify-bench-") as tmp:
        for name in args.runs:
            overrides = [f"output.dir={Path(tmp) / name}", *args.set]
            cfg = tunelab.load_config(ROOT / "configs" / RUNS[name], overrides)
            start = time.perf_counter()
            result = tunelab.train(cfg, quiet=True)
            trained = time.perf_counter() - start
            start = time.perf_counter()
            scores = evaluate_classifier(result.run_dir)
            rows.append((name, cfg.model, cfg.method.name, result.summary, scores, trained, time.perf_counter() - start))
            print(f"{name}: accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} "
                  f"(majority {scores['majority_accuracy']:.4f} / {scores['majority_macro_f1']:.4f}), "
                  f"train {trained:.1f} s", flush=True)

    print()
    print("| run | model | method | trainable params | test accuracy | test macro-F1 | majority acc / F1 | "
          "final eval loss | train s | score s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, model, method, summary, s, trained, scored in rows:
        print(f"| {name} | {model} | {method} | {summary['trainable_params']:,} | {s['accuracy']:.4f} | {s['macro_f1']:.4f} | "
              f"{s['majority_accuracy']:.4f} / {s['majority_macro_f1']:.4f} | {summary['final_eval_loss']} | "
              f"{trained:.1f} | {scored:.1f} |")


if __name__ == "__main__":
    main()
