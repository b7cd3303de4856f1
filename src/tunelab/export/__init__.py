"""`tunelab export RUN_DIR --to DIR`: turn a run (or an HF model directory) into files other tools load, each one checked.

    from tunelab.export import ExportOptions, export_run
    result = export_run("runs/demo", "exported/demo", ExportOptions(merge=True, onnx=True, quantize="int8", gguf=True))
    result.report["artifacts"]            # also written to exported/demo/export_report.json

Targets run in the order registered below; adding one is one module (`check(source, options)` before anything is
loaded, `export(ctx) -> [Artifact]`) and one `register_target` line. Each module is imported only when its target is
asked for, so its optional dependencies (onnx, onnxruntime, bitsandbytes) load only then.

Every artifact is loaded back the way a user would load it and compared with the run's model as `tunelab generate` runs
it: max |logit difference| on fixed prompts rendered with the run's chat template, ms per forward on a fixed batch, and
eval loss on the run's validation split. DIR is built in a temporary directory next to it and renamed at the end, so a
failed export leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.context import Artifact, ExportContext, ExportOptions, ExportSource

__all__ = ["EXPORT_TARGETS", "Artifact", "ExportOptions", "ExportResult", "ExportTarget", "export_run", "register_target"]

LOSSLESS_TOLERANCE = 2e-3  # max |dlogit| above which a format that should be exact (fp32) gets a warning


@dataclass(frozen=True)
class ExportTarget:
    name: str
    module: str  # imported when the target runs


EXPORT_TARGETS: dict[str, ExportTarget] = {}


def register_target(target: ExportTarget) -> None:
    EXPORT_TARGETS[target.name] = target


register_target(ExportTarget("merge", "tunelab.export.merge"))
register_target(ExportTarget("onnx", "tunelab.export.onnx"))
register_target(ExportTarget("int8", "tunelab.export.int8"))  # quantizes the onnx target's file
register_target(ExportTarget("nf4", "tunelab.export.nf4"))
register_target(ExportTarget("prune", "tunelab.export.prune"))
register_target(ExportTarget("gguf", "tunelab.export.gguf"))


@dataclass
class ExportResult:
    out_dir: Path
    report: dict
    artifacts: list[Artifact]


def _handler(name: str):
    return importlib.import_module(EXPORT_TARGETS[name].module)


def check_destination(dest: Path, source: ExportSource, overwrite: bool) -> None:
    """Raises:
    TunelabError: DIR is a file, is not empty (without --overwrite), or holds the thing being exported."""
    if dest.exists() and not dest.is_dir():
        raise TunelabError(f"--to: {dest} is a file; give a directory path")
    resolved, target = dest.resolve(), Path(source.target).resolve()
    if resolved == target or resolved in target.parents:
        raise TunelabError(f"--to: {dest} holds the model being exported; choose a directory outside it")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise TunelabError(f"--to: {dest} is not empty; choose a new directory or pass --overwrite to replace it")


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished temp directory to DIR; an old DIR (empty, or --overwrite) is moved aside first, then deleted."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; DIR gets the permissions a plain mkdir would give
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _warnings(artifacts: list[Artifact]) -> list[str]:
    out = []
    for a in artifacts:
        out += a.notes.pop("warnings", [])
        if a.lossless and a.max_abs_logit_diff > LOSSLESS_TOLERANCE:
            out.append(f"{a.format}: max |dlogit| {a.max_abs_logit_diff:.2e} is above {LOSSLESS_TOLERANCE:g} for a format that "
                       "should match the source; please report it")
        greedy = a.notes.get("greedy_tokens_match")
        if a.lossless and greedy is not None and greedy.split("/")[0] != greedy.split("/")[1]:
            out.append(f"{a.format}: greedy replies matched the source model's on only {greedy} prompts")
    return out


def export_run(target: str | Path, to: str | Path, options: ExportOptions,
               log: Callable[[str], None] | None = None) -> ExportResult:
    """Export TARGET (a run directory or an HF model directory) into DIR `to` as `options` asks; see the module docstring.

    Raises:
        TunelabError: a bad option value, a run without a model, a target the model cannot go to (e.g. --gguf on a
            non-llama model), a missing optional dependency, a non-empty DIR without --overwrite.
    """
    from tunelab.export.parity import PARITY_PROMPTS, build_probe, eval_loss, ms_per_forward
    from tunelab.export.source import inspect_target, load_source, merge_adapter, validation_examples

    say = log or (lambda _text: None)
    options.validate()
    selected = options.selected()
    source = inspect_target(str(target))
    for name in EXPORT_TARGETS:
        if name in selected:
            _handler(name).check(source, options)
    dest = Path(to)
    check_destination(dest, source, options.overwrite)

    say(f"loading {target}")
    model, tokenizer = load_source(source)
    validation, note = validation_examples(source, tokenizer)
    say(f"source model: reference logits, speed and eval loss ({len(validation)} validation examples)")
    probe = build_probe(model, tokenizer, validation, note)
    source_row = {"format": "source", "kind": source.kind, "size_bytes": _param_bytes(model),
                  "ms_per_forward": round(ms_per_forward(model, probe.bench), 2), "eval_loss": eval_loss(model, probe)}
    merged = merge_adapter(model)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        work = tmp / ".work"
        work.mkdir()
        ctx = ExportContext(source, options, merged, tokenizer, probe, tmp, work, say, selected)
        artifacts: list[Artifact] = []
        for name in EXPORT_TARGETS:
            if name in selected:
                artifacts += _handler(name).export(ctx)
        shutil.rmtree(work)
        report = _report(source, source_row, probe, artifacts, PARITY_PROMPTS)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(dest, report, artifacts)


def _report(source: ExportSource, source_row: dict, probe, artifacts: list[Artifact], prompts: tuple[str, ...]) -> dict:
    import torch
    import transformers

    from tunelab import __version__
    from tunelab.export.parity import GREEDY_NEW_TOKENS
    from tunelab.train.run_dir import round_metric

    warnings = _warnings(artifacts)
    base_loss = source_row["eval_loss"]
    source_row = {**source_row, "eval_loss": round_metric(base_loss),
                  "size_mb": round(source_row["size_bytes"] / 1e6, 2)}
    return {
        "target": source.target,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tunelab": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "parity": {"prompts": list(prompts), "chat_template": True, "metric": "max |logit difference| against the source model",
                   "greedy_prompts": len(probe.greedy), "greedy_new_tokens": GREEDY_NEW_TOKENS},
        "speed": {"batch": list(probe.bench["input_ids"].shape),
                  "metric": "fastest of 3-10 forwards in ms, CPU, after one warm-up"},
        "validation": {"examples": len(probe.validation), "source": probe.validation_note},
        "source": source_row,
        "artifacts": [a.to_json(base_loss) for a in artifacts],
        "warnings": warnings,
    }
