"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, kind))


def layer_lr_scales(model: torch.nn.Module, decay: float) -> dict[int, float]:
    """Layer-wise learning-rate decay: {id(parameter): factor of the peak learning rate}.

    With L transformer blocks, a parameter of block i (0 = bottom) gets decay^(L-1-i), the input embeddings decay^L
    (a head tied to them too: it is one tensor), everything else (head, final norm, parameters outside the blocks) 1.
    Adapter parameters inside a block (LoRA, bottleneck adapters) count as that block's.
    """
    from tunelab.methods.freeze import transformer_blocks

    prefix, blocks = transformer_blocks(model)
    n = len(blocks)
    scales: dict[int, float] = {}
    for name, p in model.named_parameters():
        rest = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
        index = rest.split(".", 1)[0] if rest else None
        scales[id(p)] = decay ** (n - 1 - int(index)) if index is not None and index.isdigit() else 1.0
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for p in embeddings.parameters() if embeddings is not None else ():
        scales[id(p)] = decay**n
    return scales
