"""Batch inference over a data file: one prediction per row, appended to a JSONL file that a re-run resumes.

    tunelab predict runs/demo --input data/test.jsonl --output predictions.jsonl --batch-size 16
    summary = predict("runs/demo", "data/test.jsonl", "predictions.jsonl")

Rows are read with tunelab's readers in any format (JSON / JSONL / CSV; alpaca, prompt_response, messages, text).
The response field may be missing (`{"prompt": ...}`, or messages ending with a user turn); when it is there, the
final assistant turn is left out of the prompt and kept as `reference`. Chat rows are generated with
`tunelab.generate.generate` (the model's chat template, exactly as `tunelab generate`); `text` rows are continued as
raw text.

Each output line is the input row plus `prediction`, `reference` (when known), `_input` (file:line) and
`_input_sha` (a hash of the row). Lines are flushed after every batch, so a killed run loses at most one batch; a
re-run skips rows already in the output (a half-written last line is dropped first). Sampling (temperature > 0) is
seeded per batch from `seed` and the batch's first row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.formats import FORMATS
from tunelab.data.readers import Problem, Record, expand_paths, read_file
from tunelab.errors import TunelabError

PROMPT_KEYS = {"messages": "messages", "alpaca": "instruction", "prompt_response": "prompt", "text": "text"}
RESPONSE_KEYS = {"alpaca": "output", "prompt_response": "response"}
_PLACEHOLDER = "(prediction)"


@dataclass
class PredictItem:
    record: Record
    messages: list[dict] | None  # the prompt conversation; None for raw text
    text: str | None  # raw text to continue
    reference: str | None
    sha: str


@dataclass
class PredictSummary:
    rows: int
    skipped: int  # already in the output
    predicted: int
    output: Path
    seconds: float


def read_predict_rows(spec: str | list[str], fmt: str | None = None) -> tuple[list[PredictItem], str]:
    """Every row of the input as a prompt (and reference when the row has a response).

    Raises:
        TunelabError: no file matches, a row is malformed, the format cannot be told, or there are no rows.
    """
    problems: list[Problem] = []
    records = [rec for path in expand_paths(spec, "--input") for rec in read_file(path, problems)]
    if problems:
        more = f" ({len(problems) - 1} more; `tunelab data check` lists them all)" if len(problems) > 1 else ""
        raise TunelabError(problems[0].text + more)
    if not records:
        raise TunelabError(f"--input: {spec} holds no rows")
    if fmt is not None and fmt not in FORMATS:
        raise TunelabError(f"--format: unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    fmt = fmt or _detect(records[0])
    return [_item(rec, fmt) for rec in records], fmt


def _detect(rec: Record) -> str:
    for name, key in PROMPT_KEYS.items():
        if key in rec.row:
            return name
    raise TunelabError(f"{rec.where}: cannot tell the data format from the keys {sorted(rec.row)}; give --format "
                       f"({', '.join(FORMATS)}) or rows with one of the fields {', '.join(PROMPT_KEYS.values())}")


def _item(rec: Record, fmt: str) -> PredictItem:
    sha = hashlib.sha256(json.dumps(rec.row, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]
    if fmt in ("text", "classification"):  # a classification row's label is optional here: it is what is predicted
        return PredictItem(rec, None, FORMATS["text"].to_example(rec).text, None, sha)
    row = dict(rec.row)
    has_response = True
    if fmt in RESPONSE_KEYS and row.get(RESPONSE_KEYS[fmt]) in (None, ""):
        row[RESPONSE_KEYS[fmt]] = _PLACEHOLDER  # so the format's own validation checks everything else
        has_response = False
    elif fmt == "messages" and isinstance(row.get("messages"), list) and row["messages"] and \
            isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") != "assistant":
        row["messages"] = list(row["messages"]) + [{"role": "assistant", "content": _PLACEHOLDER}]
        has_response = False
    messages = FORMATS[fmt].to_example(Record(rec.file, rec.line, row)).messages
    reference = messages[-1]["content"] if has_response else None
    return PredictItem(rec, [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], None, reference, sha)


def _resume(output: Path) -> dict[str, str]:
    """{_input: _input_sha} of the rows already predicted; drops a half-written last line."""
    if not output.exists():
        return {}
    data = output.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    done: dict[str, str] = {}
    for number, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[row["_input"]] = row["_input_sha"]
        except (ValueError, KeyError, TypeError):
            raise TunelabError(f"{output}:{number}: not a line tunelab predict wrote; give a new --output (or delete this file)") from None
    if len(keep) != len(data):
        with open(output, "r+b") as f:
            f.truncate(len(keep))
    return done


def predict(target: str, input_spec: str | list[str], output: str | Path, batch_size: int = 8, max_new_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, fmt: str | None = None, system: str | None = None,
            quiet: bool = False, log: Callable[[str], None] | None = None) -> PredictSummary:
    """Predict every row of `input_spec` not yet in `output`, appending flushed JSONL batch by batch.

    Raises:
        TunelabError: bad settings, unreadable input, an output written for different input rows, an unloadable model.
    """
    import time

    if batch_size < 1:
        raise TunelabError(f"--batch-size: must be at least 1 (got {batch_size})")
    output = Path(output)
    items, fmt = read_predict_rows(input_spec, fmt)
    done = _resume(output)
    for item in items:
        if item.record.where in done and done[item.record.where] != item.sha:
            raise TunelabError(f"--output: {output} holds a prediction for a different version of {item.record.where}; "
                               "write to a new --output (or delete the old one)")
    todo = [(i, item) for i, item in enumerate(items) if item.record.where not in done]
    say = log or (lambda text: None)
    say(f"{len(items)} row(s) ({fmt}); {len(items) - len(todo)} already in {output}, {len(todo)} to predict")
    started = time.perf_counter()
    if todo:
        from tunelab.generate import load_for_inference
        from tunelab.methods.classification import is_classification_run, load_classifier, predict_labels

        labels = None
        if is_classification_run(target):  # a classifier: `prediction` is a label, `probability` its softmax score
            if any(item.text is None for _, item in todo):
                raise TunelabError(f"--input: {target} is a classifier; give rows with a text field (format classification)")
            model, tokenizer, labels = load_classifier(target)
        else:
            model, tokenizer = load_for_inference(target)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "a", encoding="utf-8") as out, _progress(len(items), len(items) - len(todo), quiet) as advance:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                if labels is not None:
                    scored = predict_labels(model, tokenizer, [item.text for _, item in batch], labels)
                    replies = [label for label, _ in scored]
                else:
                    replies = _generate(model, tokenizer, [item for _, item in batch], max_new_tokens, temperature,
                                        top_p, seed + batch[0][0], system)
                for k, ((_, item), reply) in enumerate(zip(batch, replies)):
                    row = dict(item.record.row)
                    row.update({"prediction": reply, "_input": item.record.where, "_input_sha": item.sha})
                    if labels is not None:
                        row["probability"] = round(scored[k][1], 6)
                    if item.reference is not None:
                        row["reference"] = item.reference
                    out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                out.flush()
                os.fsync(out.fileno())
                advance(len(batch))
    return PredictSummary(len(items), len(items) - len(todo), len(todo), output, time.perf_counter() - started)


def _generate(model, tokenizer, items: list[PredictItem], max_new_tokens: int, temperature: float, top_p: float, seed: int,
              system: str | None) -> list[str]:
    from tunelab.generate import generate

    replies: list[str | None] = [None] * len(items)
    chat = [i for i, item in enumerate(items) if item.messages is not None]
    if chat:
        for i, reply in zip(chat, generate(model, tokenizer, [items[i].messages for i in chat], max_new_tokens, temperature, top_p,
                                           batch_size=len(chat), system_prompt=system, seed=seed if temperature > 0 else None)):
            replies[i] = reply
    raw = [i for i, item in enumerate(items) if item.text is not None]
    if raw:  # continued pre-training rows: continue the text itself, no chat template
        from tunelab.serve.generation import RowSpec, generate_rows

        rows = [RowSpec(tokenizer(items[i].text)["input_ids"] or [tokenizer.eos_token_id], max_new_tokens) for i in raw]
        for i, result in zip(raw, generate_rows(model, tokenizer, rows, temperature, top_p, seed if temperature > 0 else None)):
            replies[i] = result.text
    return [r or "" for r in replies]


class _progress:
    """A rich progress bar on stderr (nothing when quiet); the context value advances it."""

    def __init__(self, total: int, completed: int, quiet: bool) -> None:
        self.total, self.completed, self.quiet = total, completed, quiet
        self._progress = None

    def __enter__(self) -> Callable[[int], None]:
        if self.quiet:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold blue]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
        task = self._progress.add_task("predict", total=self.total, completed=self.completed)
        self._progress.start()
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
