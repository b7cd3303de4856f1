"""The log-likelihood engine: shared-context batched scoring equals one plain forward per choice, tokenization follows
lm-eval's rules, and acc / acc_norm / mc2 are computed as lm-eval computes them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from tunelab.evaluate.loglik import (
    MCItem,
    encode_item,
    multiple_choice_metrics,
    score_items,
    score_items_reference,
    shared_prefix_groups,
)

ITEMS = [
    MCItem("Question: what is the capital of France?\nAnswer:", [" Paris", " the lazy dog jumps", " 4"], 0),
    MCItem("The quick brown fox ", ["jumps over", "sleeps"], 0),  # trailing space moves to the continuation
    MCItem("", ["Hello! How can I help", "goodbye"], 1),  # empty context: conditioned on the end-of-text token
    MCItem("def add(a, b): return a + b  # numbers 0 1 2 3", [" 4 5", " 6 7 8 9 ok", "x"], 1),
    MCItem("Extract the ticket as JSON with keys product, category and urgency.", [" {", " no"], 0),
]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(len(tokenizer)).eval(), tokenizer


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_batched_shared_context_scores_equal_one_forward_per_choice(tiny, batch_size: int) -> None:
    model, tokenizer = tiny
    reference = score_items_reference(model, tokenizer, ITEMS)
    got = score_items(model, tokenizer, ITEMS, batch_size=batch_size)
    assert [len(r) for r in got] == [len(it.choices) for it in ITEMS]
    for ref_row, got_row in zip(reference, got):
        assert got_row == pytest.approx(ref_row, abs=1e-4)


HEADER = "Write a haiku about autumn leaves falling slowly to the ground. Hello! How can I help you today?\n\n"
SHOTS = "Question: what is the capital of France?\nAnswer: Paris\n\n"


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_items_sharing_a_header_and_few_shot_examples_score_like_one_forward_per_choice(tiny, batch_size: int) -> None:
    model, tokenizer = tiny
    items = [MCItem(HEADER + SHOTS + q, c, 0) for q, c in [
        ("Question: 2 + 2?\nAnswer:", [" 4", " 5 6 7"]), ("Question: the fox?\nAnswer:", [" jumps over", " sleeps"]),
        ("Question: Hello!\nAnswer:", [" How can I help you today?", " goodbye"]),
    ]] + [MCItem(HEADER + "Question: France?\nAnswer:", [" Paris", " 4"], 0)] + ITEMS
    groups = shared_prefix_groups([encode_item(tokenizer, it, 512).context for it in items])
    shared = [(n, sorted(m)) for n, m in groups if n]
    assert len(shared) == 1 and {0, 1, 2} <= set(shared[0][1]) <= {0, 1, 2, 3}  # the few-shot items (+ the header-only one)
    header_tokens = len(tokenizer(HEADER.rstrip(), add_special_tokens=False)["input_ids"])
    assert shared[0][0] >= header_tokens - 1
    assert sorted(i for _, m in groups for i in m) == list(range(len(items)))
    reference = score_items_reference(model, tokenizer, items)
    got = score_items(model, tokenizer, items, batch_size=batch_size)
    for ref_row, got_row in zip(reference, got):
        assert got_row == pytest.approx(ref_row, abs=1e-4)


def test_shared_prefix_groups_split_where_keeping_the_prefix_no_longer_pays() -> None:
    a, b = list(range(100, 140)), list(range(200, 230))
    contexts = [a + [1, 2], a + [3, 4], a + [5], b + [6], b + [7, 8], [9, 10], [9, 11]]
    groups = {n: sorted(m) for n, m in shared_prefix_groups(contexts)}
    assert groups == {40: [0, 1, 2], 30: [3, 4], 0: [5, 6]}  # a 1-token common prefix is not worth a pass of its own
    assert shared_prefix_groups([a, a]) == [(39, [0, 1])]  # identical contexts keep their last token to run


def test_reference_is_the_sum_of_next_token_log_probs(tiny) -> None:
    model, tokenizer = tiny
    item = ITEMS[0]
    enc = encode_item(tokenizer, item, 512)
    cont = enc.continuations[0]
    ids = torch.tensor([enc.context + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0], dim=-1)
    expected = sum(float(logp[len(enc.context) - 1 + k, tok]) for k, tok in enumerate(cont))
    assert score_items_reference(model, tokenizer, [item])[0][0] == pytest.approx(expected, abs=1e-4)


def test_encoding_moves_context_whitespace_to_the_continuation(tiny) -> None:
    _, tokenizer = tiny
    enc = encode_item(tokenizer, MCItem("The quick brown fox ", ["jumps"], 0), 512)
    assert enc.context == tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    whole = tokenizer("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    assert enc.continuations[0] == whole[len(enc.context):]
    empty = encode_item(tokenizer, MCItem("", ["Hello"], 0), 512)
    assert empty.context == [tokenizer.eos_token_id]


def test_long_contexts_keep_their_end(tiny) -> None:
    _, tokenizer = tiny
    enc = encode_item(tokenizer, MCItem("word " * 300 + "end", [" yes", " no"], 0), 64)
    assert len(enc.context) + max(map(len, enc.continuations)) <= 64
    assert tokenizer.decode(enc.context).endswith("end")


def test_bf16_scores_stay_close_to_fp32(tiny) -> None:
    model, tokenizer = tiny
    fp32 = score_items(model, tokenizer, ITEMS)
    bf16 = score_items(model, tokenizer, ITEMS, dtype=torch.bfloat16)
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.05, abs=0.5)


def test_acc_acc_norm_and_mc2_as_lm_eval_computes_them() -> None:
    items = [
        MCItem("q", [" a", " bbbbbbbb"], 1, meta={"norm_lengths": [1, 8]}),  # raw argmax 0, per-char argmax 1
        MCItem("q", [" yes", " no"], 0),
        MCItem("q", [" t1", " t2", " f1"], [0, 1]),  # mc2: probability mass on the true choices
    ]
    scores = [[-2.0, -8.0], [-1.0, -3.0], [math.log(0.2), math.log(0.3), math.log(0.5)]]
    metrics = multiple_choice_metrics(items, scores)
    assert metrics["acc"] == pytest.approx(0.5)  # item 1 wrong (picks " a"), item 2 right
    assert metrics["acc_norm"] == pytest.approx(1.0)  # -2/1 < -8/8: item 1 right after length normalization
    assert metrics["mc2"] == pytest.approx(0.5)
    assert metrics["n"] == 3
