"""Weight penalties against forgetting (`continual.penalty`): keep the trained weights near where they started.

    continual: {penalty: l2sp, penalty_strength: 0.1}
    continual: {penalty: ewc, penalty_strength: 100, ewc_rows: 64, fisher_data: data/old_task.jsonl}

    l2sp (Li et al., 2018)          strength / 2 * sum_i (w_i - w0_i)^2
    ewc  (Kirkpatrick et al., 2017)  strength / 2 * sum_i F_i (w_i - w0_i)^2

over every trained parameter, with w0 its value when training starts and F the diagonal of the empirical Fisher
information: the mean over `ewc_rows` rows (of `fisher_data`, the old task's data, or else the training data) of each
row's squared gradient of its mean token loss, at the starting weights. The loop adds the penalty to each step's loss
once (not per micro-batch) and logs it as `penalty`; `train_loss` stays the data's loss.

For adapter methods the trained parameters are the adapter's, so w0 is the adapter's initialisation: LoRA's A starts
random and B at zero. Penalizing that drift rather than the effective weight change s*B@A keeps one rule for every method
(full, freeze, LoRA, IA3, bottleneck adapters) and bounds the change anyway: ||s B A|| <= s ||B|| ||A||, with B held
near zero and A near its (well-conditioned) start.
"""

from __future__ import annotations

import torch

from tunelab.data.tokenize import Encoded
from tunelab.train.precision import autocast


class WeightPenalty:
    """strength / 2 * sum weight * (p - p0)^2 over the parameters that train (weight 1 for l2sp, the Fisher for ewc)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], strength: float,
                 fisher: dict[str, torch.Tensor] | None = None) -> None:
        self.params = params
        self.anchors = {n: p.detach().clone() for n, p in params.items()}
        self.fisher = fisher
        self.strength = strength

    def __call__(self) -> torch.Tensor:
        total = None
        for name, p in self.params.items():
            if not p.requires_grad:  # a block gradual unfreezing has not unfrozen yet: it has not moved
                continue
            drift = (p.float() - self.anchors[name].float()) ** 2
            term = (drift * self.fisher[name] if self.fisher is not None else drift).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.strength * total


def diagonal_fisher(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], objective, examples: list[Encoded],
                    pad_id: int, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Mean over `examples` of each one's squared gradient of its mean loss per unit (the empirical Fisher's diagonal),
    with the model in eval mode (no dropout)."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for example in examples:
        batch = {k: v.to(device) for k, v in objective.collate([example], pad_id).items()}
        with autocast(device, dtype):
            loss, units = objective.loss(model, batch)
        grads = torch.autograd.grad(loss / max(units, 1), list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                fisher[name] += grad.float() ** 2
    model.train(was_training)
    return {n: f / max(len(examples), 1) for n, f in fisher.items()}


def build_penalty(cfg, model: torch.nn.Module, objective, train_examples, tokenizer, pad_id: int, device: torch.device,
                  dtype: torch.dtype | None, seed: int = 0) -> WeightPenalty | None:
    """The penalty `cfg.continual` asks for, anchored at the model's weights now (call it before any step), or None.

    Raises:
        TunelabError: continual.fisher_data has invalid rows or none (as data.train would).
    """
    continual = cfg.continual
    if continual.penalty is None:
        return None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = None
    if continual.penalty == "ewc":
        if continual.fisher_data is not None:
            from tunelab.data.dataset import prepare_data

            data_cfg = cfg.data.model_copy(update={"train": continual.fisher_data, "validation": None, "test": None,
                                                   "split": None, "augment": None, "packing": False, "format": None})
            train_examples = prepare_data(data_cfg, tokenizer, seed).train
        rows = [train_examples[i] for i in range(min(continual.ewc_rows, len(train_examples)))]
        fisher = diagonal_fisher(model, params, objective, rows, pad_id, device, dtype)
    return WeightPenalty(params, continual.penalty_strength, fisher)
