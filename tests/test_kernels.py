"""The compiled CPU kernels (train/kernels): built once by the system compiler, as accurate as the PyTorch paths they
replace, used only where they apply, and never required (no compiler, or turned off: the callers keep their path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.train import attention, kernels
from tunelab.train.attention import restore_attention, short_attention_forward, use_short_attention

needs_kernel = pytest.mark.skipif(kernels.attention_bf16() is None, reason="needs a C compiler and an AVX512-BF16 CPU")


def _exact(q, k, v, causal):
    """fp64 attention of q [N, G, S, D] against k, v [N, T, D], the first T - S keys a prefix every query sees."""
    length, keys = q.shape[2], k.shape[1]
    scores = torch.einsum("ngsd,ntd->ngst", q.double(), k.double()) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(length, keys, dtype=torch.bool).tril(keys - length), float("-inf"))
    return torch.einsum("ngst,ntd->ngsd", scores.softmax(-1), v.double())


def _inputs(n, group, length, keys, dim, seed=0):
    torch.manual_seed(seed)
    q = (torch.randn(n, group, length, dim) * 2).bfloat16()
    k = (torch.randn(n, keys, dim) * 2).bfloat16()
    return q, k, torch.randn(n, keys, dim).bfloat16()


@needs_kernel
@pytest.mark.parametrize("n,group,length,keys,dim,causal", [
    (3, 3, 300, 300, 64, True),  # SmolLM2's heads, a long row: many blocks of 8 rows and tiles of 16 keys
    (2, 3, 17, 41, 64, True),  # after a cached prefix of 24 keys; a partial block
    (2, 1, 5, 5, 128, True),  # head size 128, fewer rows than a block
    (3, 3, 33, 33, 64, False),  # bidirectional
    (1, 2, 1, 9, 64, True),  # one query against a prefix
    (1, 1, 8, 8, 64, True),  # exactly one block, one tile
    (2, 2, 70, 70, 128, False),
])
def test_attention_kernel_is_as_accurate_as_the_blocked_attention(n, group, length, keys, dim, causal):
    q, k, v = _inputs(n, group, length, keys, dim)
    exact = _exact(q, k, v, causal)
    mine = kernels.attention(q, k, v, dim**-0.5, causal)
    assert mine is not None and mine.dtype == torch.bfloat16 and mine.shape == q.shape
    with torch.no_grad():
        blocked = attention._BlockedAttention.apply(q, k, v, None, dim**-0.5, causal, n)
    err, blocked_err = (mine.double() - exact).abs(), (blocked.double() - exact).abs()
    assert err.max() <= 1.5 * blocked_err.max() + 1e-3  # both: the bf16 rounding of the output, give or take
    assert err.mean() <= 1.5 * blocked_err.mean() + 1e-4


@needs_kernel
def test_attention_kernel_splits_heads_between_threads_with_the_same_result():
    q, k, v = _inputs(5, 3, 40, 40, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.attention(q, k, v, 0.125, True)
        torch.set_num_threads(2)
        two = kernels.attention(q, k, v, 0.125, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each key/value head is computed alone, whichever thread runs it


def test_attention_kernel_declines_what_it_does_not_compute():
    q, k, v = _inputs(1, 2, 6, 6, 64)
    assert kernels.attention(q.float(), k.float(), v.float(), 0.125, True) is None  # fp32
    q32, k32, v32 = _inputs(1, 2, 6, 6, 32)
    assert kernels.attention(q32, k32, v32, 0.2, True) is None  # head size 32
    assert kernels.attention(q, k[:, :4], v[:, :4], 0.125, True) is None  # fewer keys than queries


class _Module(torch.nn.Module):
    is_causal = True


@needs_kernel
def test_short_attention_uses_the_kernel_only_without_gradients_or_a_mask(monkeypatch):
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 20, 64).bfloat16(), torch.randn(2, 2, 20, 64).bfloat16(), torch.randn(2, 2, 20, 64).bfloat16()
    with torch.no_grad():
        out, _ = short_attention_forward(_Module(), q, k, v, None)
    assert len(calls) == 1 and out.shape == (2, 20, 6, 64)
    exact = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1),
                                           is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out.double(), exact, rtol=0.02, atol=0.02)
    padded = torch.ones(2, 1, 20, 20, dtype=torch.bool).tril()
    padded[1, ..., 15:] = False
    with torch.no_grad():
        short_attention_forward(_Module(), q, k, v, padded)  # a padded batch: the blocked path applies the mask
    short_attention_forward(_Module(), q.requires_grad_(), k, v, None)  # gradients: the blocked path
    assert len(calls) == 1


@needs_kernel
def test_a_model_scores_the_same_with_and_without_the_kernel(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    model.config._attn_implementation = "sdpa"
    use_short_attention(model)
    ids = torch.randint(3, 64, (2, 90))
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(input_ids=ids, labels=ids).loss
        monkeypatch.setattr(kernels, "attention", lambda *a: None)
        blocked = model(input_ids=ids, labels=ids).loss
    restore_attention(model, "sdpa")
    with torch.no_grad():
        exact = model(input_ids=ids, labels=ids).loss  # fp32 SDPA
    assert len(calls) == 2  # one per layer
    assert abs(float(fused) - float(exact)) <= 2 * abs(float(blocked) - float(exact)) + 2e-3


def test_without_a_compiler_or_switched_off_there_is_no_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/bin/false")  # every build fails
    assert kernels.build("attention_bf16", cache=tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    kernels.attention_bf16.cache_clear()
    monkeypatch.setenv("TUNELAB_KERNELS", "0")
    try:
        assert kernels.attention_bf16() is None
        q, k, v = _inputs(1, 1, 4, 4, 64)
        assert kernels.attention(q, k, v, 0.125, True) is None
    finally:
        kernels.attention_bf16.cache_clear()


@needs_kernel
def test_a_kernel_is_built_once_per_source(tmp_path):
    first = kernels.build("attention_bf16", cache=tmp_path)
    assert first is not None and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    assert kernels.build("attention_bf16", cache=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_an_unwritable_cache_means_no_kernel(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert kernels.build("attention_bf16", cache=blocker / "kernels") is None  # its parent is a file


@needs_kernel
def test_long_unmasked_rows_go_to_the_kernel_without_gradients_and_to_sdpa_with_them(monkeypatch):
    sdpa, fused = [], []
    monkeypatch.setattr(attention, "UNMASKED_MAX_TOKENS", 16)
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: sdpa.append(1) or (None, None))
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: fused.append(1) or real(*a))
    q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = short_attention_forward(_Module(), q, k, v, None)
    assert fused == [1] and sdpa == [] and out.dtype == torch.bfloat16
    with torch.no_grad():
        short_attention_forward(_Module(), q, k, v, None)  # fp32: SDPA, as before
    short_attention_forward(_Module(), q.bfloat16().requires_grad_(), k.bfloat16(), v.bfloat16(), None)  # gradients
    assert fused == [1] and sdpa == [1, 1]


@needs_kernel
def test_attention_kernel_on_random_shapes():
    """Every partial block (8 rows), partial key tile (16 and 32 keys), odd key count and prefix length in a seeded
    sample of shapes: as accurate as the blocked path."""
    rng = torch.Generator().manual_seed(7)
    for i in range(40):
        n, group = (int(torch.randint(1, 5, (1,), generator=rng)) for _ in range(2))
        length, prefix = int(torch.randint(1, 70, (1,), generator=rng)), int(torch.randint(0, 40, (1,), generator=rng))
        dim, causal = (64, 128)[i % 2], bool(i % 3)
        q, k, v = _inputs(n, group, length, length + prefix, dim, seed=i)
        exact = _exact(q, k, v, causal)
        mine = kernels.attention(q, k, v, dim**-0.5, causal)
        with torch.no_grad():
            blocked = attention._BlockedAttention.apply(q, k, v, None, dim**-0.5, causal, n)
        err, blocked_err = (mine.double() - exact).abs().max(), (blocked.double() - exact).abs().max()
        assert err <= 1.5 * blocked_err + 1e-3, (n, group, length, prefix, dim, causal, float(err), float(blocked_err))


@needs_kernel
def test_a_forked_process_splits_heads_in_a_pool_of_its_own():
    import multiprocessing

    q, k, v = _inputs(4, 3, 20, 20, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = kernels.attention(q, k, v, 0.125, True)  # the parent's pool exists now
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_attend_with_two_threads, (q, k, v)).get(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(child, expected)


def _attend_with_two_threads(q, k, v):
    torch.set_num_threads(2)
    return kernels.attention(q, k, v, 0.125, True)
