"""The CPU blocked attention (train/attention.py) computes what SDPA computes: outputs and gradients, for causal rows,
padded batches, packed rows (block-diagonal masks), grouped-query heads, fp32 and bf16, one block or several (the last
one partial); and inside a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model

from tunelab.train import attention
from tunelab.train.attention import restore_attention, short_attention_forward, use_short_attention


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, mask, causal):
    """SDPA in fp64 with the key/value heads repeated for each query head."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)


def _masks(kind: str, batch: int, length: int, heads: int):
    if kind in ("causal", "bidirectional"):
        return None
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    lengths = torch.tensor([length - 3 * i for i in range(batch)])
    keep = torch.arange(length)[None] < lengths[:, None]
    padded = (causal[None] & keep[:, None, :])[:, None]
    if kind == "padded":  # right padding: each row attends to its own real tokens
        return padded
    if kind == "additive":  # a float mask, 0 where attended
        return torch.zeros(padded.shape).masked_fill_(~padded, torch.finfo(torch.float32).min)
    if kind == "per_head":  # a mask per query head: head h also hides its first h keys (never a whole row)
        hidden = torch.arange(length)[None, :] < torch.arange(heads)[:, None]
        return padded & ~(hidden[None, :, None, :] & (torch.arange(length) > heads)[None, None, :, None])
    # packed: rows of 5 and the rest, each attending inside itself only
    segment = (torch.arange(length) >= 5).long()
    same = segment[:, None] == segment[None, :]
    return (causal & same)[None, None].expand(batch, 1, length, length)


@pytest.mark.parametrize("mask_kind", ["causal", "padded", "packed", "additive", "per_head", "bidirectional"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [64, 4])  # one block; five, the last holding one row
@pytest.mark.parametrize("kept", [True, False])  # the backward reads the forward's probabilities, or recomputes them
def test_short_attention_equals_sdpa_outputs_and_gradients(mask_kind, heads, kv_heads, dtype, block, kept, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", block)
    monkeypatch.setattr(attention, "SAVE_PROBS_BYTES", attention.SAVE_PROBS_BYTES if kept else 0)
    torch.manual_seed(0)
    batch, length, dim = 3, 17, 8
    q = (torch.randn(batch, heads, length, dim) * 2).to(dtype).requires_grad_()
    k = (torch.randn(batch, kv_heads, length, dim) * 2).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, length, dim).to(dtype).requires_grad_()
    mask = _masks(mask_kind, batch, length, heads)
    grad = torch.randn(batch, length, heads, dim)
    module = _Module()
    module.is_causal = mask_kind != "bidirectional"
    out, weights = short_attention_forward(module, q, k, v, mask, scaling=dim**-0.5)
    assert weights is None and out.shape == (batch, length, heads, dim) and out.dtype == dtype
    out.backward(grad.to(dtype))
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_inputs, mask, causal=module.is_causal)
    ref.backward(grad.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}  # bf16 rounding of inputs and products
    torch.testing.assert_close(out.double(), ref, **tol)
    for mine, theirs in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)


