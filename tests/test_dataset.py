"""Batch order: seeded, resumable, and length-grouped without losing or repeating examples."""

from __future__ import annotations

import pytest

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


def _examples(tokenizer, n=7):
    from tunelab.data.formats import Example
    from tunelab.data.tokenize import encode_example

    chats = [encode_example(Example(f"c{i}", [{"role": "user", "content": f"Hello {i}, the quick brown fox?"},
                                              {"role": "assistant", "content": "the lazy dog " * (i % 4 + 1)}]),
                            tokenizer, 128)[0] for i in range(n)]
    texts = encode_example(Example("t", text="Write a haiku about autumn leaves falling slowly. " * 3), tokenizer, 24)
    return chats + texts  # raw text: every token trained, so a leaking first label would change the loss


def test_packing_fits_rows_and_keeps_every_example():
    from tunelab.data.dataset import pack_examples

    examples = [Encoded(list(range(n)), list(range(n)), f"e{n}") for n in (50, 40, 30, 30, 20, 10, 5, 64)]
    packed = pack_examples(examples, 64)
    assert all(len(p.input_ids) <= 64 for p in packed)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    assert len(packed) == 5  # 64 | 50+10 | 40+20 | 30+30 | 5: optimal, each full row has only 4 tokens free
    for p in packed:
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.labels[s] == IGNORE for s in starts)


def test_packed_loss_equals_the_sum_of_unpacked_losses(tiny_tokenizer):
    import torch
    from conftest import build_tiny_model

    from tunelab.data.dataset import pack_examples
    from tunelab.train.loss import causal_lm_loss

    model = build_tiny_model(len(tiny_tokenizer))
    examples = _examples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    one_by_one = [causal_lm_loss(model, collate([e], pad)) for e in examples]
    expected_sum, expected_n = sum(float(loss.detach()) for loss, _ in one_by_one), sum(n for _, n in one_by_one)
    packed = pack_examples(examples, 96)
    assert len(packed) < len(examples)
    loss, n = causal_lm_loss(model, collate(packed, pad))
    assert n == expected_n
    assert float(loss) == pytest.approx(expected_sum, rel=1e-5)
    # Gradients agree too.
    model.zero_grad()
    loss.backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    sum(loss for loss, _ in (causal_lm_loss(model, collate([e], pad)) for e in examples)).backward()
    assert torch.allclose(packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5)
