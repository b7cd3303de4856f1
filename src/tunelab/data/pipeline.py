"""The data preparation pipeline: read -> validate -> clean -> anonymize -> dedupe -> split -> augment.

    result = run_pipeline(cfg.data, seed=0)
    result.splits["train"], result.splits["validation"], result.splits["test"]   # lists of Record
    result.removed                                                                # every row left out, with why
    result.steps                                                                  # what each step did, with counts

Each step is optional and configured under `data:` (see config.py); reading and validating always run. Rows stay in
their own layout (an alpaca row stays an alpaca row) so the prepared splits can be written back as the user's format.
Tokenization, caching and the report files are in dataset.py and report.py.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from tunelab.config import DataConfig
from tunelab.data.formats import FORMATS, Example, detect_format
from tunelab.data.readers import Problem, Record, expand_paths, read_file
from tunelab.errors import TunelabError

SPLITS = ("train", "validation", "test")


@dataclass
class Removed:
    """A row the pipeline left out: where it came from, which step removed it and why."""

    source: str
    step: str
    reason: str


@dataclass
class PipelineResult:
    splits: dict[str, list[Record]]
    format: str
    removed: list[Removed] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    label_field: str | None = None

    def examples(self, split: str, system_prompt: str | None = None) -> list[Example]:
        return [to_example(r, self.format, system_prompt) for r in self.splits[split]]


# ----------------------------------------------------------------------------------------------------------------------
# Rows <-> examples


def to_example(rec: Record, fmt: str, system_prompt: str | None = None) -> Example:
    ex = FORMATS[fmt].to_example(rec)
    if system_prompt and ex.text is None and ex.messages[0]["role"] != "system":
        ex.messages.insert(0, {"role": "system", "content": system_prompt})
        if ex.rejected is not None:
            ex.rejected.insert(0, {"role": "system", "content": system_prompt})
    return ex


def example_text(ex: Example, with_system: bool = True) -> str:
    """The text two rows are compared by when deduplicating (roles included, so a question is not its own answer)."""
    if ex.text is not None:
        return ex.text
    text = "\n".join(f"{m['role']}: {m['content']}" for m in ex.messages if with_system or m["role"] != "system")
    return text if ex.rejected is None else f"{text}\nrejected: {ex.rejected[-1]['content']}"


def rewrite_row(row: dict, transform: Callable[[str], tuple[str, Iterable[str] | Counter[str]]]) -> tuple[dict, Counter[str]]:
    """Run every string of a row through `transform`, which returns the new text and what it changed (names, or a
    Counter of them); return the new row and how often each name came up over the row."""
    found: Counter[str] = Counter()

    def fix(text: str) -> str:
        new, names = transform(text)
        found.update(names)
        return new

    return map_strings(row, fix), found


def map_strings(value, fn: Callable[[str], str]):
    """Apply fn to every string in a row (nested lists and dicts too), except roles and tunelab's own `_` keys."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: v if (k == "role" or k.startswith("_")) else map_strings(v, fn) for k, v in value.items()}
    return value


def prompt_field(row: dict, fmt: str) -> str | None:
    """The prompt text that augmentation may rewrite (never the response: the label must stay right)."""
    key = PROMPT_FIELDS[fmt]
    if isinstance(row.get(key), list):  # chat turns (messages, or a preference prompt): the last user turn
        users = [m for m in row[key] if m.get("role") == "user"]
        return users[-1]["content"] if users else None
    return row.get(key)


def with_prompt(row: dict, fmt: str, text: str) -> dict:
    row = dict(row)
    key = PROMPT_FIELDS[fmt]
    if isinstance(row.get(key), list):
        messages = [dict(m) for m in row[key]]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last]["content"] = text
        row[key] = messages
    else:
        row[key] = text
    return row


PROMPT_FIELDS = {"alpaca": "instruction", "prompt_response": "prompt", "preference": "prompt", "messages": "messages", "text": "text",
                 "classification": "text"}


# ----------------------------------------------------------------------------------------------------------------------
# Read and validate


def read_rows(spec: str | list[str], key: str, fmt: str | None, problems: list[Problem]) -> tuple[list[Record], str | None]:
    """Every row of the files that its format accepts; every other row becomes a Problem. Returns (rows, format).

    Raises:
        TunelabError: a path matches no file; the format cannot be told from the first row.
    """
    records: list[Record] = []
    for path in expand_paths(spec, key):
        rows = list(read_file(path, problems))
        if rows:
            fmt = fmt or detect_format(rows[0])
            missing = [k for k in FORMATS[fmt].required if k not in rows[0].row]
            if missing and path.suffix.lower() in (".csv", ".tsv"):
                # One line for the header instead of the same missing field on every row.
                problems.append(Problem(str(path), 1, f"{path}:1: the header has no column {', '.join(map(repr, missing))} "
                                        f"(columns: {', '.join(rows[0].row)}); rename the column or set data.format", "file"))
                continue
        records.extend(rows)
    if not records:
        return [], fmt
    valid = []
    for rec in records:
        try:
            FORMATS[fmt].to_example(rec)
        except TunelabError as exc:
            problems.append(Problem(rec.file, rec.line, str(exc), "format"))
            continue
        valid.append(rec)
    return valid, fmt


