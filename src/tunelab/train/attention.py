"""Attention on a CPU as matmuls over blocks of query rows, instead of torch's flash kernel.

A block of `BLOCK` query rows (for every head of a key/value group at once) meets only the keys it can see: with a
causal mask the rows of block i need keys 0..end of block i, so about half the score matrix is never computed, and
each block's fp32 scores (576 x at most a few thousand) stay in the cache. The softmax is one fused kernel per block.
Short rows keep each block's bf16 probabilities for the backward pass (at most `SAVE_PROBS_BYTES` per call); longer
rows recompute them there, so, as with flash attention, nothing of size seq x seq is kept for them. torch's CPU flash
kernel works through rows in smaller tiles, and with an explicit mask (any padded or packed batch) it cannot skip the
masked half. Measured on one core before the probabilities were kept, which then ran 1.19-1.42x faster for rows of
128-512 tokens (9 query / 3 key-value heads of 64, bf16; forward + backward,
ms; `python bench/attention.py`, whose numbers swing run to run): one 512-token row 20.0 against SDPA's 27.6, one
1024-token row 63 against 67, two padded 256-token rows 14.1 against 18.1, two padded 1024-token rows 156 against 202;
forward alone 7.8 against 8.4 (512) and 21.3 against 24.2 (1024), but 0.7-0.8x SDPA's speed for short padded
batches. Unmasked rows above `UNMASKED_MAX_TOKENS`, where SDPA's causal kernel is as fast, go to transformers' SDPA
path unchanged, as do decoding steps (one query row against a KV cache), dropout,
soft-capping, sliding windows and attention sinks. Queries after a cached prefix (`loss.SharedPrefix`) see its keys too.

Precision: the scores (q k^T) and the gradient of the probabilities (dO v^T) are computed in fp32 from the bf16 inputs, as
the flash kernel does; the probabilities meet v, and the gradients meet k and q, in the input dtype with fp32
accumulation (kept probabilities are those input-dtype ones); the key and value gradients sum over the blocks in fp32. Under autocast q, k and v are cast to the
autocast dtype first, as autocast casts SDPA's inputs.

Without gradients, in bf16, with no mask beyond the causal one (evaluation, a prompt's prefill), a compiled kernel runs
instead where it can be built (`kernels.attention`, AVX512-BF16 CPUs), for unmasked rows of any length: scores,
softmax and the weighted values in one pass per block of 8 query rows, at the same precision. One core, 9 query / 3
key-value heads of 64, forward, ms per call (`python bench/attention.py`): one 128-token row 0.23 against SDPA's 0.69,
512 tokens 2.03 against 8.17, 1024 tokens 7.55 against 22.9, 2048 tokens 29.5 against 77.6; against the blocked path
here, 300 tokens 0.74 against 2.1 and 500 tokens 1.9 against 4.6.

Registered with transformers as the attention implementation "tunelab_cpu"; `use_short_attention(model)` switches a
model that runs SDPA to it and `restore_attention(model, previous)` switches it back.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.train import kernels

NAME = "tunelab_cpu"
BLOCK = 64  # query rows per block: 32 and 128-256 ran slower (one core; 128-1024-token rows)
UNMASKED_MAX_TOKENS = 1024  # longer rows with no mask: SDPA's causal kernel was as fast (2048: 238 ms against 217)
SAVE_PROBS_BYTES = 4 << 20  # per call: probabilities up to this size are kept for the backward pass, larger recomputed
_NEG = torch.finfo(torch.float32).min  # not -inf: a row with nothing to attend to gets uniform weights, not NaN


class _BlockedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v for q [N, G, S, D] and k, v [N, P + S, D] (N = batch x kv_heads, G query heads
    per key/value head, P keys of a cached prefix before the queries' own), the output shaped as q.

    Grouped-query attention arrives with the query heads of one key/value head side by side, so k and v are never
    repeated and their gradients sum over the group in the matmuls themselves. `mask` is None (causal when `causal`,
    else none) or an additive fp32 bias broadcastable to [batch, heads, S, P + S] (`_bias`)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, kv_heads):
        with torch.autocast("cpu", enabled=False):  # the dtypes below are chosen, not autocast's (bmm: bf16)
            n, group, length, dim = q.shape
            out = torch.empty_like(q)
            q32, k32 = q.to(torch.float32, copy=True).mul_(scale), k.float()  # the scale on q: one pass over [S, D], not over every score
            blocks = list(_blocks(length, k.shape[1], causal))
            # Short rows keep each block's probabilities (in v's dtype, as they meet v) for the backward pass instead
            # of recomputing them: a few MB per layer, and a fifth of the backward's matmuls and its softmax saved.
            keep = any(ctx.needs_input_grad[:3]) and \
                n * group * sum((end - start) * keys for start, end, keys in blocks) * v.element_size() <= SAVE_PROBS_BYTES
            kept = []
            for start, end, keys in blocks:
                probs = _probabilities(q32, k32, mask, causal, kv_heads, start, end, keys).to(v.dtype)
                out[:, :, start:end] = torch.bmm(probs, v[:, :keys]).view(n, group, end - start, dim)
                if keep:
                    kept.append(probs)
        ctx.save_for_backward(q, k, v, out, *kept)
        ctx.mask, ctx.scale, ctx.causal, ctx.kv_heads = mask, scale, causal, kv_heads
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        q, k, v, out, *kept = ctx.saved_tensors
        n, group, length, dim = q.shape
        grad_out = grad_out.contiguous()
        q32 = None if kept else q.to(torch.float32, copy=True).mul_(ctx.scale)
        k32, v32 = (None if kept else k.float()), v.float()
        grad_out32 = grad_out.float()
        row = (grad_out32 * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) [N, G, S, 1]
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for i, (start, end, keys) in enumerate(_blocks(length, k.shape[1], ctx.causal)):
            rows = end - start
            if kept:
                probs = kept[i]
            else:
                probs = _probabilities(q32, k32, ctx.mask, ctx.causal, ctx.kv_heads, start, end, keys)
            grad_block = grad_out[:, :, start:end].reshape(n, group * rows, dim)
            grad_v[:, :keys] += torch.bmm(probs.to(v.dtype).transpose(1, 2), grad_block)
            grad_probs = torch.bmm(grad_out32[:, :, start:end].reshape(n, group * rows, dim), v32[:, :keys].transpose(1, 2))
            # d scores = P * (dP - rowsum(dO * O)); the scale joins at the end, on grad_q and grad_k
            grad_probs.view(n, group, rows, keys).sub_(row[:, :, start:end])
            grad_scores = grad_probs.mul_(probs).to(q.dtype)
            grad_q[:, :, start:end] = torch.bmm(grad_scores, k[:, :keys]).view(n, group, rows, dim)
            grad_k[:, :keys] += torch.bmm(grad_scores.transpose(1, 2), q[:, :, start:end].reshape(n, group * rows, dim))
        grad_q.mul_(ctx.scale)
        return grad_q, grad_k.mul_(ctx.scale).to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def _blocks(length: int, keys: int, causal: bool):
    """(first row, end row, keys seen) of each block of `length` query rows that come after `keys - length` cached ones."""
    offset = keys - length
    for start in range(0, length, BLOCK):
        end = min(start + BLOCK, length)
        yield start, end, offset + end if causal else keys


def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool, kv_heads: int,
                   start: int, end: int, keys: int) -> torch.Tensor:
    """fp32 softmax(q k^T + mask) of query rows start:end against keys 0:keys, as [N, G x rows, keys] (q scaled)."""
    n, group, _, dim = q.shape
    rows = end - start
    scores = torch.bmm(q[:, :, start:end].reshape(n, group * rows, dim), k[:, :keys].transpose(1, 2))
    blocked = scores.view(n, group, rows, keys)
    if mask is None:
        if causal:  # keys beyond the block are already cut; only the diagonal square needs its upper triangle masked
            blocked[..., keys - rows:] += _upper(rows, q.device)
    else:
        part = mask[..., start:end, :keys]  # additive fp32 [batch or 1, heads or 1, rows, keys]
        part = part.unsqueeze(2) if part.shape[1] == 1 else part.reshape(part.shape[0], kv_heads, group, rows, keys)
        blocked.view(n // kv_heads, kv_heads, group, rows, keys).add_(part)
    return torch.softmax(scores, dim=-1)


@functools.cache
def _upper(rows: int, device: torch.device) -> torch.Tensor:
    """[rows, rows] fp32: 0 on and below the diagonal, the most negative float above."""
    return torch.full((rows, rows), _NEG, device=device).triu_(1)


def _bias(mask: torch.Tensor | None, length: int, keys: int) -> torch.Tensor | None:
    """The mask as an additive fp32 bias, or None where it is exactly causal (every row, after a cached prefix of
    `keys - length`): the causal blocks need no mask then. Worked out once per mask tensor (the layers share one)."""
    if mask is None:
        return None
    cached = getattr(mask, "_tunelab_bias", None)
    if cached is not None and cached[0] == mask._version:
        return cached[1]
    if mask.dtype == torch.bool:
        causal = torch.ones(length, keys, dtype=torch.bool, device=mask.device).tril_(keys - length)
        bias = None if torch.equal(mask, causal.expand(mask.shape)) else \
            torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, _NEG)
    else:
        bias = mask.float()
    mask._tunelab_bias = (mask._version, bias)
    return bias


def short_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, S, D], key/value [B, H_kv, S, D] -> ([B, S, H, D], None)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    long_row = attention_mask is None and length > UNMASKED_MAX_TOKENS and not _fused(query, key, value)
    if (query.device.type != "cpu" or long_row
            or key.shape[2] < length or (length == 1 and key.shape[2] > 1) or dropout > 0.0
            or heads % kv_heads or value.shape[-1] != dim or torch.compiler.is_compiling()
            or any(kwargs.get(name) is not None for name in ("softcap", "sliding_window", "s_aux", "position_bias", "cache"))
            or kwargs.get("output_attentions")
            or (attention_mask is not None and tuple(attention_mask.shape[-2:]) != (length, key.shape[2]))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if torch.is_autocast_enabled("cpu"):  # as autocast casts SDPA's inputs (rotary embeddings leave q, k in fp32)
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    group = heads // kv_heads
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and length > 1
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(batch * kv_heads, group, length, dim)  # a key/value head's query heads side by side
    k = key.reshape(batch * kv_heads, key.shape[2], dim)  # a cached prefix's keys first (key.shape[2] > length)
    v = value.reshape(batch * kv_heads, key.shape[2], dim)
    bias = _bias(attention_mask, length, key.shape[2])
    causal = causal or (attention_mask is not None and bias is None)  # a mask that is exactly causal
    out = kernels.attention(q, k, v, scale, causal) if bias is None and _fused(q, k, v) else None
    if out is None:
        out = _BlockedAttention.apply(q, k, v, bias, scale, causal, kv_heads)
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the compiled kernel may take these (after autocast's cast): no gradients, bf16, a head size it has.
    Unmasked rows of any length then go to it, SDPA's causal kernel being 2-3x slower in the forward pass."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))) and \
        kernels.attention_applies(dtype, query.shape[-1])


AttentionInterface.register(NAME, short_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_short_attention(model: torch.nn.Module) -> str | None:
    """Switch a model that runs transformers' SDPA attention to `short_attention_forward`; returns the implementation it
    had (for `restore_attention`), or None when the model was left alone (another implementation, or none to switch)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    _set_implementation(model, NAME)
    return "sdpa"


def restore_attention(model: torch.nn.Module, previous: str | None) -> None:
    if previous is not None:
        _set_implementation(model, previous)


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    """Every config in the model (a PEFT wrapper's base model, multimodal sub-configs) to `name`."""
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            config._attn_implementation = name
