"""Exact, near and cross-split duplicate detection: realistic near duplicates are caught at 0.85, rows from one template
are not, the threshold is a true Jaccard similarity, keep-first semantics, leakage between splits, and property tests
that every reported index points earlier at a text that really meets the threshold."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from datasketch import MinHash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.dedupe import (
    SHINGLE_SIZE,
    _shingle_hashes,
    _shingle_set,
    _signatures,
    cross_split_matches,
    dedupe_key,
    exact_duplicates,
    near_duplicates,
    shingles,
)

TICKET = "Extract product, category and urgency from this ticket: "
LONG_TEXT = (
    "The museum opened in 1902 in a former railway station on the east bank of the river. Its collection started with "
    "three hundred paintings donated by a local merchant family and grew over the following century to more than forty "
    "thousand objects, including textiles, ceramics, photographs and an important group of early industrial machines. "
    "The building was renovated twice, in 1968 and in 2011, when a glass roof replaced the original iron canopy."
)
REVIEW_TASK = (
    "Summarize the following customer review in one sentence and say whether the customer would recommend the product to "
    "a friend."
)
EMAIL_TASK = (
    "You are a helpful assistant. Read the email below and classify it as spam, promotion, or personal. Reply with only "
    "the label, in lowercase, and do not add any explanation. If the email is empty or unreadable, reply with unknown."
)
EXPENSES = (
    "Explain to a new employee how our expense process works. Receipts must be uploaded within thirty days of the purchase, "
    "each one needs a short description and a project code, and anything above five hundred euros has to be approved by a "
    "manager before it is paid. Reimbursements are made at the end of every month together with the salary."
)

NEAR_DUPLICATE_PAIRS = {
    "20 words, one word changed": (
        "Write a short poem about the ocean at night, focusing on the sound of the waves and the light of the moon.",
        "Write a short poem about the sea at night, focusing on the sound of the waves and the light of the moon.",
    ),
    "20 words, one longer word changed": (REVIEW_TASK, REVIEW_TASK.replace("recommend", "suggest")),
    "40 words, one word changed": (EMAIL_TASK, EMAIL_TASK.replace("helpful", "careful")),
    "60 words, one word changed": (EXPENSES, EXPENSES.replace("euros", "dollars")),
    "casing, punctuation and whitespace": (
        "What's the difference between a list and a tuple in Python?",
        "  what's the DIFFERENCE between a list, and a tuple in python\n",
    ),
    "sentence appended to a long text": (LONG_TEXT, LONG_TEXT + " Visitors under eighteen enter for free."),
}

TEMPLATE_PAIRS = {
    "ticket, different product and order": (
        TICKET + "My desk lamp arrived broken, order 1234",
        TICKET + "My blender stopped working after two days, order 9876",
    ),
    "ticket, similar complaint": (
        TICKET + "My desk lamp arrived broken, order 1234",
        TICKET + "The desk chair arrived broken, order 5678",
    ),
    "translation": ("Translate to French: The weather is nice today.", "Translate to French: I would like a cup of coffee."),
    "sentiment": (
        "Classify the sentiment of this review as positive or negative: The battery lasts all day and the screen is gorgeous.",
        "Classify the sentiment of this review as positive or negative: It broke after a week and support never answered.",
    ),
    "short question": ("What is the capital of France?", "What is the capital of Germany?"),
    "product description": (
        "Write a product description for a stainless steel water bottle that keeps drinks cold for 24 hours.",
        "Write a product description for a bamboo cutting board with a juice groove and non-slip feet.",
    ),
}


def jaccard(first: str, second: str) -> float:
    a, b = shingles(first), shingles(second)
    return len(a & b) / len(a | b)


def test_dedupe_key_ignores_case_unicode_form_whitespace_and_edge_punctuation() -> None:
    assert dedupe_key("  Hello,   WORLD!\n") == "hello world"
    assert dedupe_key("ＡＢＣ　ｄｅｆ") == "abc def"  # fullwidth letters and ideographic space (NFKC)
    assert dedupe_key("Stra\u00dfe") == dedupe_key("STRASSE")  # casefold, not lower
    assert dedupe_key("zero\u200bwidth \ufeffbom") == "zerowidth bom"
    assert dedupe_key("don't stop -- (really) ... e.g.") == "don't stop really e.g"
    assert dedupe_key("") == dedupe_key("   ") == dedupe_key("!!! ...") == ""


def test_shingles_are_character_ngrams_of_the_key() -> None:
    assert shingles("Hello!") == {"hel", "ell", "llo"}
    assert shingles("Hi") == {"hi"}
    assert shingles("...") == set()
    assert shingles("abcd", n=1) == {"a", "b", "c", "d"}
    with pytest.raises(ValueError, match="shingle size must be at least 1, got 0"):
        shingles("abc", n=0)


def test_exact_duplicates_point_at_the_first_occurrence() -> None:
    texts = ["Hello world", "hello, world!", "Something else", "HELLO WORLD", "", "  ", "something else."]
    assert exact_duplicates(texts) == [None, 0, None, 0, None, 4, 2]
    assert exact_duplicates([]) == []


@pytest.mark.parametrize("name", NEAR_DUPLICATE_PAIRS)
def test_realistic_near_duplicates_are_caught(name: str) -> None:
    first, second = NEAR_DUPLICATE_PAIRS[name]
    assert jaccard(first, second) >= 0.85
    assert near_duplicates([first, second]) == [None, 0]
    assert cross_split_matches([first], [second]) == [0]


@pytest.mark.parametrize("name", TEMPLATE_PAIRS)
def test_rows_from_one_template_are_not_duplicates(name: str) -> None:
    first, second = TEMPLATE_PAIRS[name]
    assert jaccard(first, second) < 0.85
    assert near_duplicates([first, second]) == [None, None]
    assert cross_split_matches([first], [second]) == [None]


def test_threshold_is_the_true_jaccard_similarity() -> None:
    first, second = NEAR_DUPLICATE_PAIRS["20 words, one longer word changed"]
    similarity = jaccard(first, second)
    assert near_duplicates([first, second], threshold=similarity) == [None, 0]
    just_above = math.nextafter(similarity, 1.0)
    assert near_duplicates([first, second], threshold=just_above) == [None, None]
    assert cross_split_matches([first], [second], threshold=just_above) == [None]


def test_a_pair_just_below_the_default_threshold_is_kept() -> None:
    # Two words changed in a 20-word instruction: similarity just under 0.85.
    first = "Write a short poem about the ocean at night, focusing on the sound of the waves and the light of the moon."
    second = first.replace("ocean", "sea").replace("poem", "song")
    assert 0.7 < jaccard(first, second) < 0.85
    assert near_duplicates([first, second]) == [None, None]


def test_keep_first_never_uses_a_duplicate_as_representative() -> None:
    base = "Write a short poem about the ocean at night, focusing on the sound of the waves and the light of the moon."
    one_change = base.replace("ocean", "sea")
    two_changes = one_change.replace("poem", "song")
    assert jaccard(base, one_change) >= 0.85 and jaccard(one_change, two_changes) >= 0.85 > jaccard(base, two_changes)
    # two_changes matches only one_change, which is itself a duplicate of base, so two_changes is kept.
    assert near_duplicates([base, one_change, two_changes]) == [None, 0, None]
    # The earliest matching kept text is reported, and exact repeats point where their first copy points.
    assert near_duplicates([base, "Unrelated text about something else entirely.", one_change, one_change.upper()]) == [
        None,
        None,
        0,
        0,
    ]


def test_empty_texts_are_never_near_duplicates() -> None:
    assert near_duplicates(["", "", "   ", "!!!", "..."]) == [None] * 5
    assert near_duplicates([]) == []


def test_planted_near_duplicates_are_all_found_among_random_rows() -> None:
    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    rows = [" ".join(rng.choice(vocabulary) for _ in range(50)) for _ in range(400)]
    planted = {}
    for position in range(20, 400, 20):
        source = rng.choice([row for row in range(position) if row % 20])  # an original row, so `source` is kept
        words = rows[source].split()
        words[rng.randrange(len(words))] = rng.choice(vocabulary)
        rows[position] = " ".join(words)
        planted[position] = source
    found = {position: twin for position, twin in enumerate(near_duplicates(rows)) if twin is not None}
    assert found == planted


def test_same_seed_gives_the_same_result() -> None:
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    assert near_duplicates(texts, seed=7) == near_duplicates(texts, seed=7)
    assert cross_split_matches(texts[:100], texts[100:], seed=7) == cross_split_matches(texts[:100], texts[100:], seed=7)


def test_cross_split_matches_find_rows_leaking_into_evaluation() -> None:
    validation = ["What is the capital of France?", EMAIL_TASK, LONG_TEXT, ""]
    train = [
        "what is the capital of france",  # exact (same key)
        EMAIL_TASK.replace("helpful", "careful"),  # near
        "Translate to French: I would like a cup of coffee.",  # unrelated
        LONG_TEXT + " Visitors under eighteen enter for free.",  # near
        "   ",  # exact twin of the empty reference row
    ]
    assert cross_split_matches(validation, train) == [0, 1, None, 2, 3]
    assert cross_split_matches(validation, train, threshold=None) == [0, None, None, None, 3]
    assert cross_split_matches([], train) == [None] * 5
    assert cross_split_matches(validation, []) == []


def test_cross_split_prefers_an_exact_twin_and_reports_the_first() -> None:
    reference = [EMAIL_TASK.replace("helpful", "careful"), EMAIL_TASK, EMAIL_TASK.lower()]
    assert cross_split_matches(reference, [EMAIL_TASK]) == [1]
    assert cross_split_matches(reference[:1] + reference[2:], [EMAIL_TASK]) == [1]
    assert cross_split_matches(reference[:1], [EMAIL_TASK]) == [0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: near_duplicates(["a"], threshold=0.0), r"threshold must be in \(0, 1\] \(a Jaccard similarity\), got 0.0"),
        (lambda: near_duplicates(["a"], threshold=1.5), r"threshold must be in \(0, 1\].*got 1.5"),
        (lambda: near_duplicates(["a"], num_perm=1), "num_perm must be at least 2, got 1"),
        (lambda: cross_split_matches(["a"], ["b"], threshold=-0.1), r"threshold must be in \(0, 1\].*got -0.1"),
    ],
)
def test_bad_parameters_are_rejected_with_a_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_signatures_match_datasketch_minhash_bit_for_bit() -> None:
    keys = [dedupe_key(text) for text in ("Hello world, this is a test.", "ab", "x" * 50, "Ünïcödé ✓ テキスト and more", "")]
    signatures = _signatures(keys, 128, 7)
    for key, signature in zip(keys, signatures):
        reference = MinHash(num_perm=128, seed=7, hashfunc=int)
        if key:
            reference.update_batch(_shingle_hashes(key).tolist())
        assert np.array_equal(reference.hashvalues, signature), key


text_lists = st.lists(st.text(max_size=40) | st.text(alphabet="ab c.A\u00e9\u0301\u200b", max_size=30), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_lists, st.sampled_from([0.3, 0.6, 0.85, 1.0]))
def test_reported_near_duplicates_point_earlier_at_a_kept_text_that_meets_the_threshold(texts, threshold) -> None:
    result = near_duplicates(texts, threshold=threshold, num_perm=32)
    assert len(result) == len(texts)
    for position, twin in enumerate(result):
        if twin is not None:
            assert 0 <= twin < position
            assert result[twin] is None
            assert jaccard(texts[position], texts[twin]) >= threshold


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_lists, text_lists, st.sampled_from([None, 0.5, 0.85]))
def test_cross_split_matches_are_exact_or_meet_the_threshold(reference, candidates, threshold) -> None:
    result = cross_split_matches(reference, candidates, threshold=threshold, num_perm=32)
    assert len(result) == len(candidates)
    for position, match in enumerate(result):
        if match is not None:
            same_key = dedupe_key(candidates[position]) == dedupe_key(reference[match])
            assert same_key or (threshold is not None and jaccard(candidates[position], reference[match]) >= threshold)
    exact_only = cross_split_matches(reference, candidates, threshold=None)
    assert all(result[position] == match for position, match in enumerate(exact_only) if match is not None)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_packed_shingle_sets_agree_with_shingles(first: str, second: str) -> None:
    first_key, second_key = dedupe_key(first), dedupe_key(second)
    packed_first = _shingle_set(first_key) if first_key else np.array([], dtype=np.uint64)
    packed_second = _shingle_set(second_key) if second_key else np.array([], dtype=np.uint64)
    assert packed_first.size == len(shingles(first, SHINGLE_SIZE))
    shared = np.intersect1d(packed_first, packed_second, assume_unique=True).size
    assert shared == len(shingles(first) & shingles(second))