def fail_on(problems: list[Problem]) -> None:
    first = problems[0].text
    more = len(problems) - 1
    tail = f" ({more} more problem{'s' if more > 1 else ''}: `tunelab data check` lists them all; or set data.on_invalid: skip)" if more else ""
    raise TunelabError(first + tail)


# ----------------------------------------------------------------------------------------------------------------------
# Steps


def clean_step(splits: dict[str, list[Record]], cfg: DataConfig, fmt: str, removed: list[Removed]) -> dict:
    from tunelab.data.clean import CleanOptions, clean_text

    c = cfg.clean
    options = CleanOptions(unicode=c.unicode, control_chars=c.control_chars, whitespace=c.whitespace, html=c.html)
    fixes: Counter[str] = Counter()
    changed = dropped = 0
    for name, rows in splits.items():
        kept = []
        for rec in rows:
            row, applied = rewrite_row(rec.row, lambda text: clean_text(text, options))
            if applied:
                changed += 1
                fixes.update(set(applied))  # rows per fix, not fields per fix
                rec = replace(rec, row=row)
                try:
                    FORMATS[fmt].to_example(rec)
                except TunelabError as exc:
                    removed.append(Removed(rec.where, "clean", f"invalid after cleaning: {str(exc).removeprefix(rec.where + ': ')}"))
                    dropped += 1
                    continue
            kept.append(rec)
        splits[name] = kept
    return {"step": "clean", "rows_changed": changed, "fixes": dict(sorted(fixes.items())), "removed": dropped}


def pii_step(splits: dict[str, list[Record]], cfg: DataConfig) -> dict:
    from tunelab.data.pii import PiiScrubber

    scrub = PiiScrubber(cfg.pii.types, region=cfg.pii.region)
    found: Counter[str] = Counter()
    changed = 0
    for name, rows in splits.items():
        out = []
        for rec in rows:
            row, counts = rewrite_row(rec.row, scrub)
            if counts:
                changed += 1
                found.update(counts)
                rec = replace(rec, row=row)
            out.append(rec)
        splits[name] = out
    return {"step": "pii", "rows_changed": changed, "found": {t: found.get(t, 0) for t in cfg.pii.types}}


def _texts(rows: list[Record], fmt: str, with_system: bool) -> list[str]:
    return [example_text(FORMATS[fmt].to_example(r), with_system) for r in rows]


def dedupe_within(rows: list[Record], fmt: str, cfg: DataConfig, removed: list[Removed]) -> tuple[list[Record], int, int]:
    """Keep the first of each group of exact (and, if asked, near) duplicates. Returns (kept rows, exact, near)."""
    from tunelab.data.dedupe import exact_duplicates, near_duplicates

    d = cfg.dedupe
    n_exact = n_near = 0
    if d.exact:
        twin = exact_duplicates(_texts(rows, fmt, with_system=True))
        for rec, t in zip(rows, twin):
            if t is not None:
                removed.append(Removed(rec.where, "dedupe", f"exact duplicate of {rows[t].where}"))
        n_exact = sum(t is not None for t in twin)
        rows = [r for r, t in zip(rows, twin) if t is None]
    if d.near:
        twin = near_duplicates(_texts(rows, fmt, with_system=False), threshold=d.threshold)
        for rec, t in zip(rows, twin):
            if t is not None:
                removed.append(Removed(rec.where, "dedupe", f"near duplicate of {rows[t].where} (similarity >= {d.threshold:g})"))
        n_near = sum(t is not None for t in twin)
        rows = [r for r, t in zip(rows, twin) if t is None]
    return rows, n_exact, n_near


def leakage(splits: dict[str, list[Record]], fmt: str, cfg: DataConfig, removed: list[Removed] | None) -> int:
    """Training rows with a twin in validation or test (exact, or near when dedupe.near). Removed from train when
    `removed` is given (dedupe on); otherwise only counted."""
    from tunelab.data.dedupe import cross_split_matches

    held = splits["validation"] + splits["test"]
    if not held or not splits["train"]:
        return 0
    near = cfg.dedupe is not None and cfg.dedupe.near
    twin = cross_split_matches(_texts(held, fmt, with_system=not near), _texts(splits["train"], fmt, with_system=not near),
                               threshold=cfg.dedupe.threshold if near else None)
    if removed is not None:
        for rec, t in zip(splits["train"], twin):
            if t is not None:
                removed.append(Removed(rec.where, "dedupe", f"leaks into validation/test: twin of {held[t].where}"))
        splits["train"] = [r for r, t in zip(splits["train"], twin) if t is None]
    return sum(t is not None for t in twin)


