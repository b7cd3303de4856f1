"""Tests for tunelab.data.augment: EDA edits, protected spans, the WordNet reader, and paraphrase filtering.

    pytest -q tests/test_augment.py

No download: synonyms come from a dict, WordNet from a three-synset database written into tmp_path, and the
paraphrasing model is the 2-layer random Llama from conftest.
"""

from __future__ import annotations

import json
import random
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.augment import PARAPHRASE_EXAMPLES, accept_paraphrase, eda, find_protected_spans, paraphrase, wordnet_synonyms
from tunelab.errors import TunelabError

SYNONYMS = {
    "quick": ["fast", "speedy"],
    "brown": ["tan"],
    "jumps": ["leaps", "hops"],
    "lazy": ["idle"],
    "dog": ["hound"],
    "write": ["compose"],
    "short": ["brief"],
    "paris": ["capital"],
}
SENTENCE = "quick brown fox jumps over lazy dog near river bank"  # ten distinct words, five with synonyms


def fake_synonyms(word: str) -> list[str]:
    return SYNONYMS.get(word, [])


def _allowed_count(n_words: int, alpha: float) -> int:
    return max(1, int(alpha * n_words))


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


# ---------------------------------------------------------------------------------------------------------------- EDA


def test_eda_is_deterministic_for_a_seed() -> None:
    outputs = [eda(SENTENCE, random.Random(seed), alpha=0.2, synonyms=fake_synonyms) for seed in range(12)]
    assert outputs == [eda(SENTENCE, random.Random(seed), alpha=0.2, synonyms=fake_synonyms) for seed in range(12)]
    assert len(set(outputs)) > 6


def test_each_operation_changes_the_allowed_number_of_words() -> None:
    words = SENTENCE.split()
    count = _allowed_count(len(words), 0.2)
    seen = Counter()
    for seed in range(80):
        out = eda(SENTENCE, random.Random(seed), alpha=0.2, synonyms=fake_synonyms).split()
        if len(out) == len(words) - count:
            assert _is_subsequence(out, words)
            seen["deletion"] += 1
        elif len(out) == len(words) + count:
            added = list((Counter(out) - Counter(words)).elements())
            assert len(added) == count and _is_subsequence(words, out)
            assert all(any(word in options for options in SYNONYMS.values()) for word in added)
            seen["insertion"] += 1
        elif Counter(out) == Counter(words):
            assert out != words
            seen["swap"] += 1
        else:
            changed = [(before, after) for before, after in zip(words, out) if before != after]
            assert len(out) == len(words) and len(changed) == count
            assert all(after in SYNONYMS[before] for before, after in changed)
            seen["replacement"] += 1
    assert set(seen) == {"deletion", "insertion", "swap", "replacement"}, seen


def test_without_synonyms_only_swap_and_deletion_happen() -> None:
    words = SENTENCE.split()
    for seed in range(30):
        out = eda(SENTENCE, random.Random(seed), alpha=0.1).split()
        assert Counter(out) == Counter(words) or (len(out) == len(words) - 1 and _is_subsequence(out, words))


def test_synonym_keeps_capitalisation_and_names_are_left_alone() -> None:
    only_replacements = {"quick": ["fast"], "paris": ["capital"]}
    outputs = {eda("Quick trip to Paris", random.Random(seed), synonyms=only_replacements.get) for seed in range(40)}
    assert any(out.startswith("Fast trip") for out in outputs)
    assert not any("capital" in out.lower() for out in outputs)  # "Paris" mid-sentence is a name: no synonym edits


def test_swap_and_deletion_keep_sentence_punctuation_in_place() -> None:
    text = "what is the capital of france?"
    for seed in range(30):
        out = eda(text, random.Random(seed), alpha=0.2)
        assert out.endswith("?") and out.count("?") == 1


