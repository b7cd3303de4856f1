"""Batch order: seeded, resumable, and length-grouped without losing or repeating examples."""

from __future__ import annotations

from tunelab.data.dataset import batches_of, collate, epoch_order, length_grouped_batches
from tunelab.data.tokenize import IGNORE, Encoded


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(50, 3, 1) == epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 1) != epoch_order(50, 3, 2)
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))


def test_length_grouping_covers_every_example_once_and_cuts_padding():
    lengths = [(i * 37) % 200 + 5 for i in range(400)]
    order = epoch_order(400, 0, 0)
    grouped = length_grouped_batches(order, lengths, 8, 0, 0)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert grouped == length_grouped_batches(order, lengths, 8, 0, 0)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.2 * padding(batches_of(order, 8))


def test_collate_pads_right_with_ignored_labels():
    a = Encoded([5, 6, 7], [IGNORE, 6, 7], "a")
    b = Encoded([8], [8], "b")
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
