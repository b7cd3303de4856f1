"""Generate one left-padded batch of rows with `model.generate`, each row with its own token limit and stop strings.

    rows = [RowSpec(prompt_ids, max_tokens=16, stop=("\\n\\n",))]
    results = generate_rows(model, tokenizer, rows, temperature=0.0, top_p=1.0)
    results[0].text, results[0].finish_reason, results[0].completion_tokens

Rows of one batch share the sampling settings (temperature, top_p, seed); everything else is per row. A
`RowTracker` is handed to `generate` as a stopping criterion: after every step it reads each row's new token, decodes
the row so far, ends the row at its end-of-turn token, at a stop string or at its token limit, and passes the new text
to the row's `on_text` callback (streaming). Text that could be the start of a stop string is held back until it is
clear it is not one, so a streamed reply never shows part of a stop string.

Sampling uses the same settings as `tunelab generate` (`tunelab.generate.generation_kwargs`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.generate import generation_kwargs


@dataclass(eq=False)
class RowSpec:
    """One sequence to generate: its prompt token ids, how many tokens at most, and where to stop."""

    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # called with each new piece of text (from the generating thread)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set: stop generating this row


@dataclass
class RowResult:
    text: str
    finish_reason: str  # "stop" (end-of-turn token or stop string), "length" (max_tokens), "cancelled"
    completion_tokens: int  # generated tokens, the end-of-turn token included


class RowTracker(StoppingCriteria):
    """Per-row state while a batch generates: tokens, decoded text, streamed prefix, and whether the row is done."""

    def __init__(self, tokenizer, rows: list[RowSpec]) -> None:
        self.tokenizer = tokenizer
        self.rows = rows
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.ids: list[list[int]] = [[] for _ in rows]
        self.text = [""] * len(rows)
        self.sent = [0] * len(rows)  # characters already handed to on_text
        self.finish: list[str | None] = [None] * len(rows)
        self.eos_seen = [False] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.finish[i] is None:
                self._step(i, token)
        return torch.tensor([f is not None for f in self.finish], dtype=torch.bool, device=input_ids.device)

    def _step(self, i: int, token: int) -> None:
        row = self.rows[i]
        if row.cancelled.is_set():
            self.finish[i] = "cancelled"
            return
        if token in self.eos:
            self.eos_seen[i] = True
            self._end(i, "stop")
            return
        self.ids[i].append(token)
        text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
        cut = min((at for at in (text.find(s) for s in row.stop) if at >= 0), default=-1)
        if cut >= 0:
            self.text[i] = text[:cut]
            self._end(i, "stop")
            return
        self.text[i] = text
        if len(self.ids[i]) >= row.max_tokens:
            self._end(i, "length")
            return
        # Hold back a possible stop-string prefix and a trailing incomplete character (bytes of a multi-byte token).
        safe = len(text) - max((len(s) - 1 for s in row.stop), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        self._send(i, safe)

    def _end(self, i: int, reason: str) -> None:
        self.finish[i] = reason
        self._send(i, len(self.text[i]))

    def _send(self, i: int, upto: int) -> None:
        on_text = self.rows[i].on_text
        if on_text is not None and upto > self.sent[i]:
            on_text(self.text[i][self.sent[i] : upto])
            self.sent[i] = upto

    def results(self) -> list[RowResult]:
        out = []
        for i in range(len(self.rows)):
            if self.finish[i] is None:  # generate stopped on its own limit: the longest row's max_tokens
                self._end(i, "length")
            out.append(RowResult(self.text[i], self.finish[i], len(self.ids[i]) + self.eos_seen[i]))
        return out


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[RowSpec], temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None) -> list[RowResult]:
    """Generate every row in one left-padded batch (greedy when temperature is 0); returns one result per row."""
    width = max(len(r.prompt_ids) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
        attention_mask[i, width - len(row.prompt_ids) :] = 1
    device = next(model.parameters()).device
    tracker = RowTracker(tokenizer, rows)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = generation_kwargs(tokenizer, max(r.max_tokens for r in rows), temperature, top_p)
    model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   stopping_criteria=StoppingCriteriaList([tracker]), **kwargs)
    return tracker.results()
