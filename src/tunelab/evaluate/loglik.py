"""Log-likelihood scoring of continuations: the engine behind multiple-choice benchmarks and label scoring.

    items = [MCItem(context="Question: 2+2?\nAnswer:", choices=[" 3", " 4"], gold=1, id="f.jsonl:1")]
    scores = score_items(model, tokenizer, items)      # per item: one summed log-probability per choice

Matches lm-evaluation-harness's `loglikelihood` for HF causal models: trailing whitespace of the context moves to the
continuation, the continuation's tokens are those of tokenize(context + continuation) after tokenize(context), no
special tokens, no chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from tunelab.train.loss import logits_where


@dataclass
class MCItem:
    """One multiple-choice question, ready to score: the context (prompt template and few-shot examples applied) and
    each choice as the exact continuation text (target delimiter included, e.g. " Paris")."""

    context: str
    choices: list[str]
    gold: int | list[int]  # the correct choice; a list of correct choices for TruthfulQA MC2-style items
    id: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class Encoded:
    context: list[int]
    continuations: list[list[int]]


def encode_item(tokenizer, item: MCItem, max_length: int) -> Encoded:
    """Token ids the way lm-eval's HFLM `_encode_pair` makes them, sharing the context across choices."""
    context = item.context
    n_spaces = len(context) - len(context.rstrip())
    moved = context[len(context) - n_spaces :] if n_spaces else ""
    context = context[: len(context) - n_spaces] if n_spaces else context
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not ctx:  # lm-eval conditions an empty context on the end-of-text token
        ctx = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id]
        conts = [tokenizer(moved + c, add_special_tokens=False)["input_ids"] for c in item.choices]
    else:
        conts = []
        for choice in item.choices:
            whole = tokenizer(context + moved + choice, add_special_tokens=False)["input_ids"]
            conts.append(whole[len(ctx) :])
    longest = max(len(c) for c in conts)
    if len(ctx) + longest > max_length:  # like lm-eval: keep the end of the context
        ctx = ctx[-(max_length - longest) :] if max_length > longest else ctx[-1:]
    return Encoded(ctx, conts)


def _log_softmax_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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