def target_counts(n: int, fractions: list[float]) -> list[int]:
    """Split n rows by fractions with the largest-remainder method: each count is within one row of n * fraction."""
    exact = [n * f for f in fractions]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_rows(rows: list[Record], fractions: list[float], seed: int, stratify: str | None = None,
               group: str | None = None) -> list[list[Record]]:
    """Seeded split into len(fractions) parts, each in file order.

    Stratified: each label's rows are shuffled and spread evenly over [0, 1); cutting the merged order at the target
    counts gives every split the label proportions of the whole (within one row per label) and exact overall sizes.
    Grouped: whole groups (shuffled) go to the split that is furthest below its target, so a group never straddles.
    """
    rng = random.Random(seed)
    n = len(rows)
    targets = target_counts(n, fractions)
    parts: list[list[int]] = [[] for _ in fractions]
    if group:
        groups: dict[str, list[int]] = {}
        for i, rec in enumerate(rows):
            key = rec.row.get(group)
            groups.setdefault(repr(key) if key is not None else f"row {i}", []).append(i)
        keys = sorted(groups)
        rng.shuffle(keys)
        for key in keys:
            need = [t - len(p) for t, p in zip(targets, parts)]
            best = max(range(len(parts)), key=lambda j: (need[j] / max(targets[j], 1) if targets[j] else -1.0, -j))
            parts[best].extend(groups[key])
    else:
        if stratify:
            by_label: dict[str, list[int]] = {}
            for i, rec in enumerate(rows):
                by_label.setdefault(str(rec.row.get(stratify)), []).append(i)
            keyed = []
            for label in sorted(by_label):
                idx = by_label[label]
                rng.shuffle(idx)
                keyed += [((rank + rng.random()) / len(idx), i) for rank, i in enumerate(idx)]
            order = [i for _, i in sorted(keyed)]
        else:
            order = list(range(n))
            rng.shuffle(order)
        start = 0
        for j, t in enumerate(targets):
            parts[j] = order[start : start + t]
            start += t
    return [[rows[i] for i in sorted(p)] for p in parts]


def augment_step(splits: dict[str, list[Record]], cfg: DataConfig, fmt: str, seed: int,
                 load_generator: Callable[[], tuple] | None) -> dict:
    from tunelab.data.augment import eda, paraphrase, wordnet_synonyms

    a = cfg.augment
    rng = random.Random(seed)
    train = splits["train"]
    added: list[Record] = []
    n_eda = unchanged = 0
    synonyms = wordnet_synonyms() if a.eda else None
    for rec in train:
        prompt = prompt_field(rec.row, fmt)
        for _ in range(a.eda):
            if not prompt:
                break
            new = eda(prompt, rng, alpha=a.alpha, synonyms=synonyms)
            if new.strip() == prompt.strip():
                unchanged += 1
                continue
            added.append(replace(rec, row={**with_prompt(rec.row, fmt, new), "_augmented": "eda"}))
            n_eda += 1
    n_para = rejected = 0
    if a.paraphrase:
        if load_generator is None:
            raise TunelabError("data.augment.paraphrase: needs the model to write paraphrases; run it through `tunelab data prepare`")
        model, tokenizer = load_generator()
        prompts = [prompt_field(r.row, fmt) or "" for r in train]
        for k in range(a.paraphrase):
            outs = paraphrase(prompts, model, tokenizer, seed=seed + k, temperature=a.temperature)
            for rec, out in zip(train, outs):
                if out is None:
                    rejected += 1
                    continue
                added.append(replace(rec, row={**with_prompt(rec.row, fmt, out), "_augmented": "paraphrase"}))
                n_para += 1
    splits["train"] = train + added
    return {"step": "augment", "eda": n_eda, "eda_unchanged": unchanged, "synonyms": synonyms is not None,
            "paraphrase": n_para, "paraphrase_rejected": rejected}


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline


