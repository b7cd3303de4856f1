"""LoRA through PEFT: low-rank adapters on the chosen linear layers, base weights frozen."""

from __future__ import annotations

from torch import nn

from tunelab.errors import TunelabError


def attach(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        first = str(exc).splitlines()[0][:160]
        raise TunelabError(f"method.target_modules: {first}; this model's linear layers are: {', '.join(linear)}") from None
