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


def _lora_model(attention: str):
    from tunelab.config import LoraMethod
    from tunelab.methods import attach_method
    from tunelab.train.lora_fused import use_fused_lora

    model = build_tiny_model(97, seed=2, layers=3)
    torch.manual_seed(0)
    model = attach_method(model, LoraMethod(name="lora", r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to differentiate through
            torch.nn.init.normal_(p, std=0.2)
    if attention == "tunelab_cpu":
        use_short_attention(model)
    use_fused_lora(model)
    model.train()
    return model


def _step_gradients(model, rows, micro: list[list[int]], dtype, shared: bool, threads: int = 1):
    """A training step's gradients (each micro-batch's summed loss, backward), with or without the shared prefix."""
    from tunelab.data.dataset import collate
    from tunelab.train.parallel import Workers, backward_in_threads
    from tunelab.train.precision import autocast

    cpu = torch.device("cpu")
    model.zero_grad(set_to_none=True)
    prefix = None
    if shared:
        with autocast(cpu, dtype):
            prefix = SharedPrefix.find(model, rows, cpu, train=True)
        assert prefix is not None and prefix.length == len(PREFIX) and prefix.leaves()
    batches = [collate([prefix.strip(rows[i]) if prefix else rows[i] for i in mb], 0) for mb in micro]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(batch):
        with autocast(cpu, dtype):
            loss, _ = causal_lm_loss(model, batch, prefix)
        return loss, float(loss.detach())

    with Workers(threads) as workers:
        losses = backward_in_threads(loss_of, batches, params + (prefix.leaves() if prefix else []), workers)
    if prefix is not None:
        prefix.backward()
    return sum(losses), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst(grads: dict, ref: dict) -> float:
    """The largest difference of any gradient, relative to that gradient's largest entry."""
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)


@pytest.mark.parametrize("attention", ["sdpa", "tunelab_cpu"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_training_with_the_shared_prefix_gives_the_plain_gradients(attention, dtype, threads):
    model = _lora_model(attention)
    rows = _rows(7, seed=3)
    micro = [[0, 1], [2], [3, 4, 5], [6]]
    loss, grads = _step_gradients(model, rows, micro, dtype, shared=True, threads=threads)
    ref_loss, ref_grads = _step_gradients(model, rows, micro, dtype, shared=False, threads=threads)
    assert loss == pytest.approx(ref_loss, rel=1e-6 if dtype is None else 1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 7 * 2
    # bf16 rounds differently along the two paths: on this tiny model the plain path's own bf16 gradients are ~3% off
    # its fp32 ones
    assert _worst(grads, ref_grads) < (2e-5 if dtype is None else 6e-2)


def test_the_prefix_backward_carries_a_real_share_of_the_gradient(monkeypatch):
    """Without prefix.backward() the gradients are clearly wrong: the comparison above is not vacuous."""
    model = _lora_model("tunelab_cpu")
    rows = _rows(7, seed=3)
    micro = [[0, 1], [2], [3, 4, 5], [6]]
    _, ref = _step_gradients(model, rows, micro, None, shared=False)
    monkeypatch.setattr(SharedPrefix, "backward", lambda self: None)
    _, grads = _step_gradients(model, rows, micro, None, shared=True)
    assert _worst(grads, ref) > 0.05


@pytest.mark.parametrize("threads", [1, 2])
def test_a_run_sharing_the_prefix_repeats_the_plain_run(tiny_model_dir, tmp_path, threads, monkeypatch):
    """training.share_prefix: the rows' common start ("<|im_start|>user\\nSay something about the", 19 tokens) runs once
    per step; losses, gradient norms, evaluation and the token count are those of the run that repeats it per row."""
    import json

    from conftest import alpaca_rows, run_config, write_jsonl

    from tunelab import load_config, train

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))
    found = []
    find = SharedPrefix.find.__func__
    monkeypatch.setattr(SharedPrefix, "find", classmethod(lambda cls, *a, **k: found.append(k) or find(cls, *a, **k)))

    def run(name: str, share: bool):
        cfg = run_config(tiny_model_dir, data, tmp_path / name, method={"name": "lora", "r": 4, "alpha": 8},
                         training={"max_steps": 3, "batch_size": 8, "micro_batch_tokens": 120,
                                   "micro_batch_threads": threads, "share_prefix": share})
        result = train(load_config(cfg), quiet=True)
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "train_loss" in r], result.summary

    shared, summary = run("shared", True)
    assert sum(1 for k in found if k.get("train")) == 3  # once per step
    found.clear()
    plain, plain_summary = run("plain", False)
    assert not any(k.get("train") for k in found)
    assert summary["tokens_trained"] == plain_summary["tokens_trained"] > 0
    assert [r["train_loss"] for r in shared] == pytest.approx([r["train_loss"] for r in plain], rel=1e-5)
    assert [r["grad_norm"] for r in shared] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-4)
    assert summary["final_eval_loss"] == pytest.approx(plain_summary["final_eval_loss"], rel=1e-5)