def guess_label_field(rows: list[Record], fmt: str) -> str | None:
    """A `label` column, or a response that takes few distinct values (classification written as prompt/response)."""
    if rows and sum("label" in r.row for r in rows) >= 0.9 * len(rows):
        return "label"
    answer = {"alpaca": "output", "prompt_response": "response"}.get(fmt)
    if answer and len(rows) >= 10:
        values = Counter(str(r.row.get(answer, "")).strip() for r in rows)
        if len(values) <= min(20, len(rows) // 5) and all(len(v) <= 40 for v in values):
            return answer
    return None


def label_counts(rows: list[Record], label_field: str | None) -> dict[str, int]:
    if not label_field:
        return {}
    counts = Counter(str(r.row.get(label_field, "")).strip() for r in rows)
    return dict(counts.most_common())


def run_pipeline(cfg: DataConfig, seed: int, load_generator: Callable[[], tuple] | None = None) -> PipelineResult:
    """Read, validate and (as configured) clean, anonymize, dedupe, split and augment. Nothing is written here.

    Raises:
        TunelabError: invalid rows (unless on_invalid: skip), no rows left, impossible split.
    """
    problems: list[Problem] = []
    train, fmt = read_rows(cfg.train, "data.train", cfg.format, problems)
    splits: dict[str, list[Record]] = {"train": train, "validation": [], "test": []}
    if isinstance(cfg.validation, (str, list)):
        splits["validation"], fmt = read_rows(cfg.validation, "data.validation", cfg.format or fmt, problems)
    if cfg.test is not None:
        splits["test"], fmt = read_rows(cfg.test, "data.test", cfg.format or fmt, problems)
    if fmt is None:
        if problems:
            fail_on(problems)
        raise TunelabError("data.train: the data files contain no rows; add rows to the training file")
    files = {name: i for i, name in enumerate(dict.fromkeys(p.file for p in problems))}
    problems.sort(key=lambda p: (files[p.file], p.line or 0))  # reading and validating find them in two passes
    if problems and cfg.on_invalid == "error":
        fail_on(problems)
    removed = [Removed(p.where, "invalid", p.text.removeprefix(p.where + ": ")) for p in problems]
    n_read = sum(len(v) for v in splits.values()) + len(problems)
    steps: list[dict] = [{"step": "read", "rows": n_read, "invalid": len(problems), "valid": n_read - len(problems)}]
    warnings: list[str] = []
    if problems:
        warnings.append(f"skipped {len(problems)} invalid row(s) (data.on_invalid: skip); first: {problems[0].text}")

    if cfg.clean is not None:
        steps.append(clean_step(splits, cfg, fmt, removed))
    if cfg.pii is not None:
        steps.append(pii_step(splits, cfg))
    if cfg.dedupe is not None:
        counts = {"step": "dedupe", "exact": 0, "near": 0}
        for name in SPLITS:
            splits[name], e, n = dedupe_within(splits[name], fmt, cfg, removed)
            counts["exact"] += e
            counts["near"] += n
        counts["leakage_removed"] = leakage(splits, fmt, cfg, removed)
        steps.append(counts)
    else:
        from tunelab.data.dedupe import exact_duplicates

        twin = exact_duplicates(_texts(splits["train"], fmt, with_system=True))
        dups = [(r, splits["train"][t]) for r, t in zip(splits["train"], twin) if t is not None]
        if dups:
            warnings.append(f"{len(dups)} training row(s) repeat an earlier row (first: {dups[0][0].where} repeats "
                            f"{dups[0][1].where}); set data.dedupe: true to remove them")

    if cfg.split is not None:
        s = cfg.split
        rows = splits["train"]
        label_field = s.stratify
        if label_field and rows and not any(label_field in r.row for r in rows):
            raise TunelabError(f"data.split.stratify: no row has the field '{label_field}'; name a field of your rows "
                               f"(e.g. {', '.join(sorted(rows[0].row)[:5])})")
        parts = split_rows(rows, [s.train, s.validation, s.test], s.seed if s.seed is not None else seed, s.stratify, s.group)
        splits = dict(zip(SPLITS, parts))
        steps.append({"step": "split", **{k: len(v) for k, v in splits.items()},
                      "by": f"stratified by {s.stratify}" if s.stratify else f"grouped by {s.group}" if s.group else "random"})
    elif isinstance(cfg.validation, float):
        rows = splits["train"]
        if len(rows) < 2:
            raise TunelabError("data.validation: cannot hold out a fraction of a single training row; add rows or give a file")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[: max(1, round(cfg.validation * len(rows)))])
        splits["validation"] = [r for i, r in enumerate(rows) if i in held]
        splits["train"] = [r for i, r in enumerate(rows) if i not in held]
    if not splits["train"]:
        raise TunelabError("data.train: no training rows left after preparation; check the removed rows and the split")
    if cfg.dedupe is None:
        leaked = leakage(splits, fmt, cfg, removed=None)
        if leaked:
            warnings.append(f"{leaked} training row(s) also appear in validation/test (evaluation would be optimistic); "
                            "set data.dedupe: true to remove them from train")

    if cfg.augment is not None:
        a = cfg.augment
        steps.append(augment_step(splits, cfg, fmt, a.seed if a.seed is not None else seed, load_generator))

    label_field = cfg.split.stratify if cfg.split is not None and cfg.split.stratify else guess_label_field(splits["train"], fmt)
    return PipelineResult(splits, fmt, removed, steps, warnings, label_field)
