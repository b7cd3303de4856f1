"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from torch import nn


def attach(model: nn.Module, cfg) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
