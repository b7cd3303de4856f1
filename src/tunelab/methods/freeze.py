"""Frozen-layer fine-tuning: train only the top N transformer blocks and/or parameters matching name patterns."""

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
    if cfg.train_top_blocks:
        _, blocks = transformer_blocks(model)
        if cfg.train_top_blocks > len(blocks):
            raise TunelabError(
                f"method.train_top_blocks: {cfg.train_top_blocks} is more than the model's {len(blocks)} blocks; "
                f"use at most {len(blocks)} (or method: full)"
            )
        for block in list(blocks)[-cfg.train_top_blocks :]:
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
