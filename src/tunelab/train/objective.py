"""What a training step optimizes: the one thing a method changes inside the loop.

    objective = build_objective(cfg.method, model, tokenizer, dtype)   # methods/__init__.py picks the method's
    batch = objective.collate(examples, pad_id)       # examples -> tensors
    units = objective.count(batch)                    # what the loss is summed over, known before the forward pass
    loss_sum, units = objective.loss(model, batch)    # summed loss over those units

The loop sums `count` over a step's micro-batches (and over processes) first, then scales each micro-batch's summed loss
by that total, so gradient accumulation and data parallelism give the gradient of the mean over the whole step,
whatever the unit: trained tokens for the causal LM loss, preference pairs for DPO and reward models. Evaluation
reports `loss_sum / units`, plus any `stats` the objective adds up (per unit), e.g. a reward model's pair accuracy.
"""

from __future__ import annotations

import torch

from tunelab.data.dataset import collate, collate_pairs
from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.errors import TunelabError
from tunelab.train.loss import causal_lm_loss


class Objective:
    """Next-token cross-entropy on trained tokens (every method that is not trained on preference pairs)."""

    unit = "token"
    metric_names: tuple[str, ...] = ()  # what `loss` adds to `stats` in evaluation (sums over units)
    # `loss` may run on several threads at once (train/parallel.py): it keeps no state between calls and switches
    # nothing on the model
    thread_safe = True

    def collate(self, examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict[str, torch.Tensor], stats: dict[str, float] | None = None) -> tuple[torch.Tensor, int]:
        """(summed loss, units); with `stats` given, also add this batch's sums of extra metrics to it."""
        return causal_lm_loss(model, batch)

    def eval_metrics(self, stats: dict[str, float], count: int) -> dict[str, float]:
        """The evaluation's extra metrics (logged as eval_<name>) from the sums in `stats` over `count` units: each sum
        per unit, unless an objective derives others (a classifier's macro-F1 from per-class counts)."""
        return {k: stats[k] / max(count, 1) for k in self.metric_names}


class PairObjective(Objective):
    """Objectives over preference pairs: a batch of n pairs is 2n rows, the chosen conversations first."""

    unit = "pair"
    metric_names = ("chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin")
    thread_safe = False  # DPO's reference pass turns the adapter off for the whole model

    def collate(self, examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        if any(e.rejected_ids is None for e in examples):
            raise TunelabError("a preference method got examples without a rejected reply; use data.format: preference")
        return collate_pairs(examples, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2


def add_stats(stats: dict[str, float] | None, **sums: torch.Tensor) -> None:
    """Add detached sums to an evaluation's running totals (nothing to do in training, where stats is None)."""
    if stats is not None:
        for key, value in sums.items():
            stats[key] = stats.get(key, 0.0) + float(value.detach().sum())


def check_data_format(method_cfg, fmt: str) -> None:
    """The prepared data suits the method: preference pairs for dpo/reward, anything else for the rest.

    Raises:
        TunelabError: `data.train: dpo trains on preference pairs, not 'alpaca' rows; ...` (or the other way round).
    """
    from tunelab.config import data_format_problem

    pairs = getattr(method_cfg, "trains_on_pairs", False)
    if pairs != (fmt == "preference"):
        raise TunelabError(f"data.train: {data_format_problem(method_cfg.name, pairs, fmt)}")
