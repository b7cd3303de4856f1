"""Evaluation runs a prefix that every row shares once (loss.SharedPrefix), and right-padded batches without a mask
(loss.right_padded): both give the losses of the plain batched pass, with transformers' SDPA and tunelab's CPU attention;
and the prefix is only used where it is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model

from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.train.attention import restore_attention, short_attention_forward, use_short_attention
from tunelab.train.loop import loss_totals
from tunelab.train.loss import MIN_SHARED_PREFIX, SharedPrefix, causal_lm_loss, right_padded

PREFIX = [5, 9, 14, 3, 22, 31, 7, 40, 11, 12, 13]  # a "system prompt": never scored


def _rows(n: int = 9, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 97, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        reply = torch.randint(3, 97, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        ids = PREFIX + prompt + reply
        rows.append(Encoded(ids, [IGNORE] * (len(PREFIX) + len(prompt)) + reply, f"r{i}"))
    return rows


def test_common_length_stops_at_a_difference_a_trained_label_or_packing():
    rows = _rows()
    assert SharedPrefix.common_length(rows) == len(PREFIX)
    other = Encoded(PREFIX[:9] + [50, 51, 52], [IGNORE] * 10 + [51, 52], "x")
    assert SharedPrefix.common_length([*rows, other]) == 9  # the rows differ after 9 tokens
    scored = Encoded(PREFIX + [50], [IGNORE] * 6 + PREFIX[6:] + [50], "x")
    assert SharedPrefix.common_length([*rows, scored]) == 0  # its 7th token is a target: only 5 shareable, too few
    short = Encoded(PREFIX[:MIN_SHARED_PREFIX], [IGNORE] * (MIN_SHARED_PREFIX - 1) + [PREFIX[MIN_SHARED_PREFIX - 1]], "x")
    assert SharedPrefix.common_length([*rows, short]) == 0  # one token of every row must stay: 7 < the minimum
    packed = Encoded(rows[0].input_ids, rows[0].labels, "x", position_ids=list(range(len(rows[0].input_ids))))
    assert SharedPrefix.common_length([*rows, packed]) == 0


@pytest.mark.parametrize("attention", ["sdpa", "tunelab_cpu"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_evaluation_with_the_shared_prefix_gives_the_plain_losses(attention, dtype, monkeypatch):
    model = build_tiny_model(97, seed=1)
    if attention == "tunelab_cpu":
        use_short_attention(model)
    rows = _rows(11)
    cpu = torch.device("cpu")
    found = []
    find = SharedPrefix.find.__func__
    monkeypatch.setattr(SharedPrefix, "find", classmethod(lambda cls, *a: found.append(find(cls, *a)) or found[-1]))
    total, count = loss_totals(model, rows, 4, 0, cpu, dtype)
    assert found and found[0] is not None and found[0].length == len(PREFIX)
    monkeypatch.setattr(SharedPrefix, "find", classmethod(lambda cls, *a: None))
    ref_total, ref_count = loss_totals(model, rows, 4, 0, cpu, dtype)
    assert count == ref_count == sum(sum(label != IGNORE for label in r.labels[1:]) for r in rows)
    assert total == pytest.approx(ref_total, rel=1e-5 if dtype is None else 2e-3)
    # and the one-row-at-a-time loss of the model's own forward
    naive = sum(float(model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels])).loss)
                * sum(label != IGNORE for label in r.labels[1:]) for r in rows)
    assert total == pytest.approx(naive, rel=1e-5 if dtype is None else 2e-3)
    restore_attention(model, "sdpa" if attention == "tunelab_cpu" else None)


def test_no_prefix_while_training_or_for_a_single_row():
    model = build_tiny_model(97)
    rows = _rows(3)
    with torch.enable_grad():
        assert SharedPrefix.find(model, rows, torch.device("cpu")) is None  # gradients: every row runs whole
    with torch.no_grad():
        assert SharedPrefix.find(model, rows[:1], torch.device("cpu")) is None
        assert SharedPrefix.find(model, rows, torch.device("cpu")) is not None


def test_right_padded_masks():
    assert right_padded(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole
    assert not right_padded(torch.ones(2, 3, dtype=torch.bool))  # not a 0/1 token mask


def test_a_right_padded_batch_runs_without_a_mask_and_keeps_its_loss(monkeypatch):
    model = build_tiny_model(97, seed=2)
    rows = _rows(4, seed=3)
    from tunelab.data.dataset import collate

    batch = collate(rows, 0)
    seen = []
    decoder_forward = type(model.model).forward
    monkeypatch.setattr(type(model.model), "forward", lambda self, **kw: seen.append("attention_mask" in kw) or decoder_forward(self, **kw))
    with torch.no_grad():
        loss, n = causal_lm_loss(model, batch)
    assert seen == [False]
    monkeypatch.undo()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss / n, ref, rtol=1e-5, atol=1e-6)


class _Layer(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("mask", ["none", "causal", "padded"])
def test_attention_after_a_cached_prefix_equals_sdpa(mask, monkeypatch):
    from tunelab.train import attention

    monkeypatch.setattr(attention, "BLOCK", 4)
    torch.manual_seed(0)
    batch, prefix, length = 2, 6, 11
    keys = prefix + length
    q = torch.randn(batch, 4, length, 8, requires_grad=True)
    k = torch.randn(batch, 2, keys, 8, requires_grad=True)
    v = torch.randn(batch, 2, keys, 8, requires_grad=True)
    allowed = torch.ones(length, keys, dtype=torch.bool).tril(prefix).expand(batch, 1, length, keys).clone()
    if mask == "padded":
        allowed[1, :, :, keys - 3:] = False
    given = None if mask == "none" else allowed
    out, _ = short_attention_forward(_Layer(), q, k, v, given)
    grad = torch.randn_like(out)
    out.backward(grad)
    mine = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed)
    ref.transpose(1, 2).backward(grad)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    for m, t in zip(mine, (q, k, v)):
        torch.testing.assert_close(m, t.grad, rtol=1e-5, atol=1e-5)