def test_lines_and_paragraphs_survive() -> None:
    text = "Write a short poem\nabout the sea.\n\nKeep it under ten lines\nplease and thanks."
    for seed in range(40):
        out = eda(text, random.Random(seed), alpha=0.05, synonyms=fake_synonyms)
        assert out.count("\n") == text.count("\n") and out.count("\n\n") == 1, out


def test_single_word_and_nothing_to_edit() -> None:
    for seed in range(10):
        assert eda("hello", random.Random(seed)) == "hello"
        assert eda("<EMAIL>", random.Random(seed), synonyms=fake_synonyms) == "<EMAIL>"
        assert eda("42 https://example.com", random.Random(seed)) == "42 https://example.com"
        assert eda(" \n ", random.Random(seed)) == " \n "
        out = eda("quick", random.Random(seed), synonyms=fake_synonyms)
        assert out in {"fast", "speedy"} or sorted(out.split()) in (["fast", "quick"], ["quick", "speedy"])


def test_alpha_outside_zero_to_one_is_an_error() -> None:
    with pytest.raises(TunelabError, match="alpha must be between 0 and 1"):
        eda(SENTENCE, random.Random(0), alpha=1.5)


def test_find_protected_spans_lists_each_kind() -> None:
    text = ('Send {"id": 7, "tags": ["a", "b}"]} to <EMAIL> or bob@example.com, see https://example.com/x?y=1. '
            "Run `make test` with ${HOME} on 2024-01-31 at 3.5 GHz.")
    spans = find_protected_spans(text)
    for expected in ['{"id": 7, "tags": ["a", "b}"]}', "<EMAIL>", "bob@example.com", "https://example.com/x?y=1",
                     "`make test`", "${HOME}", "2024-01-31", "3.5"]:
        assert expected in spans
    assert "https://example.com/x?y=1." not in spans  # the full stop ends the sentence, not the URL


PLAIN_WORDS = st.sampled_from([*SYNONYMS, "the", "fox", "river", "in", "please", "data", "row"])
PLANTED = st.one_of(
    st.integers(0, 10**9).map(str),
    st.floats(0, 1000, allow_nan=False).map(lambda value: f"{value:.2f}"),
    st.sampled_from(["<EMAIL>", "<PHONE_NUMBER>", "https://example.com/a?b=1&c=2", "www.example.org/path",
                     "jane.doe+x@mail.example.co.uk", "`rm -rf build`", "```\nprint('hi there')\n```", "${API_KEY}",
                     "[1, 2, 3]", "[see the docs]", "%(name)s"]),
    st.dictionaries(st.text("abcxyz ", min_size=1, max_size=5), st.one_of(st.integers(), st.text("ab c", max_size=6)),
                    min_size=1, max_size=3).map(json.dumps),
)
SEPARATORS = st.sampled_from([" ", "  ", "\n", "\n\n", " \n", "\t"])


@st.composite
def texts_with_planted_spans(draw: st.DrawFn) -> tuple[str, int]:
    """(text, number of plain words): plain lowercase words and protected spans, separated by whitespace."""
    pieces = draw(st.lists(st.one_of(PLAIN_WORDS.map(lambda word: (word, True)), PLANTED.map(lambda span: (span, False))),
                           min_size=1, max_size=25))
    text = pieces[0][0]
    for piece, _ in pieces[1:]:
        text += draw(SEPARATORS) + piece
    return text, sum(is_word for _, is_word in pieces)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts_with_planted_spans(), st.integers(0, 2**32), st.sampled_from([0.0, 0.1, 0.3, 1.0]), st.booleans())
