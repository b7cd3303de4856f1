"""The yardstick every export is held to: fixed prompts rendered with the run's chat template, the source model's logits and
greedy replies on them, a fixed batch to time forwards on, and the run's validation examples for the eval loss.

    probe = build_probe(source_model, tokenizer, validation_examples, note)
    stats = measure_model(exported_model, probe, greedy=True)   # max |dlogit|, top-1 agreement, ms/forward, eval loss

`exported_model` is anything called like an HF causal LM (`model(input_ids=..., attention_mask=...)`) that returns an
object with `.logits`: a transformers model, or the onnxruntime adapter in `tunelab.export.onnx`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.tokenize import Encoded

PARITY_PROMPTS = (
    "Say something about the fox.",
    "Extract the ticket as JSON: my desk lamp broke on arrival, order #A12345.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
)
GREEDY_PROMPTS = 3  # the first prompts also get a greedy-reply check
GREEDY_NEW_TOKENS = 16
BENCH_SHAPE = (4, 128)  # the fixed batch for ms/forward: 4 rows of 128 tokens
BENCH_MIN_RUNS, BENCH_MAX_RUNS, BENCH_BUDGET_S = 3, 10, 3.0
EVAL_BATCH = 8
EVAL_LIMIT = 200  # validation examples scored per model (the first ones, in file order)


@dataclass
class Probe:
    prompts: list[torch.Tensor]  # (1, n) token ids of each parity prompt, chat template applied
    logits: list[torch.Tensor]  # the source model's logits for them
    greedy: list[list[int]]  # the source model's greedy reply tokens for the first GREEDY_PROMPTS prompts
    bench: dict[str, torch.Tensor]  # input_ids + attention_mask of the fixed timing batch
    validation: list[Encoded]
    validation_note: str
    pad_id: int
    eos_ids: frozenset[int]


@dataclass
class ModelStats:
    max_abs_logit_diff: float
    top1_agreement: float
    ms_per_forward: float
    eval_loss: float | None
    greedy_match: str | None = None  # "3/3" prompts whose greedy reply tokens equal the source model's


def render_prompts(tokenizer) -> list[torch.Tensor]:
    out = []
    for text in PARITY_PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        out.append(torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]], dtype=torch.long))
    return out


def bench_batch(prompts: list[torch.Tensor], max_positions: int | None) -> dict[str, torch.Tensor]:
    """BENCH_SHAPE tokens cut from the parity prompts repeated (each row starts elsewhere), no padding."""
    rows, width = BENCH_SHAPE
    width = min(width, max_positions or width)
    stream = torch.cat([p[0] for p in prompts])
    stream = stream.repeat(width * (rows + 1) // len(stream) + 2)
    ids = torch.stack([stream[r * 7 : r * 7 + width] for r in range(rows)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


@torch.no_grad()
def greedy_reply(model: Any, ids: torch.Tensor, eos_ids: frozenset[int], n: int = GREEDY_NEW_TOKENS) -> list[int]:
    """Greedy decoding without a KV cache (every step runs the whole sequence), as an exported graph without cache
    inputs must; stops after an end-of-turn token."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits_of(model, ids)[0, -1].argmax())
        out.append(nxt)
        if nxt in eos_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@torch.no_grad()
def reference_greedy(model: Any, tokenizer, prompts: list[torch.Tensor], eos_ids: frozenset[int]) -> list[list[int]]:
    """The source model's greedy replies through `generate` (with its KV cache), cut after the first end-of-turn token."""
    from tunelab.generate import generation_kwargs

    replies = []
    for ids in prompts[:GREEDY_PROMPTS]:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **generation_kwargs(tokenizer, GREEDY_NEW_TOKENS, 0.0, 1.0))[0, ids.shape[1] :].tolist()
        cut = next((i + 1 for i, t in enumerate(out) if t in eos_ids), len(out))
        replies.append(out[:cut])
    return replies


@torch.no_grad()
def ms_per_forward(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """Fastest of several forwards over the fixed batch, after one warm-up run (the minimum, not the median, because on a
    shared machine every other process only ever adds time)."""
    model(**batch, use_cache=False)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < BENCH_MIN_RUNS or (len(times) < BENCH_MAX_RUNS and time.perf_counter() - start < BENCH_BUDGET_S):
        tick = time.perf_counter()
        model(**batch, use_cache=False)
        times.append(time.perf_counter() - tick)
    return min(times) * 1000


def eval_loss(model: Any, probe: Probe) -> float | None:
    """Token-weighted loss on the run's validation examples, with the training loop's own evaluation."""
    if not probe.validation:
        return None
    from tunelab.train.loop import evaluate_loss

    return evaluate_loss(model, probe.validation, EVAL_BATCH, probe.pad_id, torch.device("cpu"), None)


def eos_token_ids(tokenizer, model: Any) -> frozenset[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return frozenset(i for i in ids if i is not None)


def build_probe(model: Any, tokenizer, validation: list[Encoded], validation_note: str) -> Probe:
    """Everything the source model contributes to the comparison, computed once before it is merged."""
    prompts = render_prompts(tokenizer)
    eos_ids = eos_token_ids(tokenizer, model)
    config = getattr(model, "config", None)
    return Probe(prompts, [logits_of(model, p) for p in prompts], reference_greedy(model, tokenizer, prompts, eos_ids),
                 bench_batch(prompts, getattr(config, "max_position_embeddings", None)), validation[:EVAL_LIMIT], validation_note,
                 tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, eos_ids)


def compare_logits(model: Any, probe: Probe) -> tuple[float, float]:
    """(max |logit difference|, fraction of positions with the same top token) over the parity prompts."""
    worst, same, total = 0.0, 0, 0
    for ids, ref in zip(probe.prompts, probe.logits):
        got = logits_of(model, ids)
        worst = max(worst, float((got - ref).abs().max()))
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[1]
    return worst, same / max(total, 1)


def measure_model(model: Any, probe: Probe, greedy: bool = False) -> ModelStats:
    worst, agree = compare_logits(model, probe)
    stats = ModelStats(worst, agree, ms_per_forward(model, probe.bench), eval_loss(model, probe))
    if greedy:
        matches = sum(greedy_reply(model, ids, probe.eos_ids) == ref for ids, ref in zip(probe.prompts, probe.greedy))
        stats.greedy_match = f"{matches}/{len(probe.greedy)}"
    return stats
