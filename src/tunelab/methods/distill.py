"""Knowledge distillation on ordinary training rows: the student learns the data's tokens and the teacher's distribution.

    method: {name: distill, teacher: runs/big-teacher, alpha: 0.5, temperature: 2.0, adapter: {name: lora, r: 16}}

Per trained token (the positions the cross-entropy loss trains on; prompts and padding produce no logits):

    loss = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al.: T^2 keeps the soft term's gradients on the scale of the hard term's as T grows). The student is the base
model with the inner `adapter` method attached, as for dpo. The teacher is any model spec `tunelab generate` accepts (a
run directory, an HF directory, a .gguf, a hub id, 'default'), loaded once, LoRA merged into it, frozen, in eval mode,
and in bf16 when training autocasts to bf16. It must use the student's tokenizer vocabulary (checked before training).

The LM heads run on the trained positions only and chunk by chunk under activation checkpointing, so at most one
chunk's `tokens x vocabulary` logits (student and teacher) exist at a time, in the forward and in the backward.
Evaluation reports `eval_ce` and `eval_kl` (per trained token, KL at temperature T) beside `eval_loss`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError
from tunelab.train.loss import _backbone_and_head, logits_where
from tunelab.train.objective import Objective, add_stats


def attach(model: nn.Module, cfg) -> nn.Module:
    """The student: the inner adapter method attached as it would be on its own."""
    from tunelab.methods import attach_method

    return attach_method(model, cfg.adapter)


def load_kwargs(cfg, source, device: torch.device) -> dict:
    from tunelab.methods import method_load_kwargs

    return method_load_kwargs(cfg.adapter, source, device)


def objective(cfg, model: nn.Module, tokenizer, dtype: torch.dtype | None) -> DistillObjective:
    teacher = load_teacher(cfg.teacher, tokenizer, model)
    teacher = teacher.to(next(model.parameters()).device)
    if dtype == torch.bfloat16:
        teacher = teacher.to(torch.bfloat16)  # half the memory; autocast computes in bf16 anyway
    return DistillObjective(teacher, cfg.alpha, cfg.temperature)


def load_teacher(spec: str, student_tokenizer, student: nn.Module | None = None) -> nn.Module:
    """The frozen teacher model, after checking that its tokenizer is the student's.

    Raises:
        TunelabError: the teacher cannot be found or loaded, or its vocabulary or logit size differs from the student's.
    """
    from tunelab.generate import is_run_dir, load_for_inference

    path = Path(spec)
    if is_run_dir(path):
        from transformers import AutoTokenizer

        teacher_tokenizer = AutoTokenizer.from_pretrained(path / "model")
    else:
        from tunelab.models.loading import load_tokenizer, resolve_model

        try:
            teacher_tokenizer = load_tokenizer(resolve_model(spec))
        except TunelabError as exc:
            raise TunelabError(f"method.teacher: {str(exc).removeprefix('model: ')}") from None
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise TunelabError(f"method.teacher: '{spec}' uses another tokenizer ({len(teacher_tokenizer)} tokens, the student "
                           f"{len(student_tokenizer)}); distill from a teacher that shares the student's tokenizer")
    teacher, _ = load_for_inference(spec)
    if hasattr(teacher, "peft_config"):
        teacher = teacher.merge_and_unload()  # one plain model: faster, and nothing to switch off
    teacher.eval().requires_grad_(False)
    head, student_head = teacher.get_output_embeddings(), student.get_output_embeddings() if student is not None else None
    if student_head is not None and head is not None and head.weight.shape[0] != student_head.weight.shape[0]:
        raise TunelabError(f"method.teacher: '{spec}' scores {head.weight.shape[0]} tokens, the student "
                           f"{student_head.weight.shape[0]}; the teacher and student need the same vocabulary")
    return teacher


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of the student against targets, summed KL(teacher || student) at temperature T), float32."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum()
    return ce, kl


class DistillObjective(Objective):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), summed over trained tokens."""

    metric_names = ("ce", "kl")

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0,
                 chunk_elements: int = 1 << 24) -> None:
        self.teacher, self.alpha, self.temperature, self.chunk_elements = teacher, alpha, temperature, chunk_elements

    def loss(self, model, batch, stats=None):
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        n = int(keep.sum())
        targets = labels[keep]
        positions = "position_ids" if "position_ids" in batch else "attention_mask"
        inputs = {"input_ids": batch["input_ids"], positions: batch[positions], "use_cache": False}
        decoder, head, softcap = _backbone_and_head(model)
        t_decoder, t_head, t_softcap = _backbone_and_head(self.teacher)
        if decoder is None or t_decoder is None:  # prompt/prefix tuning: the model's own forward, all logits at once
            with torch.no_grad():
                teacher_logits = logits_where(self.teacher, inputs, keep, shift=True)
            ce, kl = distill_terms(logits_where(model, inputs, keep, shift=True), teacher_logits, targets, self.temperature)
        else:
            hidden = decoder(**inputs).last_hidden_state[:, :-1][keep]
            with torch.no_grad():
                t_hidden = t_decoder(**inputs).last_hidden_state[:, :-1][keep]

            def chunk_terms(h: torch.Tensor, t_h: torch.Tensor, t: torch.Tensor):
                with torch.no_grad():
                    teacher_logits = _capped(t_head(t_h), t_softcap)
                return distill_terms(_capped(head(h), softcap), teacher_logits, t, self.temperature)

            rows = max(1, self.chunk_elements // max(head.weight.shape[0], 1))
            ce = kl = torch.zeros((), device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                part = slice(start, start + rows)
                if torch.is_grad_enabled():  # keep only the chunk's inputs; its logits are recomputed in the backward
                    c, k = checkpoint(chunk_terms, hidden[part], t_hidden[part], targets[part], use_reentrant=False)
                else:
                    c, k = chunk_terms(hidden[part], t_hidden[part], targets[part])
                ce, kl = ce + c, kl + k
        add_stats(stats, ce=ce, kl=kl)
        return self.alpha * ce + (1 - self.alpha) * self.temperature**2 * kl, n


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return torch.tanh(logits / softcap) * softcap if softcap else logits
