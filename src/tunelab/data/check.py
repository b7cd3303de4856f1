"""`tunelab data check`: read every row of every file and report everything wrong, not just the first problem.

    report = check_files(["raw/train.jsonl"], tokenizer=tok, max_length=512)
    report.clean            # False when any row is invalid or repeats an earlier row
    report.problems         # every invalid row: `file:line: field: problem; fix`

Invalid rows (malformed JSON/CSV, not UTF-8, missing or empty fields, wrong types, turns out of order, a prompt longer
than max_length) and duplicate rows make the data not clean. Rows that will be cut at max_length, text that looks like
mojibake and a skewed label distribution are warnings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from tunelab.data.dedupe import exact_duplicates, near_duplicates
from tunelab.data.formats import FORMATS
from tunelab.data.pipeline import example_text, guess_label_field, label_counts, read_rows
from tunelab.data.readers import Problem, expand_paths
from tunelab.data.tokenize import encode_example
from tunelab.errors import TunelabError

# UTF-8 bytes decoded as Latin-1/cp1252 somewhere upstream: "cafÃ©", "â€™", "Â " ...
MOJIBAKE = re.compile("Ã[\u0080-\u00bf]|Â[\u0080-\u00bf\u00a0]|â€[\u0080-\u00bf™œ\u009d\u201c\u201d\u2019\u2018\u2013\u2014\u2022\u00a6]")


@dataclass
class CheckReport:
    files: list[str]
    format: str | None
    rows_read: int = 0
    rows_valid: int = 0
    problems: list[Problem] = field(default_factory=list)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)  # (row, kind, first occurrence)
    too_long: list[tuple[str, int]] = field(default_factory=list)  # (row, tokens over max_length)
    mojibake: list[tuple[str, str]] = field(default_factory=list)  # (row, sample)
    label_field: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None

    @property
    def clean(self) -> bool:
        return not self.problems and not self.duplicates

    def to_json(self) -> dict:
        return {
            "clean": self.clean,
            "files": self.files,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_valid": self.rows_valid,
            "invalid": [{"file": p.file, "line": p.line, "kind": p.kind, "message": p.text} for p in self.problems],
            "duplicates": [{"row": r, "kind": k, "first": f} for r, k, f in self.duplicates],
            "too_long": [{"row": r, "over_by": n} for r, n in self.too_long],
            "max_length": self.max_length,
            "mojibake": [{"row": r, "sample": s} for r, s in self.mojibake],
            "label_field": self.label_field,
            "labels": self.labels,
        }


def check_files(spec: str | list[str], fmt: str | None = None, tokenizer=None, max_length: int = 512,
                train_on_inputs: bool = False, label_field: str | None = None, near: float | None = None) -> CheckReport:
    """Validate every row of the files `spec` names. Only a missing file or an undetectable format raises.

    Raises:
        TunelabError: a path matches no file; the format cannot be told from the first row (pass fmt).
    """
    paths = expand_paths(spec, "data check")
    problems: list[Problem] = []
    valid, fmt = read_rows([str(p) for p in paths], "data check", fmt, problems)
    report = CheckReport([str(p) for p in paths], fmt, max_length=max_length if tokenizer is not None else None)
    examples = [FORMATS[fmt].to_example(rec) for rec in valid]
    for rec in valid:
        sample = MOJIBAKE.search(json.dumps(rec.row, ensure_ascii=False))
        if sample:
            report.mojibake.append((rec.where, sample.group(0)))
    if tokenizer is not None:
        keep = []
        classes = sorted({ex.label for ex in examples if ex.label is not None})  # format classification
        label_ids = {name: i for i, name in enumerate(classes)} or None
        for rec, ex in zip(valid, examples):
            try:
                enc = encode_example(ex, tokenizer, max_length, train_on_inputs, label_ids)
            except TunelabError as exc:
                problems.append(Problem(rec.file, rec.line, str(exc), "tokenize"))
                continue
            keep.append((rec, ex))
            over = max(e.full_length for e in enc) - max_length if ex.text is None else 0
            if over > 0:
                report.too_long.append((rec.where, over))
        valid, examples = [r for r, _ in keep], [e for _, e in keep]
    texts = [example_text(ex) for ex in examples]
    for rec, twin in zip(valid, exact_duplicates(texts)):
        if twin is not None:
            report.duplicates.append((rec.where, "exact", valid[twin].where))
    if near is not None:
        exact = {r for r, _, _ in report.duplicates}
        for rec, twin in zip(valid, near_duplicates(texts, threshold=near)):
            if twin is not None and rec.where not in exact:
                report.duplicates.append((rec.where, "near", valid[twin].where))
    problems.sort(key=lambda p: (report.files.index(p.file) if p.file in report.files else len(report.files), p.line or 0))
    report.problems = problems
    report.rows_valid = len(valid)
    report.rows_read = len(valid) + sum(p.kind not in ("file",) for p in problems)
    if valid:
        report.label_field = label_field or guess_label_field(valid, fmt)
        report.labels = label_counts(valid, report.label_field)
    return report


def label_balance_warning(labels: dict[str, int]) -> str | None:
    """A one-line warning when the rarest label has under a tenth of the commonest one's rows."""
    if len(labels) < 2:
        return None
    counts = Counter(labels)
    (top, n_top), (low, n_low) = counts.most_common()[0], counts.most_common()[-1]
    if n_low * 10 < n_top:
        return f"labels are imbalanced: '{low}' has {n_low} row(s), '{top}' has {n_top}; consider stratified splits and per-class metrics"
    return None
