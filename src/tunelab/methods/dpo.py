"""DPO: direct preference optimization on prompt/chosen/rejected pairs (data.format: preference).

    method: {name: dpo, beta: 0.1, loss_type: sigmoid, adapter: {name: lora, r: 16, alpha: 32}}

The policy is the base model with the inner `adapter` method attached (LoRA by default; `{name: full}` trains every
weight). The reference is the frozen base model:

- with a PEFT adapter, the same model with its adapter switched off (`model.disable_adapter()`): no second copy;
- otherwise (full, freeze) a frozen copy taken before training, its linear weights stored in the autocast dtype as the
  adapter methods' frozen weights are. A copy rather than reference log-probabilities computed once before training:
  it serves every micro-batch split, every data-parallel shard and resumed runs without bookkeeping per example, at
  the price of one model's weights (half of it in bf16) and one forward pass without gradients per step.

Loss per pair, with d = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)) summed over the
reply tokens: sigmoid -(1-e) log s(beta d) - e log s(-beta d) (e = label_smoothing, conservative DPO); ipo
(d_chosen/|chosen| - d_rejected/|rejected| - 1/(2 beta))^2 with log-ratios averaged per token as TRL does; hinge
max(0, 1 - beta d). Tested equal to TRL 1.16's DPOTrainer loss and gradients (tests/test_preference.py).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.tokenize import IGNORE
from tunelab.train.loss import sequence_log_probs
from tunelab.train.objective import PairObjective, add_stats


def attach(model: nn.Module, cfg) -> nn.Module:
    """The policy: the inner adapter method attached as it would be on its own."""
    from tunelab.methods import attach_method

    return attach_method(model, cfg.adapter)


def load_kwargs(cfg, source, device: torch.device) -> dict:
    from tunelab.methods import method_load_kwargs

    return method_load_kwargs(cfg.adapter, source, device)


def objective(cfg, model: nn.Module, tokenizer, dtype: torch.dtype | None) -> DpoObjective:
    return DpoObjective(reference_for(model, dtype), cfg.beta, cfg.loss_type, cfg.label_smoothing)


def reference_for(model: nn.Module, dtype: torch.dtype | None):
    """`reference(model, batch) -> per-row log-probs` of the frozen base model the policy started from."""
    if hasattr(model, "disable_adapter"):  # a PEFT model: the base is the model with its adapter off

        def without_adapter(policy, batch):
            with policy.disable_adapter():
                return sequence_log_probs(policy, batch)

        return without_adapter
    from tunelab.train.precision import store_frozen_in

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if dtype is not None:
        store_frozen_in(frozen, dtype)
    return lambda policy, batch: sequence_log_probs(frozen, batch)


class DpoObjective(PairObjective):
    """The DPO loss per pair; `reference(policy, batch)` gives the reference's per-row log-probabilities."""

    def __init__(self, reference, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        self.reference = reference
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def loss(self, model, batch, stats=None):
        logps = sequence_log_probs(model, batch)
        with torch.no_grad(), _eval_mode(model):
            ref = self.reference(model, batch)
        n = logps.shape[0] // 2
        chosen, rejected = logps[:n] - ref[:n], logps[n:] - ref[n:]  # log-ratios policy / reference
        delta = chosen - rejected
        if self.loss_type == "sigmoid":
            eps = self.label_smoothing
            per_pair = -(1 - eps) * F.logsigmoid(self.beta * delta) - eps * F.logsigmoid(-self.beta * delta)
        elif self.loss_type == "ipo":
            lengths = (batch["labels"][:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
            per_pair = (chosen / lengths[:n] - rejected / lengths[n:] - 1 / (2 * self.beta)) ** 2
        elif self.loss_type == "hinge":
            per_pair = torch.relu(1 - self.beta * delta)
        else:
            raise ValueError(f"unknown DPO loss_type {self.loss_type!r}")
        add_stats(stats, reward_accuracy=(delta > 0).float(), reward_margin=self.beta * delta,
                  chosen_reward=self.beta * chosen, rejected_reward=self.beta * rejected)
        return per_pair.sum(), n


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """The reference runs without dropout (the base model as it is), then the policy's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