def test_planted_spans_survive_and_few_words_change(planted: tuple[str, int], seed: int, alpha: float,
                                                    with_synonyms: bool) -> None:
    text, n_words = planted
    out = eda(text, random.Random(seed), alpha=alpha, synonyms=fake_synonyms if with_synonyms else None)
    assert out.strip()
    assert find_protected_spans(out) == find_protected_spans(text)
    before, after = Counter(text.split()), Counter(out.split())
    changed = sum(((before - after) + (after - before)).values())
    assert changed <= 2 * _allowed_count(n_words, alpha)  # a replacement removes one word and adds one


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from("ab Zé1 .,?!\n{}[]<>`\"'@:/-_$%()"), max_size=60), st.integers(0, 2**32))
def test_arbitrary_text_keeps_its_spans_and_is_never_empty(text: str, seed: int) -> None:
    out = eda(text, random.Random(seed), alpha=0.3, synonyms=fake_synonyms)
    assert out == eda(text, random.Random(seed), alpha=0.3, synonyms=fake_synonyms)
    assert find_protected_spans(out) == find_protected_spans(text)
    if text:
        assert out


# ------------------------------------------------------------------------------------------------------------ WordNet


def test_wordnet_synonyms_returns_a_callable_or_none() -> None:
    synonyms = wordnet_synonyms()
    assert synonyms is None or isinstance(synonyms("car"), list)


