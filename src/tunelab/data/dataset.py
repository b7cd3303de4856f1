"""From the `data:` config to tokenized train/validation sets (prepared once, then cached), batches and a seeded,
resumable batch order."""

from __future__ import annotations

import bisect
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config import DataConfig
from tunelab.data.cache import EncodedTable, data_cache_dir, fingerprint, lookup, save_encoded, store
from tunelab.data.formats import Example, label_names
from tunelab.data.pipeline import SPLITS, Removed, fail_on, run_pipeline
from tunelab.data.readers import Problem
from tunelab.data.report import REPORT_FILES, write_report
from tunelab.data.tokenize import IGNORE, Encoded, encode_example
from tunelab.errors import TunelabError
from tunelab.models.loading import ModelSource


@dataclass
class PreparedData:
    train: Sequence[Encoded]
    validation: Sequence[Encoded]
    format: str
    truncated: int
    train_examples: int  # before packing (len(train) counts packed rows)
    report: dict = field(default_factory=dict)
    files: Path | None = None  # the directory holding the prepared splits and report files
    cache_hit: bool = False
    seconds: float = 0.0
    labels: list[str] | None = None  # format classification: the class names, class id = position


    @property
    def train_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train)

    @property
    def warnings(self) -> list[str]:
        return self.report.get("warnings", [])


