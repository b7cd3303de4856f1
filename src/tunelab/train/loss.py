"""The causal-LM loss, computed only where labels are trained.

The LM head runs on the hidden states of trained positions only, so prompt tokens and padding produce no logits
(for a 49k vocabulary that is most of the memory of a naive forward). Returns the summed loss and the token count so
gradient accumulation can normalise by the tokens of the whole optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE


def _backbone_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return decoder, head, softcap


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained positions, and how many positions that is."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    n = int(keep.sum())
    # Packed rows carry position_ids and no attention mask: transformers then builds a block-diagonal causal mask.
    # (Only without a KV cache: with one, transformers does not look for packed sequences.)
    positions = "position_ids" if "position_ids" in batch else "attention_mask"
    inputs = {"input_ids": batch["input_ids"], positions: batch[positions], "use_cache": False}
    selected = logits_where(model, inputs, keep, shift=True)
    loss = F.cross_entropy(selected.float(), labels[keep], reduction="sum")
    return loss, n


def logits_where(model, inputs: dict, keep: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """Logits only at the positions `keep` marks (of positions[:-1] with `shift`): the LM head never sees the others.
    Training uses it for trained tokens, log-likelihood scoring for scored continuation tokens."""
    decoder, head, softcap = _backbone_and_head(model)
    if decoder is None or head is None:
        logits = model(**inputs).logits
        return (logits[:, :-1] if shift else logits)[keep]
    hidden = decoder(**inputs).last_hidden_state
    selected = head((hidden[:, :-1] if shift else hidden)[keep])
    return torch.tanh(selected / softcap) * softcap if softcap else selected