def write_mini_wordnet(folder: Path) -> Path:
    """A WordNet database (the format of WordNet 3.x's dict folder) with three synsets, byte offsets and all."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "  1 This software and database is provided by WordNet 3.0 Copyright 2006 by Princeton University.\n"
    synsets = {"noun": [["car", "automobile", "motorcar"], ["big_cat", "cat"]], "adj": [["quick", "fast(a)", "speedy"]],
               "verb": [], "adv": []}
    for pos, groups in synsets.items():
        lines, index, offset = [header], {}, len(header)
        for lemmas in groups:
            words = " ".join(f"{lemma} 0" for lemma in lemmas)
            line = f"{offset:08d} 06 {pos[0]} {len(lemmas):02x} {words} 000 | a gloss\n"
            for lemma in lemmas:
                index.setdefault(lemma.split("(")[0].lower(), []).append(offset)
            lines.append(line)
            offset += len(line.encode())
        (folder / f"data.{pos}").write_text("".join(lines))
        entries = [f"{lemma} {pos[0]} {len(offs)} 0 {len(offs)} 0 {' '.join(f'{o:08d}' for o in offs)}\n"
                   for lemma, offs in sorted(index.items())]
        (folder / f"index.{pos}").write_text(header + "".join(entries))
    return folder


@pytest.mark.parametrize("layout", ["dict folder", "nltk_data folder", "wordnet.zip"])
def test_wordnet_synonyms_reads_a_local_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    if layout == "dict folder":
        location = write_mini_wordnet(tmp_path / "dict")
    elif layout == "nltk_data folder":
        write_mini_wordnet(tmp_path / "nltk_data" / "corpora" / "wordnet")
        location = tmp_path / "nltk_data"
    else:
        source = write_mini_wordnet(tmp_path / "src" / "wordnet")
        location = tmp_path / "wordnet.zip"
        with zipfile.ZipFile(location, "w") as archive:
            for file in source.iterdir():
                archive.write(file, f"wordnet/{file.name}")
    monkeypatch.setenv("TUNELAB_WORDNET", str(location))
    synonyms = wordnet_synonyms()
    assert synonyms is not None and wordnet_synonyms() is synonyms  # parsed once, then cached
    assert synonyms("car") == ["automobile", "motorcar"]
    assert synonyms("Quick") == ["fast", "speedy"]  # the adjective marker "(a)" is dropped
    assert synonyms("cat") == ["big cat"]
    assert synonyms("unknown") == []
    outputs = {eda("a quick car", random.Random(seed), synonyms=synonyms) for seed in range(30)}
    assert any("automobile" in out or "speedy" in out for out in outputs)


def test_wordnet_synonyms_warns_and_returns_none_for_a_bad_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_WORDNET", str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="holds no WordNet database"):
        assert wordnet_synonyms() is None
    bad_offset = write_mini_wordnet(tmp_path / "bad_offset")
    (bad_offset / "index.adv").write_text("slowly r 1 0 1 0 00000003\n")  # points into the middle of a line
    monkeypatch.setenv("TUNELAB_WORDNET", str(bad_offset))
    synonyms = wordnet_synonyms()
    assert synonyms is not None and synonyms("slowly") == [] and synonyms("car") == ["automobile", "motorcar"]
    broken = write_mini_wordnet(tmp_path / "broken")
    (broken / "index.verb").write_text("run v not-a-number\n")
    monkeypatch.setenv("TUNELAB_WORDNET", str(broken))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert wordnet_synonyms() is None
    assert any("ignoring the WordNet" in str(warning.message) for warning in caught)


# --------------------------------------------------------------------------------------------------------- paraphrase

ORIGINAL = "Summarise ticket 4521 from <EMAIL> in 3 bullet points: https://help.example.com/t/4521"


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ("Give 3 bullet points summing up ticket 4521 from <EMAIL>: https://help.example.com/t/4521",
         "Give 3 bullet points summing up ticket 4521 from <EMAIL>: https://help.example.com/t/4521"),
        (("Sure! Here is the rewritten request:\n\nIn 3 bullet points, sum up ticket 4521 (<EMAIL>): "
          "https://help.example.com/t/4521"),
         "In 3 bullet points, sum up ticket 4521 (<EMAIL>): https://help.example.com/t/4521"),
        ('"Sum up ticket 4521 from <EMAIL> as 3 bullet points: https://help.example.com/t/4521"',
         "Sum up ticket 4521 from <EMAIL> as 3 bullet points: https://help.example.com/t/4521"),
        ("", None),
        ("   \n", None),
        ("summarise ticket 4521 from <EMAIL> in 3 bullet points:  https://help.example.com/t/4521!", None),  # identical
        ("Sum up ticket 4521 from <EMAIL> in three bullet points: https://help.example.com/t/4521", None),  # lost "3"
        ("Sum up ticket 4521 from the customer in 3 bullet points: https://help.example.com/t/4521", None),  # <EMAIL>
        ("Sum up ticket 4521 from <EMAIL> in 3 bullet points.", None),  # lost the URL
        ("Ticket 4521.", None),  # under 0.3x
        ("Please " + "carefully " * 30 + "sum up ticket 4521 from <EMAIL> in 3 bullets: https://help.example.com/t/4521",
         None),  # over 2x
        ("I'm sorry, I can't help with ticket 4521 from <EMAIL> in 3 points: https://help.example.com/t/4521", None),
        ("Sure!", None),
    ],
)
def test_accept_paraphrase(candidate: str, expected: str | None) -> None:
    assert accept_paraphrase(ORIGINAL, candidate) == expected


def test_accept_paraphrase_rejects_an_answer_to_a_question() -> None:
    question = "What is the capital of France?"
    assert accept_paraphrase(question, "Sure! The capital of France is Paris.") is None
    assert accept_paraphrase(question, "Sure, here's a rephrased version: Which city is the capital of France?") == (
        "Which city is the capital of France?")
    assert accept_paraphrase(question, "Which city is France's capital?") == "Which city is France's capital?"


def test_accept_paraphrase_only_strips_openings_the_original_lacks() -> None:
    assert accept_paraphrase("Let me know the delivery date.", "Let me know when it will be delivered.") is not None
    assert accept_paraphrase("Tell me the delivery date.", "Let me check the delivery date for you.") is None
    assert accept_paraphrase("Okay, list the steps to reset it.", "Okay, give the steps for resetting it.") == (
        "Okay, give the steps for resetting it.")


def test_accept_paraphrase_rejects_an_echo_of_the_instruction() -> None:
    original = "Write a limerick about a cat who learns to code in Python over a long and rainy weekend. " * 3
    echo = "Rewrite the text below so that it says the same thing in different words. " + original.upper()
    assert accept_paraphrase(original, echo) is None


def test_accept_paraphrase_keeps_code_and_json_but_not_their_spacing() -> None:
    original = 'Fix `x = 1` in {"a": 1, "b": [2, 3]} please.'
    assert accept_paraphrase(original, 'Please repair `x = 1` in {"a":1,"b":[2,3]}.') is not None
    assert accept_paraphrase(original, 'Please repair `x=2` in {"a": 1, "b": [2, 3]}.') is None


def test_paraphrase_asks_for_a_rewrite_and_filters_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.generate

    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        return ["Here is the paraphrased text: Please sum up this short note.", "Sure!"]

    monkeypatch.setattr(tunelab.generate, "generate", fake_generate)
    from conftest import build_tiny_tokenizer

    prompts = ["Summarise this short note, please.", "Write a haiku about autumn."]
    result = paraphrase(prompts, model=None, tokenizer=build_tiny_tokenizer(), seed=3, max_new_tokens=500)
    assert result == ["Please sum up this short note.", None]
    for prompt, request in zip(prompts, seen["prompts"]):  # worked examples first, then the prompt as the last turn
        assert request[-1]["role"] == "user" and prompt in request[-1]["content"] and "Rewrite" in request[-1]["content"]
        assert [m["role"] for m in request[:-1]] == ["user", "assistant"] * len(PARAPHRASE_EXAMPLES)
    assert seen["seed"] == 3 and seen["temperature"] == 0.7
    assert seen["max_new_tokens"] < 500  # capped: a reply over twice the prompt is rejected anyway
    assert paraphrase([], model=None, tokenizer=None) == []


def test_paraphrase_with_a_tiny_model() -> None:
    from conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer)).eval()
    prompts = ["Write a haiku about autumn leaves.", "What is the capital of France?", "Extract the ticket as JSON."]
    first = paraphrase(prompts, model, tokenizer, seed=0, max_new_tokens=12, batch_size=2)
    assert len(first) == len(prompts)
    assert all(item is None or (isinstance(item, str) and item.strip()) for item in first)
    assert first == paraphrase(prompts, model, tokenizer, seed=0, max_new_tokens=12, batch_size=2)



@pytest.mark.parametrize(
    ("original", "candidate", "kept"),
    [
        # Real SmolLM2-135M replies to the paraphrase instruction for Alpaca prompts.
        ("Invent a new word by combining two existing words.", "Invent a new word by adding two existing words.", True),
        ("Produce a list of the top 5 NHL players in 2021.", "Produce a list of the top 5 NHL players from 2021.", True),
        ("Transform the following sentence using a synonym: The car sped quickly.", "The motor vehicle sped quickly.", False),
        ("Given the parameters of a triangle, find out its perimeter.", "Perimeter: 4 + 8 + 24 + 6 + 16 + 4 + 12.", False),
        ("Generate a one-sentence title for a creative recipe.", "Recipe for Ex-Pawnbroker Crafting Scraps", False),
        ("Give an example of a job that a computer can do better than a human being.",
         "This job is one that would surpass a human's capabilities in terms of processing data.", False),
        ('Reverse engineer this sentence: "People usually wear clothes."', "People usually do not wear clothes.", False),
        ("Given a definition, identify the correct spelling of the word.", 'The correct spelling of the word is "eternal"', False),
        ("Change this sentence to make it sound more formal: I wanted to alert you",
         "I would like to make this sentence sound more formal by using simpler language.", False),
        ("Change this sentence to make it sound more formal: I wanted to alert you",
         "Make this sentence sound more formal: I wanted to alert you", True),
        ("Classify this scenario as an example of reinforcement or punishment.",
         "Classify this scenario as reinforcement or punishment.", True),
    ],
)
def test_answers_posing_as_rewrites_are_rejected(original: str, candidate: str, kept: bool) -> None:
    assert (accept_paraphrase(original, candidate) is not None) is kept