@torch.no_grad()
def score_items(model, tokenizer, items: list[MCItem], batch_size: int = 16, dtype: torch.dtype | None = None,
                progress=None, token_budget: int = 256, prefix_budget: int = 1024) -> list[list[float]]:
    """The summed log-probability of every choice's continuation given its context, per item.

    Each context runs through the model once (left-padded batches, sorted by length, logits only at the last position);
    its KV cache is then repeated for the item's choices, and only the continuation tokens run again, in chunks of
    choices of similar length holding about `token_budget` tokens each. lm-eval instead
    runs context + choice once per choice and computes the vocabulary projection at every position.
    """
    device = next(model.parameters()).device
    max_length = getattr(model.config, "max_position_embeddings", 2048) or 2048
    encoded = [encode_item(tokenizer, it, max_length) for it in items]
    order = sorted(range(len(items)), key=lambda i: -(len(encoded[i].context) + max(map(len, encoded[i].continuations))))
    scores: list[list[float]] = [[] for _ in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    # Context batches hold at most batch_size items and about prefix_budget tokens: on a CPU, several mid-sized
    # forwards beat one large one (8 MMLU contexts of ~120 tokens ran 10-15% faster than 16).
    for batch in budget_chunks(order, [len(e.context) for e in encoded], prefix_budget, batch_size):
        ctxs = [encoded[i].context for i in batch]
        width = max(map(len, ctxs))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ctx in enumerate(ctxs):
            ids[row, width - len(ctx) :] = torch.tensor(ctx)
            mask[row, width - len(ctx) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with autocast:
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        # One row per (item, choice): the first token's log-prob from `last`, the rest from passes over the continuations.
        rows = [(r, i, c) for r, i in enumerate(batch) for c in range(len(encoded[i].continuations))]
        totals = torch.stack([last[r, encoded[i].continuations[c][0]] for r, i, c in rows]).cpu()
        prefix = [(layer.keys, layer.values) for layer in cache.layers]
        row_conts = [encoded[i].continuations[c] for _, i, c in rows]
        # Rows sorted by continuation length and cut into chunks, so a long ending does not pad every other row.
        by_length = sorted((k for k in range(len(rows)) if len(row_conts[k]) > 1), key=lambda k: -len(row_conts[k]))
        for chunk in budget_chunks(by_length, [len(c) for c in row_conts], token_budget):
            conts = [row_conts[k] for k in chunk]
            width_c = max(len(c) for c in conts) - 1
            index = torch.tensor([rows[k][0] for k in chunk])
            sub = DynamicCache()
            for layer_idx, (keys, values) in enumerate(prefix):
                sub.update(keys[index.to(keys.device)], values[index.to(values.device)], layer_idx)
            cont_ids = torch.full((len(chunk), width_c), pad, dtype=torch.long)
            cont_mask = torch.zeros((len(chunk), width_c), dtype=torch.long)
            targets = torch.zeros((len(chunk), width_c), dtype=torch.long)
            for row, cont in enumerate(conts):
                n = len(cont) - 1
                cont_ids[row, :n] = torch.tensor(cont[:-1])
                targets[row, :n] = torch.tensor(cont[1:])
                cont_mask[row, :n] = 1
            full_mask = torch.cat([mask[index], cont_mask], dim=1)
            cont_positions = mask[index].sum(-1, keepdim=True) + torch.arange(width_c).unsqueeze(0)
            inputs = {"input_ids": cont_ids.to(device), "attention_mask": full_mask.to(device),
                      "position_ids": cont_positions.to(device), "past_key_values": sub, "use_cache": True}
            keep = cont_mask.bool()
            with autocast:
                logits = logits_where(model, inputs, keep.to(device))  # the vocabulary projection only on scored tokens
            logp = _log_softmax_at(logits, targets[keep].to(device)).cpu()
            owner = torch.tensor(chunk).unsqueeze(1).expand_as(keep)[keep]
            totals.index_add_(0, owner, logp)
        for (_, i, _), value in zip(rows, totals.tolist()):
            scores[i].append(value)
        if progress is not None:
            progress(len(batch))
    return scores


@torch.no_grad()
def score_items_reference(model, tokenizer, items: list[MCItem]) -> list[list[float]]:
    """One unbatched forward per (context, choice), exactly as lm-eval computes it: the ground truth in tests."""
    device = next(model.parameters()).device
    max_length = getattr(model.config, "max_position_embeddings", 2048) or 2048
    scores = []
    for item in items:
        enc = encode_item(tokenizer, item, max_length)
        row = []
        for cont in enc.continuations:
            ids = torch.tensor((enc.context + cont)[:-1], device=device).unsqueeze(0)
            logits = model(input_ids=ids).logits[0, len(enc.context) - 1 :]
            row.append(float(_log_softmax_at(logits, torch.tensor(cont, device=device)).sum()))
        scores.append(row)
    return scores


def multiple_choice_metrics(items: list[MCItem], scores: list[list[float]]) -> dict:
    """acc and acc_norm as lm-eval computes them (acc_norm divides by each choice's length in characters, without the
    target delimiter); items with a list of golds score lm-eval's TruthfulQA MC2: the probability mass on true choices."""
    acc = acc_norm = mc2 = 0.0
    n_single = n_multi = 0
    for item, ll in zip(items, scores):
        lls = np.array(ll)
        if isinstance(item.gold, list):
            p = np.exp(lls - lls.max())
            mc2 += float(p[item.gold].sum() / p.sum())
            n_multi += 1
            continue
        lengths = np.array(item.meta.get("norm_lengths") or [len(c.lstrip()) or 1 for c in item.choices], dtype=float)
        acc += float(int(np.argmax(lls)) == item.gold)
        acc_norm += float(int(np.argmax(lls / lengths)) == item.gold)
        n_single += 1
    out: dict = {"n": len(items)}
    if n_single:
        out.update(acc=acc / n_single, acc_norm=acc_norm / n_single)
    if n_multi:
        out["mc2"] = mc2 / n_multi
    return out
