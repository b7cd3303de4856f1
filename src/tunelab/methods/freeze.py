"""Frozen-layer fine-tuning: train only the top N transformer blocks and/or parameters matching name patterns.

    method: {name: freeze, train_top_blocks: 2, train_modules: ["model.norm.*"], unfreeze_every: 50, unfreeze_unit: steps}

Gradual unfreezing (`unfreeze_every`, ULMFiT): `attach` marks every block trainable, so the optimizer holds all of them
from the start; `GradualUnfreezing.apply` then switches `requires_grad` off for the blocks not unfrozen yet before each
step. Those get no gradient, which AdamW skips (no update, no weight decay, no moment), so no optimizer is rebuilt and a
resumed run recomputes the frozen set from its step and epoch.
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn

from tunelab.errors import TunelabError


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the list of transformer blocks (model.layers, transformer.h, ...): the longest ModuleList in the model."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise TunelabError("method: freeze: this model has no list of transformer blocks; use train_modules patterns or method: lora")
    return best


def attach(model: nn.Module, cfg) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train_top_blocks or cfg.unfreeze_every:
        _, blocks = transformer_blocks(model)
        if (cfg.train_top_blocks or 0) > len(blocks):
            raise TunelabError(
                f"method.train_top_blocks: {cfg.train_top_blocks} is more than the model's {len(blocks)} blocks; "
                f"use at most {len(blocks)} (or method: full)"
            )
        trained = list(blocks) if cfg.unfreeze_every else list(blocks)[-cfg.train_top_blocks :]
        for block in trained:  # gradual unfreezing: all of them, frozen again step by step by GradualUnfreezing
            for p in block.parameters():
                p.requires_grad_(True)
    matched = set()
    for name, p in model.named_parameters():
        for pattern in cfg.train_modules:
            if fnmatch(name, pattern):
                p.requires_grad_(True)
                matched.add(pattern)
    missing = [p for p in cfg.train_modules if p not in matched]
    if missing:
        raise TunelabError(
            f"method.train_modules: pattern '{missing[0]}' matches no parameter; names look like "
            f"'{next(iter(dict(model.named_parameters())))}' (use fnmatch patterns such as '*.norm.*')"
        )
    return model


class GradualUnfreezing:
    """Which blocks train at a point of the run: train_top_blocks at first, one more from the top every
    `unfreeze_every` steps (or epochs), until all train. Parameters matched by train_modules always train."""

    def __init__(self, model: nn.Module, cfg) -> None:
        self.blocks = list(transformer_blocks(model)[1])
        self.start, self.every, self.unit = cfg.train_top_blocks or 0, cfg.unfreeze_every, cfg.unfreeze_unit
        self.always = {id(p) for name, p in model.named_parameters() if any(fnmatch(name, pat) for pat in cfg.train_modules)}

    def blocks_trained(self, step: int, epoch: int) -> int:
        """How many of the top blocks train during the step after `step` completed steps (in epoch `epoch`, 0-based)."""
        done = step if self.unit == "steps" else epoch
        return min(len(self.blocks), self.start + done // self.every)

    def apply(self, step: int, epoch: int) -> None:
        top = self.blocks_trained(step, epoch)
        for i, block in enumerate(reversed(self.blocks)):
            for p in block.parameters():
                if id(p) not in self.always:
                    p.requires_grad_(i < top)


def gradual_unfreezing(model: nn.Module, method_cfg) -> GradualUnfreezing | None:
    """The unfreezing schedule of a freeze method with unfreeze_every (also as dpo's or distill's inner adapter)."""
    cfg = getattr(method_cfg, "adapter", method_cfg)
    if getattr(cfg, "name", None) != "freeze" or not cfg.unfreeze_every:
        return None
    return GradualUnfreezing(model, cfg)
