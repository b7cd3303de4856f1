"""The models one server answers for: a base model loaded once, and LoRA adapters on it chosen per request by name.

    models = ServedModels.load("runs/support", adapters={"legal": "runs/legal"})
    models.names()            # ['support', 'base', 'legal']: the target, the bare base, each adapter
    models.generate("legal", rows, temperature=0.0, top_p=1.0)

The target is anything `tunelab generate` accepts. A LoRA run is served under its directory name, and its base model
(adapters disabled) as `base`; any other target is served as itself (it is the base). Each `--adapters name=RUN_DIR`
adds a LoRA run trained on the same base (checked at startup). Adapters are attached with peft's `load_adapter` and
switched with `set_adapter`, so the base weights are in memory once. Every name keeps its own tokenizer (the run's,
with the chat template it was trained with).

Only one thread generates (the batch worker), so switching adapters needs no lock.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.serve.generation import RowResult, RowSpec, generate_rows

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
BASE_NAME = "base"


@dataclass
class ServedModel:
    name: str
    adapter: str | None  # peft adapter name; None: the base model with adapters disabled
    tokenizer: Any
    source: str  # what it was loaded from, for /v1/models


def parse_adapter_specs(specs: list[str] | None) -> dict[str, str]:
    """`name=RUN_DIR` strings -> {name: RUN_DIR}.

    Raises:
        TunelabError: a spec without `=`, an empty or invalid name, a name given twice.
    """
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise TunelabError(f"--adapters: '{spec}' is not name=RUN_DIR (e.g. --adapters legal=runs/legal)")
        if not MODEL_NAME.match(name):
            raise TunelabError(f"--adapters: '{name}' is not a usable model name; use letters, digits and . _ - : / (at most 64)")
        if name in adapters:
            raise TunelabError(f"--adapters: the name '{name}' is given twice; give each adapter its own name")
        adapters[name] = path
    return adapters


def lora_run_base(run_dir: Path, flag: str) -> str:
    """The base model a LoRA run was trained on, as a comparable string (a resolved directory, or a hub id).

    Raises:
        TunelabError: `run_dir` is not a finished tunelab run, or not a LoRA run.
    """
    if not run_dir.is_dir():
        raise TunelabError(f"{flag}: {run_dir} does not exist; give a tunelab run directory (output.dir of a LoRA run)")
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"{flag}: {run_dir} is not a tunelab run directory (no config.yaml); give the output.dir of a LoRA run")
    adapter_config = run_dir / "model" / "adapter_config.json"
    if not (run_dir / "model").is_dir():
        raise TunelabError(f"{flag}: {run_dir} has no final model yet (interrupted?); finish it with `tunelab train "
                           f"{run_dir / 'config.yaml'} --resume`")
    if not adapter_config.is_file():
        raise TunelabError(f"{flag}: {run_dir} is a full fine-tune, not a LoRA adapter; serve it as its own TARGET instead")
    base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():  # the model cache was cleared, or a hub id: resolve the run's spec again
        import yaml

        from tunelab.models.loading import resolve_model

        base = resolve_model(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")).get("model")).path
    return _comparable(base)


def _comparable(path_or_id: str) -> str:
    path = Path(path_or_id).expanduser()
    return str(path.resolve()) if path.is_dir() else path_or_id


def _target_name(target: str) -> str:
    path = Path(target)
    name = path.stem if path.suffix.lower() == ".gguf" else path.name or target
    name = re.sub(r"[^A-Za-z0-9._:/-]", "-", name).strip("-")[:64] or "model"
    return name if name[0].isalnum() else f"m{name}"[:64]


class ServedModels:
    def __init__(self, model, entries: dict[str, ServedModel], context_length: int) -> None:
        from peft import PeftModel

        self.model = model
        self.is_peft = isinstance(model, PeftModel)
        self.entries = entries
        self.context_length = context_length

    @classmethod
    def load(cls, target: str, adapters: dict[str, str] | None = None, name: str | None = None,
             precision: str = "fp32") -> ServedModels:
        """Load the target and attach each adapter.

        Raises:
            TunelabError: the target cannot be loaded; an adapter is not a LoRA run or was trained on another base;
                two models would get the same name.
        """
        from tunelab.data.tokenize import ensure_chat_template
        from tunelab.generate import is_run_dir, load_for_inference
        from tunelab.models.loading import resolve_model

        adapters = adapters or {}
        if precision not in ("fp32", "bf16"):
            raise TunelabError(f"--precision: fp32 or bf16 (got '{precision}')")
        name = name or _target_name(target)
        if not MODEL_NAME.match(name):
            raise TunelabError(f"--name: '{name}' is not a usable model name; use letters, digits and . _ - : / (at most 64)")
        target_path = Path(target)
        if (target_path / "config.yaml").is_file() and not (target_path / "model").is_dir():
            raise TunelabError(f"TARGET: {target} has no final model yet (interrupted?); finish it with `tunelab train "
                               f"{target_path / 'config.yaml'} --resume`")
        target_is_lora = is_run_dir(target_path) and (target_path / "model" / "adapter_config.json").is_file()
        if target_is_lora and name == BASE_NAME:
            raise TunelabError(f"--name: '{BASE_NAME}' names the base model when serving a LoRA run; choose another name")
        if target_is_lora:
            base = lora_run_base(target_path, "TARGET")
        elif is_run_dir(target_path) and (target_path / "model" / "bottleneck_adapter.json").is_file():  # method: adapter
            from tunelab.evaluate.report import adapter_base_target

            base = _comparable(resolve_model(adapter_base_target(target_path)).path)
        else:
            base = _comparable(resolve_model(target).path)
        for adapter_name, run_dir in adapters.items():  # checked before loading anything heavy
            if adapter_name == name or (target_is_lora and adapter_name == BASE_NAME):
                raise TunelabError(f"--adapters: the name '{adapter_name}' is already taken by the target; choose another name")
            adapter_base = lora_run_base(Path(run_dir), f"--adapters {adapter_name}")
            if adapter_base != base:
                raise TunelabError(f"--adapters {adapter_name}: {run_dir} was trained on {adapter_base}, but the served base model "
                                   f"is {base}; adapters must share the base model (serve it separately)")

        model, tokenizer = load_for_inference(target)
        ensure_chat_template(tokenizer)
        entries: dict[str, ServedModel] = {}
        if target_is_lora:  # load_for_inference attached the run's adapter as "default"
            from tunelab.models.loading import load_tokenizer

            entries[name] = ServedModel(name, "default", tokenizer, str(target))
            entries[BASE_NAME] = ServedModel(BASE_NAME, None, load_tokenizer(resolve_model(base)), base)
        else:
            entries[name] = ServedModel(name, None, tokenizer, str(target))
        for i, (adapter_name, run_dir) in enumerate(adapters.items()):
            from peft import PeftModel
            from transformers import AutoTokenizer

            model_dir = str(Path(run_dir) / "model")
            internal = f"adapter{i}"  # peft module keys may not contain the dots and slashes a public name can
            if isinstance(model, PeftModel):
                model.load_adapter(model_dir, adapter_name=internal)
            else:
                model = PeftModel.from_pretrained(model, model_dir, adapter_name=internal)
            adapter_tokenizer = AutoTokenizer.from_pretrained(model_dir)
            ensure_chat_template(adapter_tokenizer)
            entries[adapter_name] = ServedModel(adapter_name, internal, adapter_tokenizer, str(run_dir))
        for served in entries.values():
            # The first encode may switch the Rust tokenizer's padding/truncation off (a mutation); do it now, so the
            # HTTP thread's encodes never race the worker's decodes on that ("Already borrowed").
            served.tokenizer("warm-up")
        if precision == "bf16":
            import torch

            model = model.to(torch.bfloat16)
        model.eval()
        config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
        return cls(model, entries, int(getattr(config, "max_position_embeddings", None) or 2048))

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> ServedModel | None:
        return self.entries.get(name)

    def generate(self, name: str, rows: list[RowSpec], temperature: float, top_p: float, seed: int | None) -> list[RowResult]:
        """Generate rows with the named model: its adapter active, or every adapter disabled for the base."""
        served = self.entries[name]
        with self._using(served.adapter):
            return generate_rows(self.model, served.tokenizer, rows, temperature, top_p, seed)

    def _using(self, adapter: str | None):
        if not self.is_peft:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()