@pytest.mark.parametrize("kept", [True, False])
def test_short_attention_is_no_less_accurate_than_sdpa_in_bf16(kept, monkeypatch):
    """bf16 inputs: the error against exact attention is of the size of SDPA's own (scores are fp32 in both), with the
    probabilities kept from the forward pass in bf16 or recomputed in fp32."""
    monkeypatch.setattr(attention, "SAVE_PROBS_BYTES", attention.SAVE_PROBS_BYTES if kept else 0)
    torch.manual_seed(1)
    q = (torch.randn(2, 6, 40, 16) * 3).bfloat16().requires_grad_()
    k = (torch.randn(2, 2, 40, 16) * 3).bfloat16().requires_grad_()
    v = torch.randn(2, 2, 40, 16).bfloat16().requires_grad_()
    grad = torch.randn(2, 40, 6, 16)
    exact_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = _reference(*exact_inputs, None, causal=True)
    exact.backward(grad.double())
    mine, _ = short_attention_forward(_Module(), q, k, v, None)
    mine.backward(grad.bfloat16())
    mine_grads = [x.grad.double() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    sdpa = F.scaled_dot_product_attention(  # SDPA on the bf16 tensors (key/value heads repeated in autograd)
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    sdpa.transpose(1, 2).backward(grad.bfloat16())
    sdpa_grads = [x.grad.double() for x in (q, k, v)]
    assert (mine.double() - exact).abs().max() <= 2 * (sdpa.transpose(1, 2).double() - exact).abs().max()
    for m, s, e in zip(mine_grads, sdpa_grads, exact_inputs):
        assert (m - e.grad).abs().max() <= 2 * (s - e.grad).abs().max() + 1e-3


def test_unmasked_rows_beyond_the_limit_and_cached_decoding_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or (None, None))
    monkeypatch.setattr(attention, "UNMASKED_MAX_TOKENS", 16)
    q = torch.randn(1, 2, 17, 4)
    short_attention_forward(_Module(), q, q, q, None)
    short_attention_forward(_Module(), torch.randn(1, 2, 1, 4), q, q, None)  # one new token against a KV cache
    short_attention_forward(_Module(), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), None,
                            dropout=0.1)
    assert len(calls) == 3
    out, _ = short_attention_forward(_Module(), q, q, q, torch.ones(1, 1, 17, 17, dtype=torch.bool).tril())
    assert len(calls) == 3 and out.shape == (1, 17, 2, 4)  # a masked row of any length stays


def test_a_model_switched_to_short_attention_gives_sdpa_losses_and_gradients(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", 8)  # 21 tokens: three blocks
    calls = []
    apply = attention._BlockedAttention.apply
    monkeypatch.setattr(attention._BlockedAttention, "apply", lambda *args: calls.append(1) or apply(*args))
    torch.manual_seed(0)
    model = build_tiny_model(97)
    ids = torch.randint(3, 97, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    assert model.config._attn_implementation == "sdpa"
    ref_loss, ref_grads = step()
    previous = use_short_attention(model)
    assert previous == "sdpa" and model.config._attn_implementation == attention.NAME
    loss, grads = step()
    assert len(calls) == 2  # one per layer: the model really ran it
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert "tunelab" not in model.config.to_json_string()  # never saved into a config.json
    restore_attention(model, previous)
    assert model.config._attn_implementation == "sdpa"


def test_only_sdpa_models_are_switched():
    model = build_tiny_model(50)
    model.config._attn_implementation = "eager"
    assert use_short_attention(model) is None and model.config._attn_implementation == "eager"


def test_under_autocast_inputs_are_cast_as_sdpa_casts_them():
    """Rotary embeddings hand attention fp32 queries and keys under autocast; SDPA (an autocast op) runs them in bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    q = torch.randn(2, 4, 12, 8, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, requires_grad=True)
    v = torch.randn(2, 2, 12, 8).bfloat16()
    module = _Module()
    module.num_key_value_groups = 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine, _ = short_attention_forward(module, q, k, v, None)
        sdpa, _ = sdpa_attention_forward(module, q, k, v, None)
    assert mine.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(mine.float(), sdpa.float(), rtol=0.02, atol=0.02)
    mine.float().sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32  # gradients return in the inputs' dtype


def test_short_rows_keep_their_probabilities_and_long_ones_recompute_them(monkeypatch):
    q = torch.randn(3, 2, 70, 8, requires_grad=True)  # 3 key/value heads x 2 query heads, two blocks of 64 and 6 rows
    k, v = torch.randn(3, 70, 8, requires_grad=True), torch.randn(3, 70, 8, requires_grad=True)
    out = attention._BlockedAttention.apply(q, k, v, None, 0.3, True, 3)
    assert len(out.grad_fn.saved_tensors) == 4 + 2  # q, k, v, out and one probability block per query block
    probs = 3 * 2 * (64 * 64 + 6 * 70) * 4  # causal blocks: keys 0:64, then 0:70
    monkeypatch.setattr(attention, "SAVE_PROBS_BYTES", probs - 1)
    assert len(attention._BlockedAttention.apply(q, k, v, None, 0.3, True, 3).grad_fn.saved_tensors) == 4
