"""Reward model training on prompt/chosen/rejected pairs (data.format: preference): the first half of RLHF.

    method: {name: reward, adapter: {name: lora, r: 16, alpha: 32}}

The base checkpoint loads as transformers' `AutoModelForSequenceClassification` with one label: the decoder plus a
new linear `score` head read at the last token that is not padding (transformers finds it through `pad_token_id`, set
to the tokenizer's). Trained with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) per pair. The inner
`adapter` says what else trains: a PEFT adapter (task SEQ_CLS, so PEFT trains and saves the head in full beside the
adapter) or any other method, with the head always trained. The run's model then reloads with plain transformers
(`AutoModelForSequenceClassification.from_pretrained`, or PEFT on top of it) and scores exactly as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.train.objective import PairObjective, add_stats


def load_kwargs(cfg, source, device: torch.device) -> dict:
    """The inner method's loading arguments plus a one-label score head that pools at the tokenizer's padding."""
    from tunelab.methods import method_load_kwargs
    from tunelab.models.loading import load_tokenizer

    return {**method_load_kwargs(cfg.adapter, source, device), "head": "score",
            "pad_token_id": load_tokenizer(source).pad_token_id}


def attach(model: nn.Module, cfg) -> nn.Module:
    from tunelab.methods import METHODS, peft_adapters

    adapter = cfg.adapter
    if adapter.name in peft_adapters.ADAPTERS:
        return METHODS[adapter.name](model, adapter, task_type="SEQ_CLS")
    model = METHODS[adapter.name](model, adapter)
    for p in score_head(model).parameters():
        p.requires_grad_(True)  # new weights: they always train
    return model


def score_head(model: nn.Module) -> nn.Module:
    """The classification head transformers' *ForSequenceClassification models name `score`."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no score head; load it with load_model(source, head='score')")
    return head


def objective(cfg, model: nn.Module, tokenizer, dtype: torch.dtype | None) -> RewardObjective:
    return RewardObjective()


def scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float32 reward per row."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, 0].float()


class RewardObjective(PairObjective):
    def loss(self, model, batch, stats=None):
        r = scores(model, batch)
        n = r.shape[0] // 2
        margin = r[:n] - r[n:]
        add_stats(stats, reward_accuracy=(margin > 0).float(), reward_margin=margin,
                  chosen_reward=r[:n], rejected_reward=r[n:])
        return -F.logsigmoid(margin).sum(), n
