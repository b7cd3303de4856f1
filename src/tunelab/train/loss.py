"""The causal-LM loss, computed only where labels are trained, without ever holding the whole logits tensor.

The LM head runs on the hidden states of trained positions only, so prompt tokens and padding produce no logits, and
it runs chunk by chunk inside one autograd function that also computes the chunk's gradients (Liger's fused linear
cross-entropy, in plain PyTorch): a `trained tokens x vocabulary` tensor never exists, in the forward or the backward
(for a 49k vocabulary and 2k trained tokens that is 400 MB in fp32, more than the rest of a LoRA step's activations).
Returns the summed loss and the token count so gradient accumulation can normalise by the tokens of the whole step.

Preference objectives need each row's summed log-probability instead of one sum (`sequence_log_probs`); their fused
head (`linear_log_probs`) returns per-token log-probabilities and recomputes the chunk's logits in the backward pass,
since how much each token's gradient counts is only known once the rows' log-probabilities have met in the loss.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE
from tunelab.train.precision import cached_cast


def _backbone_and_head(model):
    """(decoder, LM head, logit softcap) to call directly; decoder None when only the model's own forward is right:
    prefix and prompt tuning (PEFT) add their virtual tokens inside that forward."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None, None, None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return decoder, head, softcap


def causal_lm_loss(model, batch: dict[str, torch.Tensor], prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained positions, and how many positions that is. With `prefix`, the
    batch holds the rows without their shared first tokens, whose keys and values the prefix holds."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    n = int(keep.sum())
    # Packed rows carry position_ids and no attention mask: transformers then builds a block-diagonal causal mask.
    # (Only without a KV cache: with one, transformers does not look for packed sequences.)
    positions = "position_ids" if "position_ids" in batch else "attention_mask"
    if prefix is not None:
        inputs = prefix.inputs(batch)
    else:
        inputs = {"input_ids": batch["input_ids"], positions: batch[positions], "use_cache": False}
        if positions == "attention_mask" and right_padded(batch["attention_mask"]):
            inputs.pop("attention_mask")  # causal attention: a row's real tokens never see the padding after them
    decoder, head, softcap = _backbone_and_head(model)
    if decoder is None or not _plain_linear(head):
        selected = logits_where(model, inputs, keep, shift=True)
        return F.cross_entropy(selected.float(), labels[keep], reduction="sum"), n
    hidden = decoder(**inputs).last_hidden_state[:, :-1][keep]
    return linear_cross_entropy(hidden, head.weight, labels[keep], softcap), n


MIN_SHARED_PREFIX = 8  # shorter common starts are not worth a separate pass


class SharedPrefix:
    """The first tokens that every row of an evaluation or of a training step shares (a chat template's system prompt
    and turn header: 24 of the ~195 tokens of an Alpaca row for SmolLM2), run once; each batch then runs only the rest
    of its rows, attending to the prefix's cached keys and values.

    In training (`find(..., train=True)`) the prefix runs with gradients, once per optimizer step: every micro-batch
    reads its keys and values as leaf tensors, whose gradients add up over the step's micro-batches (and threads), and
    `backward()` then sends their sum through the prefix's own graph, once. The gradients are those of the rows run
    whole, up to the order of a floating-point sum.

    `find` returns None unless it applies: a plain causal LM whose decoder keeps a plain `DynamicCache` (no sliding
    windows, no recurrent state), unpacked rows, no trained label inside the prefix (its logits are never computed), and
    a prefix of at least `MIN_SHARED_PREFIX` tokens with one token of every row left after it."""

    def __init__(self, length: int, layers: list[tuple[torch.Tensor, torch.Tensor]], config) -> None:
        self.length, self.layers, self.config = length, layers, config
        self._sources: list[torch.Tensor] = []  # training: the prefix's keys and values with their graph

    @staticmethod
    def common_length(examples) -> int:
        """Tokens every example starts with, none of them (nor the next one) a trained target, one per row left."""
        first = examples[0].input_ids
        n = len(first) - 1
        for e in examples:
            if e.position_ids is not None:
                return 0
            ids, labels = e.input_ids, e.labels
            n = min(n, len(ids) - 1)
            i = 0
            while i < n and ids[i] == first[i] and labels[i + 1] == IGNORE:
                i += 1
            n = i
            if n < MIN_SHARED_PREFIX:
                return 0
        return n

    @classmethod
    def find(cls, model, examples, device: torch.device, train: bool = False) -> SharedPrefix | None:
        """The prefix of `examples`, run (with gradients when `train`), or None where it does not apply."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if len(examples) < 2 or torch.is_grad_enabled() != train:
            return None
        decoder, head, _ = _backbone_and_head(model)
        if decoder is None or not _plain_linear(head) or (train and getattr(decoder, "gradient_checkpointing", False)):
            return None
        length = cls.common_length(examples)
        if length == 0:
            return None
        ids = torch.tensor([examples[0].input_ids[:length]], device=device)
        cache = decoder(input_ids=ids, use_cache=True).past_key_values
        if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
            return None
        prefix = cls(length, [(layer.keys, layer.values) for layer in cache.layers], decoder.config)
        if train:  # the batches read leaves; backward() takes their gradients through the graph kept here
            prefix._sources = [t for kv in prefix.layers for t in kv]
            prefix.layers = [(k.detach().requires_grad_(k.requires_grad), v.detach().requires_grad_(v.requires_grad))
                             for k, v in prefix.layers]
        return prefix

    def leaves(self) -> list[torch.Tensor]:
        """The keys and values the batches read that take a gradient (training)."""
        return [t for kv in self.layers for t in kv if t.requires_grad]

    def backward(self) -> None:
        """Send the gradients the batches left on the leaves through the prefix's graph, into the parameters' `.grad`."""
        pairs = [(source, leaf.grad) for source, leaf in zip(self._sources, (t for kv in self.layers for t in kv))
                 if leaf.grad is not None]
        self._sources = []
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict:
        """The decoder's inputs for `batch` (rows without the prefix): a copy of the prefix's cache per row, the
        attention mask over prefix and row, positions that go on from the prefix."""
        from transformers import DynamicCache

        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = ids.shape[0]
        cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers],
                             config=self.config)
        positions = torch.arange(self.length, self.length + ids.shape[1], device=ids.device).expand(rows, -1)
        inputs = {"input_ids": ids, "position_ids": positions, "past_key_values": cache, "use_cache": True}
        if not right_padded(mask):  # (see right_padded)
            inputs["attention_mask"] = torch.cat([mask.new_ones(rows, self.length), mask], dim=1)
        return inputs

    def strip(self, example):
        """`example` without the prefix's tokens."""
        return replace(example, input_ids=example.input_ids[self.length:], labels=example.labels[self.length:])


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of a [batch, length] attention mask is its real tokens followed by padding only. Under causal
    attention no real token then sees padding, and the padded positions' outputs are never scored, so the mask can be
    left out: transformers runs plain causal attention (SDPA's is_causal kernels; tunelab's CPU attention skips
    masking)."""
    return mask.dtype != torch.bool and bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(((mask == 0) | (mask == 1)).all())


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunk by chunk (`_chunked_cross_entropy`); its gradients are computed in
    the forward pass and kept for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_rows):
        ctx.weight_dtype = weight.dtype
        total, grad_h, grad_w = _chunked_cross_entropy(hidden, weight, targets, softcap, chunk_rows,
                                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out if grad_h is not None else None,
            (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None,
            None,
            None,
            None,
        )


CHUNK_ELEMENTS = 3 << 22  # logits per matmul: 256 rows of a 49k vocabulary (bf16: 25 MB); 85 and 512 rows ran slower
SOFTMAX_ELEMENTS = 1 << 21  # log-probabilities per log-softmax: 42 rows of a 49k vocabulary, 8 MB in fp32


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, never materializing more than ~`chunk_elements`
    logits at once. Equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` (with
    gradients for `hidden` and, when it requires them, `weight`), in the autocast precision when autocast is on."""
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk_rows)
    return _chunked_cross_entropy(hidden, weight, targets, softcap, chunk_rows, False, False)[0]


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                           chunk_rows: int, want_h: bool,
                           want_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, its gradient for `hidden` or None, for `weight` in fp32 or None), `chunk_rows` rows at a time.

    Each chunk's logits go into one reused buffer, in the matmul dtype. A few rows at a time they are log-softmaxed in
    fp32 into a second reused buffer (the loss); its exp in place is the softmax, and the logits' gradient (softmax -
    onehot) is written back over the logits for the gradient matmuls. So the matmuls run on 256 rows, where they ran
    faster than on 85, and the fp32 work stays in an 8 MB buffer in the cache. With 17 MB buffers allocated afresh for
    each 85-row chunk, the LM head and loss of 200 Alpaca rows (SmolLM2-135M, bf16 evaluation on two threads) took
    14.7 s of thread time; 12.4 s this way."""
    dtype = _compute_dtype(hidden.device.type, hidden.dtype)  # the matmul precision autocast would use
    packed = getattr(weight, "_tunelab_packed", None)  # precision.packed_linears: oneDNN's layout, for inference
    packed = packed[1] if packed is not None and packed[0] == dtype and not (want_h or want_w) else None
    w = cached_cast(weight, dtype) if packed is None else None
    n, vocab = hidden.shape[0], weight.shape[0]
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
    logits_buffer = hidden.new_empty((min(chunk_rows, n), vocab), dtype=dtype) if packed is None else None
    slice_rows = max(1, min(SOFTMAX_ELEMENTS // vocab, chunk_rows, n))
    log_probs = hidden.new_empty((slice_rows, vocab), dtype=torch.float32)
    picked = hidden.new_empty(n, dtype=torch.float32)  # each row's log-probability of its target
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        h = hidden[start:end].to(dtype)
        if packed is None:
            logits = torch.mm(h, w.T, out=logits_buffer[: end - start])
        else:
            logits = torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")
        for a in range(0, end - start, slice_rows):
            part = logits[a : a + slice_rows]
            rows = part.shape[0]
            t = targets[start + a : start + a + rows]
            out = log_probs[:rows]
            if softcap:
                capped = torch.tanh(part.float() / softcap)
                torch.log_softmax(capped * softcap, dim=-1, out=out)
            else:
                torch.log_softmax(part, dim=-1, dtype=torch.float32, out=out)
            torch.gather(out, 1, t[:, None], out=picked[start + a : start + a + rows, None])
            if want_h or want_w:
                d_logits = out.exp_()  # the softmax, in place of the log-probabilities
                d_logits[torch.arange(rows, device=t.device), t] -= 1
                if softcap:
                    d_logits *= 1 - capped * capped
                part.copy_(d_logits)  # in the matmul dtype, over the logits
        if want_h:
            grad_h[start:end] = logits @ w
        if want_w:
            grad_w += (logits.T @ h).float()
    return -picked.sum(), grad_h, grad_w


class _LinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden_i @ weight.T)[target_i] for every row i, chunk by chunk; the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_rows):
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        w = cached_cast(weight, dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = _capped(hidden[start : start + chunk_rows].to(dtype) @ w.T, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            t = targets[start : start + chunk_rows]
            out[start : start + chunk_rows] = logits.gather(1, t[:, None]).squeeze(1) - lse
            lse_all[start : start + chunk_rows] = lse
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.softcap, ctx.chunk_rows, ctx.dtype = softcap, chunk_rows, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse_all = ctx.saved_tensors
        softcap, dtype = ctx.softcap, ctx.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = cached_cast(weight, dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(dtype)
            raw = (h @ w.T).float()
            # d logp / d logits = onehot(target) - softmax, times each row's upstream gradient
            d_logits = (_capped(raw, softcap) - lse_all[rows, None]).exp_().neg_()
            t = targets[rows]
            d_logits[torch.arange(t.shape[0], device=t.device), t] += 1
            d_logits *= grad_out[rows, None]
            if softcap:
                d_logits *= 1 - torch.tanh(raw / softcap) ** 2
            d_logits = d_logits.to(dtype)
            if want_h:
                grad_h[rows] = d_logits @ w
            if want_w:
                grad_w += (d_logits.T @ h).float()
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = logits.float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                     chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Per-row log-probability of `targets` under `hidden @ weight.T` (float32), never holding more than
    ~`chunk_elements` logits at once. Equal to `F.log_softmax(F.linear(hidden, weight).float(), -1)` gathered at the
    targets, with gradients for `hidden` and (when it requires them) `weight`."""
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    return _LinearLogProbs.apply(hidden, weight, targets, softcap, chunk_rows)


