"""Fine-tuning methods: each module turns a loaded base model into the model to train.

A method is one function `attach(model, cfg) -> model` registered under its config name; the loop only sees a model
whose trainable parameters have `requires_grad=True`. Adding a method is one module and one `register_method` line.

A method that needs the base model loaded differently (qlora: 4-bit weights; reward: a score head) also registers
`load_kwargs(cfg, source, device) -> dict`: extra `load_model` keyword arguments, asked for before the weights load, so
it is also where a method checks what it can from the model's config.json and raises `TunelabError` before any time
is spent.

A method that trains on something other than next-token cross-entropy (dpo, reward) registers
`objective(cfg, model, tokenizer, dtype) -> Objective` (train/objective.py): how its batches are collated and scored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MethodFn = Callable[[nn.Module, object], nn.Module]
LoadKwargsFn = Callable[[object, object, torch.device], dict]
ObjectiveFn = Callable[[object, nn.Module, object, object], object]  # (cfg, model, tokenizer, autocast dtype)
METHODS: dict[str, MethodFn] = {}
LOAD_KWARGS: dict[str, LoadKwargsFn] = {}
OBJECTIVES: dict[str, ObjectiveFn] = {}


def register_method(name: str, attach: MethodFn, load_kwargs: LoadKwargsFn | None = None,
                    objective: ObjectiveFn | None = None) -> None:
    METHODS[name] = attach
    if load_kwargs is not None:
        LOAD_KWARGS[name] = load_kwargs
    if objective is not None:
        OBJECTIVES[name] = objective


def attach_method(model: nn.Module, cfg, task: str = "causal_lm") -> nn.Module:
    """Apply the configured method; afterwards only the parameters it trains require grad (and, for task
    classification, the new classification head)."""
    if task == "classification":
        from tunelab.methods import classification

        return classification.attach(model, cfg)
    return METHODS[cfg.name](model, cfg)


def method_load_kwargs(cfg, source, device: torch.device) -> dict:
    """Extra `load_model` keyword arguments the method `cfg` needs for the base model at `source` on `device` ({} for most).

    Raises:
        TunelabError: the method cannot work with this model or installation (e.g. qlora without bitsandbytes).
    """
    hook = LOAD_KWARGS.get(cfg.name)
    return hook(cfg, source, device) if hook is not None else {}


def build_objective(cfg, model: nn.Module, tokenizer, dtype: torch.dtype | None, task: str = "causal_lm"):
    """The training objective of method `cfg` for the attached `model` (next-token cross-entropy unless the method
    registered its own; cross-entropy over classes for task classification). Built before any weight is trained: a
    reference model is taken from the weights as they are."""
    if task == "classification":
        from tunelab.methods import classification

        return classification.objective(cfg, model, tokenizer, dtype)
    hook = OBJECTIVES.get(cfg.name)
    if hook is None:
        from tunelab.train.objective import Objective

        return Objective()
    return hook(cfg, model, tokenizer, dtype)


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


from tunelab.methods import bottleneck, distill, dpo, freeze, full, peft_adapters, qlora, reward

register_method("full", full.attach)
register_method("freeze", freeze.attach)
for _name in ("lora", "rslora", "dora", "ia3", "loha", "lokr", "prefix_tuning", "prompt_tuning"):
    register_method(_name, peft_adapters.attach, peft_adapters.check_model_config)
register_method("qlora", qlora.attach, qlora.load_kwargs)
register_method("dpo", dpo.attach, dpo.load_kwargs, dpo.objective)
register_method("reward", reward.attach, reward.load_kwargs, reward.objective)
register_method("adapter", bottleneck.attach)
register_method("distill", distill.attach, distill.load_kwargs, distill.objective)
