"""Fine-tuning methods: each module turns a loaded base model into the model to train.

A method is one function `attach(model, cfg) -> model` registered under its config name; the loop only sees a model
whose trainable parameters have `requires_grad=True`. Adding a method is one module and one `register_method` line.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MethodFn = Callable[[nn.Module, object], nn.Module]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str, attach: MethodFn) -> None:
    METHODS[name] = attach


def attach_method(model: nn.Module, cfg) -> nn.Module:
    """Apply the configured method; afterwards only the parameters it trains require grad."""
    return METHODS[cfg.name](model, cfg)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting tied weights once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


from tunelab.methods import freeze, full, lora

register_method("full", full.attach)
register_method("freeze", freeze.attach)
register_method("lora", lora.attach)
