"""tunelab's multiple-choice scores against lm-evaluation-harness on the same items, prompts and model, in one run.

    python bench/eval_parity.py --benchmark arc_easy                    # SmolLM2-135M-Instruct, the whole split
    python bench/eval_parity.py --benchmark hellaswag --limit 500 --batch-size 32
    python bench/eval_parity.py --benchmark my_items.jsonl --model runs/demo/model

Both score the items tunelab builds (prompt template and few-shot applied): they are written to a JSONL file and a
local-file lm-eval task (`output_type: multiple_choice`) reads them, so the only difference left is the scoring. Prints
acc / acc_norm of each, the largest per-choice log-likelihood difference, and the wall time ratio (model loading
excluded for both). lm-eval runs `--model hf` with dtype float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_lm_eval_task(items, folder: Path, task: str = "tunelab_parity") -> str:
    """Write items as a JSONL file plus an lm-eval task YAML that reads it; returns the task name."""
    delimiter = " " if all(c.startswith(" ") for it in items for c in it.choices) else ""
    rows = [{"context": it.context, "choices": [c[len(delimiter):] for c in it.choices], "gold": it.gold} for it in items]
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data, delimiter=delimiter), encoding="utf-8")
    return task


def run_lm_eval(items, model_dir: str, batch_size: int = 16) -> tuple[dict, list[list[float]], float]:
    """Score items with lm-eval's HFLM. Returns ({acc, acc_norm}, per-item log-likelihoods, seconds scoring)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="lm-eval-parity-"))
    task = write_lm_eval_task(items, folder)
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - start
    res = out["results"][task]
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}, lls, seconds


def run_tunelab(items, model, tokenizer, batch_size: int = 16) -> tuple[dict, list[list[float]], float]:
    from tunelab.evaluate.loglik import multiple_choice_metrics, score_items

    start = time.perf_counter()
    scores = score_items(model, tokenizer, items, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return multiple_choice_metrics(items, scores), scores, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="arc_easy", help="A named benchmark, a file, or a benchmark YAML.")
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from tunelab.evaluate.benchmarks import benchmark_items
    from tunelab.evaluate.runner import load_eval_model
    from tunelab.models.loading import resolve_model

    items, _ = benchmark_items(args.benchmark, fewshot=args.fewshot, limit=args.limit)
    items = [it for it in items if not isinstance(it.gold, list)]  # acc/acc_norm items (mc2 is compared elsewhere)
    model_dir = resolve_model(args.model).path if args.model == "default" or not Path(args.model).is_dir() else args.model
    print(f"{args.benchmark}: {len(items)} items, {sum(len(i.choices) for i in items)} choices; model {model_dir}", flush=True)
    model, tokenizer = load_eval_model(str(model_dir))
    ours, our_lls, our_s = run_tunelab(items, model, tokenizer, args.batch_size)
    theirs, their_lls, their_s = run_lm_eval(items, str(model_dir), args.batch_size)
    worst = max(abs(a - b) for x, y in zip(our_lls, their_lls) for a, b in zip(x, y))
    for key in ("acc", "acc_norm"):
        print(f"{key:8s} tunelab {100 * ours[key]:6.2f}   lm-eval {100 * theirs[key]:6.2f}   "
              f"difference {100 * abs(ours[key] - theirs[key]):.2f} points", flush=True)
    print(f"largest per-choice log-likelihood difference: {worst:.2e}", flush=True)
    print(f"time: tunelab {our_s:.1f} s, lm-eval {their_s:.1f} s -> tunelab {their_s / our_s:.2f}x faster", flush=True)
    ok = all(abs(ours[k] - theirs[k]) <= 0.005 for k in ("acc", "acc_norm"))
    print("PASS: within 0.5 points" if ok else "FAIL: more than 0.5 points apart", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
