"""What `tunelab export` reads: a run directory (adapter or full weights) or an HF model directory, its merged model, and
the run's validation examples.

    source = inspect_target("runs/demo")            # cheap: no weights loaded; raises on a run without a model
    model, tokenizer = load_source(source)          # the model as `tunelab generate` runs it (PEFT for adapters)
    merged = merge_adapter(model)                   # LoRA/DoRA/IA3 folded into the base; a no-op for full weights
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.tokenize import Encoded
from tunelab.errors import TunelabError
from tunelab.export.context import ExportSource


def inspect_target(target: str) -> ExportSource:
    """Classify TARGET and read its (base) model config without loading weights.

    Raises:
        TunelabError: the run has no final model, the path is neither a run nor a model directory.
    """
    from transformers import AutoConfig

    from tunelab.models.loading import resolve_model

    path = Path(str(target))
    if not path.exists() and str(target) != "default":
        raise TunelabError(f"{target}: no such run or model directory; give a finished run directory (config.yaml + model/) "
                           "or an HF model directory")
    if path.is_dir() and (path / "config.yaml").is_file():
        model_dir = path / "model"
        if not model_dir.is_dir():
            raise TunelabError(f"{path}: this run has no final model to export (interrupted?); finish it with "
                               f"`tunelab train {path / 'config.yaml'} --resume`, then export again")
        if (model_dir / "bottleneck_adapter.json").is_file():  # method: adapter; every target starts from the merge
            from tunelab.methods.bottleneck import MERGE_REFUSED

            raise TunelabError(f"{path}: {MERGE_REFUSED}")
        if (model_dir / "adapter_config.json").is_file():
            from tunelab.evaluate.report import adapter_base_target

            base = resolve_model(adapter_base_target(path))
            return ExportSource(str(target), "adapter", path, AutoConfig.from_pretrained(base.path))
        return ExportSource(str(target), "full", path, AutoConfig.from_pretrained(model_dir))
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise TunelabError(f"{path}: neither a tunelab run (config.yaml + model/) nor an HF model directory (config.json); "
                           "give a finished run directory or a save_pretrained directory")
    source = resolve_model(str(target))
    try:
        config = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"{target}: cannot read the model config ({str(exc).splitlines()[0][:160]})") from None
    return ExportSource(str(target), "model", None, config)


def load_source(source: ExportSource) -> tuple[Any, Any]:
    """(model, tokenizer) as `tunelab generate` loads them: the adapter applied with PEFT, unmerged, fp32, eval mode."""
    from tunelab.data.tokenize import ensure_chat_template
    from tunelab.generate import load_for_inference

    model, tokenizer = load_for_inference(source.target)
    ensure_chat_template(tokenizer)
    return model, tokenizer


def merge_adapter(model: Any) -> Any:
    """Fold a PEFT adapter (LoRA, DoRA, IA3, ...) into the base weights and drop the PEFT wrappers."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def validation_examples(source: ExportSource, tokenizer) -> tuple[list[Encoded], str]:
    """The run's validation examples tokenized as training tokenized them, and where they came from.

    The run's prepared split (data/validation.jsonl) when the run kept one, else the run config's data section prepared
    again (a cache hit when the files are unchanged). An HF model directory has none."""
    if source.run_dir is None:
        return [], "no validation split (TARGET is a model directory, not a run)"
    from tunelab.config import load_config

    cfg = load_config(source.run_dir / "config.yaml")
    prepared = source.run_dir / "data" / "validation.jsonl"
    try:
        if prepared.is_file():
            from tunelab.data.dataset import encode_all
            from tunelab.data.pipeline import read_rows, to_example

            records, fmt = read_rows(str(prepared), "data.validation", cfg.data.format, [])
            if not records or fmt is None:
                return [], f"{prepared} has no rows"
            examples = [to_example(r, fmt, cfg.data.system_prompt) for r in records]
            return encode_all(examples, tokenizer, cfg.data, problems=[]), f"the run's validation split ({prepared})"
        from tunelab.data.dataset import prepare_data
        from tunelab.models.loading import resolve_model

        data = prepare_data(cfg.data, tokenizer, cfg.training.seed, base=resolve_model(cfg.model))
        if not data.validation:
            return [], "the run has no validation split (data.validation not set)"
        return list(data.validation), "the run config's data.validation, prepared as training prepared it"
    except TunelabError as exc:
        return [], f"validation data unavailable ({exc})"
