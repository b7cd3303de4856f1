"""Mixed training data: several tasks in one run (`data.tasks`) and replay data against forgetting (`continual.replay`).

    data = prepare_data(cfg.data, tokenizer, seed)          # data.tasks: a MixedData; each task prepared (and cached) alone
    data = with_replay(data, cfg, tokenizer, seed)          # continual.replay: the replay rows join the training rows
    data.mixture.epoch_batches(batch_size, seed, epoch)     # the epoch's batches: indices into data.train

How an epoch is laid out (it depends only on (seed, epoch), so a resumed run repeats the uninterrupted run's batches):
an epoch has T example slots, T = the tasks' examples N (N / (1 - fraction) with replay), cut into batches of
batch_size. With replay, batch b gets round(end_b * fraction) - round(start_b * fraction) replay slots (every batch
holds its share to within one example). The other slots go to the tasks in exact counts, target_counts(slots, p) (each
within one slot of slots * p_i), in a seeded random order. Task i's slots read its examples from an endless stream of
seeded permutations (one per pass over the task), and its c_i slots per epoch make epoch e read stream positions
[e * c_i, (e + 1) * c_i): a small task is repeated, a large one is subsampled, and every example of a task comes
round before any repeats. Proportional mixing (p_i = n_i / N) therefore visits every example once per epoch.
Length grouping does not apply to mixed batches (micro-batches still sort by length).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from tunelab.config import DataConfig, RunConfig, TaskConfig
from tunelab.data.dataset import PreparedData, epoch_order, prepare_data
from tunelab.data.pipeline import target_counts
from tunelab.data.tokenize import Encoded
from tunelab.errors import TunelabError
from tunelab.models.loading import ModelSource


class ConcatRows(Sequence[Encoded]):
    """Several sequences of examples read as one (task after task), without copying them."""

    def __init__(self, parts: Sequence[Sequence[Encoded]]) -> None:
        self.parts = list(parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = bisect.bisect_right(self.starts, i) - 1
        return self.parts[part][i - self.starts[part]]

    def lengths(self) -> list[int]:
        """Padded tokens of each example in a batch (as the loop's train_lengths)."""
        out: list[int] = []
        for part in self.parts:
            out += part.lengths() if hasattr(part, "lengths") else [e.batch_tokens for e in part]
        return out


def mixing_probabilities(rule: str, sizes: list[int], weights: list[float | None], temperature: float | None) -> list[float]:
    """The share of a batch's task slots each task gets: proportional n_i / N, weights w_i / sum w (1 when unset),
    temperature n_i^(1/T) / sum (T default 2)."""
    if rule == "weights":
        raw = [1.0 if w is None else float(w) for w in weights]
    elif rule == "temperature":
        raw = [n ** (1.0 / (temperature or 2.0)) for n in sizes]
    else:
        raw = [float(n) for n in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def _round(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass
class Mixture:
    """How batches draw from the tasks (and the replay rows) of a MixedData; see the module docstring."""

    names: list[str]
    sizes: list[int]  # training rows per task; task i's rows are data.train[offset_i : offset_i + size_i]
    probs: list[float]
    replay_size: int = 0  # replay rows, after all the tasks' rows in data.train
    replay_fraction: float = 0.0

    def slots(self) -> int:
        n = sum(self.sizes)
        return math.ceil(n / (1.0 - self.replay_fraction)) if self.replay_size else n

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.slots() / batch_size)

    def replay_per_batch(self, batch_size: int) -> list[int]:
        """Replay slots of each batch of an epoch: the cumulative count is round(slot * fraction) at every batch end."""
        t, f = self.slots(), self.replay_fraction if self.replay_size else 0.0
        ends = [min((b + 1) * batch_size, t) for b in range(self.batches_per_epoch(batch_size))]
        return [_round(end * f) - _round(start * f) for start, end in zip([0] + ends[:-1], ends)]

    def task_counts(self, batch_size: int) -> list[int]:
        """Task slots per epoch, task by task (the same in every epoch)."""
        return target_counts(self.slots() - sum(self.replay_per_batch(batch_size)), self.probs)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The batches of one epoch as indices into data.train (tasks' rows first, then the replay rows)."""
        counts = self.task_counts(batch_size)
        labels = [i for i, c in enumerate(counts) for _ in range(c)]
        random.Random(seed * 1_000_003 + epoch + 11).shuffle(labels)
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        drawn = {i: iter(_stream(self.sizes[i], seed, i, epoch * c, c)) for i, c in enumerate(counts)}
        replay = self.replay_per_batch(batch_size)
        replay_rows = iter(_stream(self.replay_size, seed, len(self.sizes), epoch * sum(replay), sum(replay)))
        replay_offset = sum(self.sizes)
        batches, at = [], 0
        for r in replay:
            n_task = min(batch_size, self.slots() - len(batches) * batch_size) - r
            batch = [offsets[i] + next(drawn[i]) for i in labels[at : at + n_task]]
            batch += [replay_offset + next(replay_rows) for _ in range(r)]
            at += n_task
            batches.append(batch)
        return batches


def _stream(n: int, seed: int, part: int, start: int, count: int) -> list[int]:
    """Positions [start, start + count) of part's endless example stream: pass k is a permutation seeded by (seed, k)."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        k, i = divmod(pos, n)
        order = epoch_order(n, seed * 7919 + 104_729 * (part + 1), k)
        take = min(n - i, count - len(out))
        out += order[i : i + take]
        pos += take
    return out


@dataclass
class MixedData(PreparedData):
    """PreparedData of several parts: `train` and `validation` read the tasks one after another (then replay rows)."""

    mixture: Mixture | None = None
    eval_parts: dict[str, Sequence[Encoded]] = field(default_factory=dict)  # task -> its validation rows (eval_loss/<task>)
    parts: dict[str, PreparedData] = field(default_factory=dict)


def task_data_config(cfg: DataConfig, task: TaskConfig) -> DataConfig:
    """The data section one task is prepared with: its files and format, every other setting shared."""
    return cfg.model_copy(update={"train": task.train, "validation": task.validation, "format": task.format or cfg.format,
                                  "tasks": None, "mixing": None, "temperature": None})


def prepare_tasks(cfg: DataConfig, tokenizer, seed: int, base: ModelSource | None = None) -> MixedData:
    """Prepare each of data.tasks through the data pipeline (each cached on its own) and mix them.

    Raises:
        TunelabError: a task's files or rows are bad (`data.tasks.1 (summaries): ...`), or tasks mix preference pairs
            with other rows.
    """
    parts: dict[str, PreparedData] = {}
    for i, task in enumerate(cfg.tasks or []):
        try:
            parts[task.name] = prepare_data(task_data_config(cfg, task), tokenizer, seed, base)
        except TunelabError as exc:
            raise TunelabError(f"data.tasks.{i} ({task.name}): {exc}") from None
    formats = {name: p.format for name, p in parts.items()}
    pairs = {name for name, fmt in formats.items() if fmt == "preference"}
    if pairs and len(pairs) < len(parts):
        other = next(name for name in parts if name not in pairs)
        raise TunelabError(f"data.tasks: task '{min(pairs)}' holds preference pairs but task '{other}' holds "
                           f"{formats[other]} rows; one run trains on one kind (split them into stages)")
    sizes = [len(p.train) for p in parts.values()]
    probs = mixing_probabilities(cfg.mixing_rule, sizes, [t.weight for t in cfg.tasks or []], cfg.temperature)
    mixture = Mixture(list(parts), sizes, probs)
    return _mixed(parts, mixture, {name: p.validation for name, p in parts.items() if len(p.validation)})


def _mixed(parts: dict[str, PreparedData], mixture: Mixture, eval_parts: dict, extra: Sequence[Encoded] = ()) -> MixedData:
    first = next(iter(parts.values()))
    labels = [p.labels for p in parts.values()]
    warnings = [f"{name}: {w}" for name, p in parts.items() for w in p.warnings]
    report = {"tasks": {name: p.report for name, p in parts.items()}, "warnings": warnings,
              "mixing": dict(zip(mixture.names, (round(p, 6) for p in mixture.probs)))}
    if len(parts) == 1 and not eval_parts:  # one dataset plus replay rows: its own report and files stay the run's
        report = dict(first.report)
    train = ConcatRows([p.train for p in parts.values()] + ([extra] if len(extra) else []))
    validation = ConcatRows([p.validation for p in parts.values()])
    return MixedData(train, validation, first.format, sum(p.truncated for p in parts.values()),
                     sum(p.train_examples for p in parts.values()), report, first.files if len(parts) == 1 else None,
                     cache_hit=all(p.cache_hit for p in parts.values()), seconds=sum(p.seconds for p in parts.values()),
                     labels=labels[0] if all(x == labels[0] for x in labels) else None,
                     mixture=mixture, eval_parts=eval_parts, parts=parts)


def replay_data_config(cfg: DataConfig, spec: str | list[str], fmt: str | None) -> DataConfig:
    """The data section replay files are prepared with: the run's tokenization settings, no held-out split."""
    return cfg.model_copy(update={"train": spec, "validation": None, "test": None, "split": None, "augment": None,
                                  "format": fmt, "tasks": None, "mixing": None, "temperature": None})


def with_replay(data: PreparedData, cfg: RunConfig, tokenizer, seed: int, base: ModelSource | None = None) -> PreparedData:
    """Add continual.replay's rows to the training data: that fraction of every batch comes from them.

    Each entry of replay.data is prepared on its own (so each file keeps its own format, e.g. raw text from a
    pre-training stage beside instruction rows).

    Raises:
        TunelabError: a replay file is missing or bad, or its rows do not suit the method (`continual.replay.data: ...`).
    """
    from tunelab.train.objective import check_data_format

    replay = cfg.continual.replay
    if replay is None:
        return data
    specs = [replay.data] if isinstance(replay.data, str) else list(replay.data)
    rows = []
    for spec in specs:
        try:
            part = prepare_data(replay_data_config(cfg.data, spec, replay.format), tokenizer, seed, base)
            check_data_format(cfg.method, part.format)
        except TunelabError as exc:
            raise TunelabError(f"continual.replay.data ({spec}): {str(exc).removeprefix('data.train: ')}") from None
        rows.append(part.train)
    replay_rows = ConcatRows(rows)
    if isinstance(data, MixedData) and data.mixture is not None:
        parts, eval_parts, m = data.parts, data.eval_parts, data.mixture
        mixture = Mixture(m.names, m.sizes, m.probs, len(replay_rows), replay.fraction)
    else:
        parts, eval_parts = {"train": data}, {}
        mixture = Mixture(["train"], [len(data.train)], [1.0], len(replay_rows), replay.fraction)
    mixed = _mixed(parts, mixture, eval_parts, replay_rows)
    mixed.report["replay_rows"] = len(replay_rows)
    return mixed
