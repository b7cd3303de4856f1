"""From the `data:` config to tokenized train/validation sets, batches and a seeded, resumable batch order."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from tunelab.config import DataConfig
from tunelab.data.formats import Example, to_examples
from tunelab.data.readers import read_records
from tunelab.data.tokenize import IGNORE, Encoded, encode_example
from tunelab.errors import TunelabError


@dataclass
class PreparedData:
    train: list[Encoded]
    validation: list[Encoded]
    format: str
    truncated: int
    train_examples: int  # before packing (len(train) counts packed rows)

    @property
    def train_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train)


def load_examples(cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example], str]:
    """Read and validate every row; split off a seeded validation fraction when asked to."""
    train, fmt = to_examples(read_records(cfg.train, "data.train"), cfg.format)
    validation: list[Example] = []
    if isinstance(cfg.validation, float):
        if len(train) < 2:
            raise TunelabError("data.validation: cannot hold out a fraction of a single training row; add rows or give a file")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(cfg.validation * len(train)))
        held = set(order[:n_val])
        validation = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    elif cfg.validation is not None:
        validation, _ = to_examples(read_records(cfg.validation, "data.validation"), cfg.format or fmt)
    return train, validation, fmt


def encode_all(examples: list[Example], tokenizer, cfg: DataConfig) -> list[Encoded]:
    out: list[Encoded] = []
    for ex in examples:
        out.extend(encode_example(ex, tokenizer, cfg.max_length, cfg.train_on_inputs))
    return out


def prepare_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, validate, split and tokenize. Raises TunelabError on the first bad row (file:line)."""
    train_ex, val_ex, fmt = load_examples(cfg, seed)
    train, validation = encode_all(train_ex, tokenizer, cfg), encode_all(val_ex, tokenizer, cfg)
    if not train:
        raise TunelabError("data.train: no trainable examples after tokenization; check the rows")
    truncated, n_train = sum(e.truncated for e in train + validation), len(train)
    if cfg.packing:
        train = pack_examples(train, cfg.max_length)
    return PreparedData(train, validation, fmt, truncated, n_train)


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
