"""Log-likelihood scoring of continuations: the engine behind multiple-choice benchmarks and label scoring.

    items = [MCItem(context="Question: 2+2?\nAnswer:", choices=[" 3", " 4"], gold=1, id="f.jsonl:1")]
    scores = score_items(model, tokenizer, items)      # per item: one summed log-probability per choice

Matches lm-evaluation-harness's `loglikelihood` for HF causal models: trailing whitespace of the context moves to the
continuation, the continuation's tokens are those of tokenize(context + continuation) after tokenize(context), no
special tokens, no chat template.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from tunelab.data.dataset import budget_chunks
from tunelab.errors import TunelabError
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


def shared_prefix_groups(contexts: list[list[int]], min_shared: int = 16) -> list[tuple[int, list[int]]]:
    """Group items whose contexts start with the same tokens: [(shared prefix length, item indices)], the items without
    a worthwhile shared prefix in one group of length 0.

    A benchmark's description and fixed few-shot examples (MMLU's per-subject header, any `first_n` few-shot set, a
    user file whose questions all open with one instruction) are then run once per group instead of once per item.
    Contexts are sorted, so items sharing a prefix sit next to each other; a group grows while keeping its prefix pays
    (n items x a shorter prefix still saves more tokens than (n-1) x the longer one), and always leaves each item at least
    its last context token to run.
    """
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    groups: list[tuple[int, list[int]]] = []
    loose: list[int] = []
    members: list[int] = []
    shared = 0

    def close() -> None:
        if len(members) > 1 and shared >= min_shared:
            groups.append((shared, list(members)))
        else:
            loose.extend(members)

    for i in order:
        if not members:
            members, shared = [i], len(contexts[i]) - 1
            continue
        a, b = contexts[members[-1]], contexts[i]
        n = 0
        limit = min(shared, len(b) - 1)
        while n < limit and a[n] == b[n]:
            n += 1
        if n >= min_shared and (len(members) == 1 or len(members) * n >= (len(members) - 1) * shared):
            members.append(i)
            shared = n
        else:
            close()
            members, shared = [i], len(contexts[i]) - 1
    close()
    if loose:
        groups.append((0, sorted(loose)))
    return groups


@torch.no_grad()
def score_items(model, tokenizer, items: list[MCItem], batch_size: int = 16, dtype: torch.dtype | None = None,
                progress=None, token_budget: int = 256, prefix_budget: int = 1024) -> list[list[float]]:
    """The summed log-probability of every choice's continuation given its context, per item.

    Contexts that open with the same tokens share one forward pass of that prefix (`shared_prefix_groups`). The rest
    of each context runs once (left-padded batches after the prefix, sorted by length, logits only at the last
    position); its KV cache is then repeated for the item's choices, and only the continuation tokens run again, in
    chunks of choices of similar length holding about `token_budget` tokens each. lm-eval instead runs context + choice
    once per choice and computes the vocabulary projection at every position.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        # Its virtual tokens live inside PEFT's forward, which the cached-context scoring below does not call.
        raise TunelabError("log-likelihood scoring (benchmarks, label scoring) of a prefix/prompt-tuning run is not "
                           "supported yet; score generation tasks or perplexity, or train with another method")
    device = next(model.parameters()).device
    max_length = getattr(model.config, "max_position_embeddings", 2048) or 2048
    encoded = [encode_item(tokenizer, it, max_length) for it in items]
    scores: list[list[float]] = [[] for _ in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    for shared, members in shared_prefix_groups([e.context for e in encoded]):
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if shared:
            cache = DynamicCache()
            with autocast:
                model(input_ids=torch.tensor([encoded[members[0]].context[:shared]], device=device), past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
            prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        order = sorted(members, key=lambda i: -(len(encoded[i].context) + max(map(len, encoded[i].continuations))))
        # Batches hold at most batch_size items and about prefix_budget tokens: on a CPU, several mid-sized forwards
        # beat one large one (8 MMLU contexts of ~120 tokens ran 10-15% faster than 16).
        for batch in budget_chunks(order, [len(e.context) - shared for e in encoded], prefix_budget, batch_size):
            _score_batch(model, [encoded[i] for i in batch], shared, prefix_kv, pad, device, autocast, token_budget,
                         [scores[i] for i in batch])
            if progress is not None:
                progress(len(batch))
    return scores


def _score_batch(model, batch: list[Encoded], shared: int, prefix_kv: list, pad: int, device, autocast, token_budget: int,
                 out: list[list[float]]) -> None:
    """Score one batch of items whose contexts all start with the `shared` tokens cached in `prefix_kv`; appends each
    item's choice scores to its list in `out`."""
    ctxs = [e.context[shared:] for e in batch]
    width = max(map(len, ctxs))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ctx in enumerate(ctxs):
        ids[row, width - len(ctx) :] = torch.tensor(ctx)
        mask[row, width - len(ctx) :] = 1
    mask = torch.cat([torch.ones((len(batch), shared), dtype=torch.long), mask], dim=1)  # [prefix | left padding | rest]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    cache = DynamicCache()
    for layer_idx, (keys, values) in enumerate(prefix_kv):
        cache.update(keys.expand(len(batch), -1, -1, -1), values.expand(len(batch), -1, -1, -1), layer_idx)
    with autocast:
        out_ = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
    last = torch.log_softmax(out_.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
    # One row per (item, choice): the first token's log-prob from `last`, the rest from passes over the continuations.
    rows = [(r, c) for r, e in enumerate(batch) for c in range(len(e.continuations))]
    totals = torch.stack([last[r, batch[r].continuations[c][0]] for r, c in rows]).cpu()
    context_kv = [(layer.keys, layer.values) for layer in cache.layers]
    row_conts = [batch[r].continuations[c] for r, c in rows]
    # Rows sorted by continuation length and cut into chunks, so a long ending does not pad every other row.
    by_length = sorted((k for k in range(len(rows)) if len(row_conts[k]) > 1), key=lambda k: -len(row_conts[k]))
    for chunk in budget_chunks(by_length, [len(c) for c in row_conts], token_budget):
        conts = [row_conts[k] for k in chunk]
        width_c = max(len(c) for c in conts) - 1
        index = torch.tensor([rows[k][0] for k in chunk])
        sub = DynamicCache()
        for layer_idx, (keys, values) in enumerate(context_kv):
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
    for (r, _), value in zip(rows, totals.tolist()):
        out[r].append(value)


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