def with_progress(items: list, description: str, min_items: int = 2000):
    """Iterate items, with a transient progress bar on a terminal when there are enough of them to wait for."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    if len(items) < min_items or not console.is_terminal:
        return items
    return track(items, description=description, console=console, transient=True)


def encode_all(examples: list[Example], tokenizer, cfg: DataConfig, problems: list[Problem] | None = None,
               name: str = "", labels: list[str] | None = None) -> list[Encoded]:
    """Tokenize examples; a row that cannot be trained is raised, or recorded in `problems` when given. `labels`: the
    class names of a classification dataset (class id = position)."""
    out: list[Encoded] = []
    label_ids = {label: i for i, label in enumerate(labels)} if labels else None
    for ex in with_progress(examples, f"tokenizing {name}".strip()):
        try:
            out.extend(encode_example(ex, tokenizer, cfg.max_length, cfg.train_on_inputs, label_ids))
        except TunelabError as exc:
            if problems is None:
                raise
            file, _, line = ex.source.rpartition(":")
            problems.append(Problem(file, int(line) if line.isdigit() else None, str(exc), "tokenize"))
    return out


def paraphrase_writer(cfg: DataConfig, base: ModelSource | None, tokenizer) -> tuple[Callable[[], tuple], str]:
    """The loader of the model that writes paraphrases (data.augment.model, else the base model) and its name.

    Raises:
        TunelabError: data.augment.model names no model tunelab can find.
    """
    from tunelab.models.loading import load_model, load_tokenizer, resolve_model

    other = cfg.augment.model if cfg.augment is not None else None
    source = resolve_model(other) if other else base

    def load() -> tuple:
        if source is None:
            raise TunelabError("data.augment.paraphrase: no model to write paraphrases; set data.augment.model")
        return load_model(source).eval(), (load_tokenizer(source) if other else tokenizer)

    return load, source.spec if source is not None else ""


def prepare_data(cfg: DataConfig, tokenizer, seed: int, base: ModelSource | None = None) -> PreparedData:
    """Run the data pipeline and tokenize, or load both from the cache when inputs and settings are unchanged.
    `base` is the run's model: it writes paraphrases when data.augment asks for them.

    Raises:
        TunelabError: invalid rows (unless data.on_invalid: skip), nothing left to train on.
    """
    if cfg.tasks:  # multi-task: each task prepared (and cached) on its own, then mixed
        from tunelab.data.mixture import prepare_tasks

        return prepare_tasks(cfg, tokenizer, seed, base)
    start = time.perf_counter()
    load_generator, model_spec = (None, "")
    if cfg.augment is not None and cfg.augment.paraphrase:
        load_generator, model_spec = paraphrase_writer(cfg, base, tokenizer)
    key = fingerprint(cfg, seed, tokenizer, model_spec) if cfg.cache else None
    entry = lookup(key) if key else None
    if entry is not None:
        meta = json.loads((entry / "meta.json").read_text())
        train = EncodedTable(entry / "tokens" / "train.arrow")
        validation = EncodedTable(entry / "tokens" / "validation.arrow")
        report = json.loads((entry / "data_report.json").read_text())
        return PreparedData(train, validation, meta["format"], meta["truncated"], meta["train_examples"], report, entry,
                            cache_hit=True, seconds=time.perf_counter() - start, labels=meta.get("labels"))

    result = run_pipeline(cfg, seed, load_generator)
    problems: list[Problem] = []
    examples = {name: result.examples(name, cfg.system_prompt) for name in SPLITS}
    labels = (label_names(examples["train"], {s: examples[s] for s in SPLITS[1:]})
              if result.format == "classification" else None)
    encoded = {name: encode_all(examples[name], tokenizer, cfg, problems, name, labels) for name in SPLITS}
    if problems:
        if cfg.on_invalid == "error":
            fail_on(problems)
        bad = {p.where for p in problems}
        result.removed += [Removed(p.where, "tokenize", p.text.removeprefix(p.where + ": ")) for p in problems]
        result.splits = {name: [r for r in rows if r.where not in bad] for name, rows in result.splits.items()}
        result.warnings.append(f"skipped {len(problems)} row(s) that cannot be trained (data.on_invalid: skip); first: {problems[0].text}")
    if not encoded["train"]:
        raise TunelabError("data.train: no trainable examples after tokenization; check the rows")
    truncated = sum(e.truncated for e in encoded["train"] + encoded["validation"])
    train = pack_examples(encoded["train"], cfg.max_length) if cfg.packing else encoded["train"]

    build = Path(tempfile.mkdtemp(prefix="prepare-", dir=_build_root(key)))
    report = write_report(result, encoded, cfg.max_length, build)
    (build / "tokens").mkdir()
    save_encoded(build / "tokens" / "train.arrow", train)
    save_encoded(build / "tokens" / "validation.arrow", encoded["validation"])
    meta = {"format": result.format, "truncated": truncated, "train_examples": len(encoded["train"]), "labels": labels}
    (build / "meta.json").write_text(json.dumps(meta))
    files = store(key, build) if key else build
    return PreparedData(train, encoded["validation"], result.format, truncated, len(encoded["train"]), report, files,
                        seconds=time.perf_counter() - start, labels=labels)


def _build_root(key: str | None) -> str | None:
    if key is None:
        return None  # the system temp dir; nothing is cached
    root = data_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def copy_prepared(data: PreparedData, out: Path, splits: bool = True) -> None:
    """Copy the report files (and the prepared split JSONL files) into `out`, e.g. `<run>/data`."""
    if data.files is None and getattr(data, "parts", None):  # data.tasks: each task's files in <out>/<task>
        for name, part in data.parts.items():
            copy_prepared(part, out / name, splits)
        return
    if data.files is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    names = list(REPORT_FILES) + ([f"{s}.jsonl" for s in SPLITS] + ["removed_rows.jsonl"] if splits else [])
    for name in names:
        if (data.files / name).is_file():
            shutil.copyfile(data.files / name, out / name)


def pack_examples(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Pack examples into rows of at most max_length tokens (best fit, longest first; O(n log n)).

    Each example keeps its own positions (restarting at 0), which transformers turns into a block-diagonal causal mask,
    and the first token of each example carries no label, so no example learns from its neighbour: the packed loss
    equals the sum of the examples' own losses.
    """
    rows: list[list[Encoded]] = []
    rooms: list[tuple[int, int]] = []  # (free tokens, row index), kept sorted
    for ex in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(ex.input_ids)
        at = bisect.bisect_left(rooms, (n, -1))  # the row with the least room that still fits
        if at == len(rooms):
            rows.append([ex])
            bisect.insort(rooms, (max_length - n, len(rows) - 1))
        else:
            free, row = rooms.pop(at)
            rows[row].append(ex)
            bisect.insort(rooms, (free - n, row))
    packed = []
    for row in rows:
        ids, labels, positions = [], [], []
        for ex in row:
            ids += ex.input_ids
            labels += [IGNORE] + ex.labels[1:]
            positions += list(range(len(ex.input_ids)))
        packed.append(Encoded(ids, labels, "+".join(e.source for e in row), any(e.truncated for e in row), positions))
    return packed


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so resume can replay it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batches_of(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_batches(order: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of similar-length examples (far less padding), still random: the shuffled order is cut into windows of
    50 batches, each window is sorted by length and cut into batches, and the batches are shuffled (seeded)."""
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(batches_of(chunk, batch_size))
    random.Random(seed * 1_000_003 + epoch + 7).shuffle(batches)
    return batches


def budget_chunks(order: list[int], sizes: Sequence[int], budget: int, most: int | None = None) -> list[list[int]]:
    """Cut `order` (indices, longest first) into consecutive chunks whose length x the size of their first (widest)
    element stays within `budget` tokens, and at most `most` elements."""
    chunks: list[list[int]] = []
    for k in order:
        if chunks and (most is None or len(chunks[-1]) < most) and (len(chunks[-1]) + 1) * sizes[chunks[-1][0]] <= budget:
            chunks[-1].append(k)
        else:
            chunks.append([k])
    return chunks


def token_budget_batches(lengths: list[int], budget: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches holding as many examples of similar length as fit in `budget` padded tokens (`max_tokens_per_batch`).

    Examples are sorted by length once and cut into batches, so every epoch has the same batches (and the same number
    of steps, which the learning-rate schedule needs up front); their order is shuffled per (seed, epoch).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = budget_chunks(order, lengths, budget)
    random.Random(seed * 1_000_003 + epoch + 7).shuffle(batches)
    return batches


def micro_batches(batch: list[int], lengths: list[int], budget: int | None) -> list[list[int]]:
    """Split one batch into micro-batches of at most `budget` padded tokens (longest first; one example at least).
    The loop normalises the loss by the trained tokens of the whole step, so the gradients are those of the batch."""
    if budget is None or len(batch) * max(lengths[i] for i in batch) <= budget:
        return [batch]
    return budget_chunks(sorted(batch, key=lambda i: (-lengths[i], i)), lengths, budget)


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE.

    Packed rows also get `position_ids` (restarting per example; the padding tail counts as one more segment).
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        if positions is not None:
            positions[i, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


def collate_pairs(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs as one batch of 2n rows, `collate`d: the n chosen conversations, then the n rejected ones."""
    chosen = [Encoded(e.input_ids, e.labels, e.source) for e in examples]
    rejected = [Encoded(e.rejected_ids, e.rejected_labels, e.source) for e in examples]
    return collate(chosen + rejected, pad_id)
