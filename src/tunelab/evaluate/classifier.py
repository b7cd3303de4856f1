"""`tunelab eval RUN_DIR` for a `task: classification` run: the trained head's predictions on held-out rows.

    tunelab eval runs/classify-minilm                       # the run's test split (else data.test, else validation)
    tunelab eval runs/classify-minilm --data other.jsonl    # any classification rows (text, label)

Reports accuracy, per-class and macro/micro/weighted precision/recall/F1 and the confusion matrix
(`metrics.classification_report`, scikit-learn), next to the majority-class baseline: always answering the most
frequent training label.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tunelab.errors import TunelabError


def read_labelled(spec: str | list[str], key: str, limit: int | None = None) -> list[tuple[str, str, str]]:
    """(text, label, file:line) of each classification row of `spec`.

    Raises:
        TunelabError: a missing file, an invalid row (file:line and field), no rows.
    """
    from tunelab.data.pipeline import read_rows, to_example
    from tunelab.data.readers import Problem

    problems: list[Problem] = []
    records, _ = read_rows(spec, key, "classification", problems)
    if problems:
        more = f" ({len(problems) - 1} more; run `tunelab data check {spec}`)" if len(problems) > 1 else ""
        raise TunelabError(problems[0].text + more)
    if not records:
        raise TunelabError(f"{key}: {spec} has no rows")
    examples = [to_example(r, "classification") for r in (records[:limit] if limit else records)]
    return [(ex.text, ex.label, ex.source) for ex in examples]


def held_out_split(run_dir: Path, cfg) -> tuple[str, str | list[str]]:
    """(name, path) of the rows to score: data/test.jsonl made by data.split, else data.test, else the validation rows.

    Raises:
        TunelabError: the run kept no held-out rows as a file.
    """
    data = cfg.data
    candidates = [("test", run_dir / "data" / "test.jsonl"), ("test", data.test),
                  ("validation", run_dir / "data" / "validation.jsonl"),
                  ("validation", data.validation if isinstance(data.validation, (str, list)) else None)]
    for name, path in candidates:
        if isinstance(path, Path):
            if path.is_file():
                return name, str(path)
        elif path:
            return name, path
    raise TunelabError(f"{run_dir}: the run has no held-out rows to score (no data.test, data.validation file or "
                       "data.split); pass --data FILE")


def training_labels(run_dir: Path, cfg) -> list[str]:
    path = run_dir / "data" / "train.jsonl"
    return [label for _, label, _ in read_labelled(str(path) if path.is_file() else cfg.data.train, "data.train")]


def evaluate_classifier(run_dir: str | Path, data: str | None = None, limit: int | None = None,
                        batch_size: int = 32) -> dict:
    """Scores of a classification run on held-out rows, with the majority-class baseline.

    Raises:
        TunelabError: no held-out rows, invalid rows, labels the classifier does not know.
    """
    from tunelab.config import load_config
    from tunelab.evaluate.metrics import classification_report
    from tunelab.methods.classification import load_classifier, predict_labels

    run_dir = Path(str(run_dir))
    cfg = load_config(run_dir / "config.yaml")
    split, path = ("data", data) if data else held_out_split(run_dir, cfg)
    rows = read_labelled(path, "--data" if data else f"data.{split}", limit)
    model, tokenizer, labels = load_classifier(run_dir)
    unknown = sorted({label for _, label, _ in rows} - set(labels))
    if unknown:
        raise TunelabError(f"{path}: labels {unknown[:5]} were never trained (the classifier knows {', '.join(labels)})")
    start = time.perf_counter()
    predicted = predict_labels(model, tokenizer, [t for t, _, _ in rows], labels, cfg.data.max_length, batch_size)
    truth = [label for _, label, _ in rows]
    report = classification_report(truth, [p for p, _ in predicted], labels=labels)
    majority = Counter(training_labels(run_dir, cfg)).most_common(1)[0][0]
    baseline = classification_report(truth, [majority] * len(truth), labels=labels)
    errors = [{"id": w, "label": t, "predicted": p, "probability": round(prob, 4)}
              for (_, t, w), (p, prob) in zip(rows, predicted) if t != p]
    return {**report, "macro_precision": report["macro"]["precision"], "macro_recall": report["macro"]["recall"],
            "macro_f1": report["macro"]["f1"], "majority_label": majority, "majority_accuracy": baseline["accuracy"],
            "majority_macro_f1": baseline["macro"]["f1"], "n": len(rows), "split": split, "data": path,
            "seconds": round(time.perf_counter() - start, 2), "errors": errors}