def sequence_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed log-probability of its trained tokens (labels != IGNORE), float32, one value per row."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    decoder, head, softcap = _backbone_and_head(model)
    if decoder is None or not _plain_linear(head):
        selected = logits_where(model, inputs, keep, shift=True).float()
        token = -F.cross_entropy(selected, labels[keep], reduction="none")
    else:
        hidden = decoder(**inputs).last_hidden_state[:, :-1][keep]
        token = linear_log_probs(hidden, head.weight, labels[keep], softcap)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(keep.shape[0], dtype=torch.float32, device=token.device).index_add(0, rows, token)


def logits_where(model, inputs: dict, keep: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """Logits only at the positions `keep` marks (of positions[:-1] with `shift`): the LM head never sees the others.
    Training uses it for trained tokens, log-likelihood scoring for scored continuation tokens."""
    decoder, head, softcap = _backbone_and_head(model)
    if decoder is None or head is None:
        # The last input_ids.shape[1] positions are the inputs' (prompt tuning puts its virtual tokens first).
        logits = model(**inputs).logits[:, -inputs["input_ids"].shape[1] :]
        return (logits[:, :-1] if shift else logits)[keep]
    hidden = decoder(**inputs).last_hidden_state
    selected = head((hidden[:, :-1] if shift else hidden)[keep])
    return torch.tanh(selected / softcap) * softcap if softcap else selected
