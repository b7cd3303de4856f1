"""The PEFT family: LoRA and its variants (rsLoRA, DoRA), (IA)3, LoHa, LoKr, prefix tuning and prompt tuning.

Each method is one row of `ADAPTERS`: the name of its `peft` config class and a function that turns our config section
into that class's keyword arguments. `attach` builds the config and wraps the model with `get_peft_model`; the base
weights stay frozen and `model.save_pretrained` writes only the adapter, which `PeftModel.from_pretrained` reloads.
qlora (`methods/qlora.py`) reuses the LoRA row on a 4-bit base.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tunelab.errors import TunelabError


def _lora(cfg, model_path: str | None) -> dict:
    return {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "modules_to_save": cfg.modules_to_save or None,
        "use_rslora": cfg.name == "rslora",
        "use_dora": cfg.name == "dora",
    }


def _ia3(cfg, model_path: str | None) -> dict:
    return {"target_modules": cfg.target_modules, "feedforward_modules": cfg.feedforward_modules,
            "modules_to_save": cfg.modules_to_save or None}


def _loha(cfg, model_path: str | None) -> dict:
    return {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
            "target_modules": cfg.target_modules, "modules_to_save": cfg.modules_to_save or None}


def _lokr(cfg, model_path: str | None) -> dict:
    return {**_loha(cfg, model_path), "decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor}


def _prefix(cfg, model_path: str | None) -> dict:
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "prefix_projection": cfg.prefix_projection,
            **({"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {})}


def _prompt(cfg, model_path: str | None) -> dict:
    kwargs = {"num_virtual_tokens": cfg.num_virtual_tokens}
    if cfg.init_text:  # PEFT tokenizes the text with the base model's tokenizer (the model directory holds it)
        kwargs.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=cfg.init_text, tokenizer_name_or_path=model_path)
    return kwargs


# method name -> (peft config class, builder of its keyword arguments from our section and the base model's path)
ADAPTERS: dict[str, tuple[str, Callable[..., dict]]] = {
    "lora": ("LoraConfig", _lora),
    "rslora": ("LoraConfig", _lora),
    "dora": ("LoraConfig", _lora),
    "qlora": ("LoraConfig", _lora),
    "ia3": ("IA3Config", _ia3),
    "loha": ("LoHaConfig", _loha),
    "lokr": ("LoKrConfig", _lokr),
    "prefix_tuning": ("PrefixTuningConfig", _prefix),
    "prompt_tuning": ("PromptTuningConfig", _prompt),
}
VIRTUAL_TOKENS = ("prefix_tuning", "prompt_tuning")


def peft_config(cfg, model_path: str, task_type: str = "CAUSAL_LM"):
    """The `peft` config object for the method section `cfg` on the base model in `model_path` (task_type SEQ_CLS for
    a model with a score head: PEFT then trains and saves the head in full).

    Raises:
        TunelabError: PEFT rejects the combination of settings (e.g. feedforward_modules outside target_modules).
    """
    import peft

    class_name, build = ADAPTERS[cfg.name]
    try:
        return getattr(peft, class_name)(task_type=task_type, **build(cfg, model_path))
    except ValueError as exc:
        raise TunelabError(f"method.{_field_named(str(exc), cfg)}: {_first_line(exc)}") from None


def attach(model: nn.Module, cfg, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap `model` with the PEFT adapter `cfg` describes; only the adapter's parameters train.

    Raises:
        TunelabError: the target modules match nothing in this model, or PEFT cannot apply the method to it.
    """
    from peft import get_peft_model

    config = peft_config(cfg, model.name_or_path, task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        if cfg.name in VIRTUAL_TOKENS:
            raise _unsupported_architecture(cfg, model.config, exc) from None
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        field = _field_named(str(exc), cfg)
        raise TunelabError(f"method.{field}: {_first_line(exc)}; this model's linear layers are: {', '.join(linear)}") from None


def check_model_config(cfg, source, device) -> dict:
    """Before the weights load: prefix/prompt tuning need sizes PEFT reads from config.json; check it has them.

    Raises:
        TunelabError: PEFT cannot apply prefix or prompt tuning to this architecture.
    """
    if cfg.name not in VIRTUAL_TOKENS:
        return {}
    from transformers import AutoConfig

    try:
        from peft.utils import _prepare_prompt_learning_config  # PEFT's own check, which get_peft_model runs again
        model_config = AutoConfig.from_pretrained(source.path, local_files_only=True)
    except (ImportError, OSError, ValueError):
        return {}  # another PEFT version, or not readable offline: load_model reports that, attach repeats the check
    try:
        _prepare_prompt_learning_config(peft_config(cfg, source.path), model_config)
    except ValueError as exc:
        raise _unsupported_architecture(cfg, model_config, exc) from None
    return {}


def _unsupported_architecture(cfg, model_config, exc: Exception) -> TunelabError:
    kind = getattr(model_config, "model_type", "this model")
    return TunelabError(
        f"method.name: {cfg.name} does not work with {kind} models (PEFT: {_first_line(exc)}); "
        "use lora, ia3, loha or lokr instead"
    )


def _field_named(message: str, cfg) -> str:
    """The config field a PEFT error is about: one of ours it names (PEFT's keywords are ours), else target_modules."""
    fields = type(cfg).model_fields
    named = [f for f in ("feedforward_modules", "modules_to_save", "target_modules") if f in fields and f in message]
    return named[0] if named else "target_modules" if "target_modules" in fields else "name"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200]
