"""The one place that turns examples into token ids and a loss mask.

A conversation is rendered with the tokenizer's chat template (the same template `generate`, `chat` and the saved model
use). Which characters belong to trained turns is found by rendering growing prefixes of the conversation, so it works
for any template whose renderings of prefixes are prefixes of the whole (ChatML, Llama 3, Mistral, Gemma, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import Example
from tunelab.errors import TunelabError

IGNORE = -100

# ChatML, used when a tokenizer has no chat template of its own (base models, tiny test tokenizers).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False
    position_ids: list[int] | None = None  # set for packed rows: positions restart at 0 for each example
    full_length: int = 0  # tokens before truncation to max_length
    # A preference pair: input_ids/labels are the prompt with the chosen reply, these the prompt with the rejected one.
    rejected_ids: list[int] | None = None
    rejected_labels: list[int] | None = None

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def batch_tokens(self) -> int:
        """Padded tokens this example takes in a batch: its length, or for a pair two rows as wide as the longer one."""
        if self.rejected_ids is None:
            return len(self.input_ids)
        return 2 * max(len(self.input_ids), len(self.rejected_ids))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_char_spans(tokenizer, messages: list[dict], train_on_inputs: bool) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the text plus the character spans that carry loss.

    By default only assistant turns with weight 1 are trained; `train_on_inputs` trains every token.
    """
    full = render(tokenizer, messages)
    if train_on_inputs:
        return full, [(0, len(full))]
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=m["role"] == "assistant") if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise TunelabError(
                "the model's chat template renders a conversation differently from its prefixes, so trained turns "
                "cannot be located; set data.train_on_inputs: true or use a model with a standard chat template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_example(ex: Example, tokenizer, max_length: int, train_on_inputs: bool = False,
                   label_ids: dict[str, int] | None = None) -> list[Encoded]:
    """Tokenize one example; returns one `Encoded` (or several windows for long raw text).

    A classification example (`ex.label` set; `label_ids` maps label names to class ids) is its text alone, with the
    tokenizer's special tokens ([CLS] ... [SEP] for BERT) and no chat template, cut at max_length; `labels` holds the
    one class id.

    A preference pair encodes its two conversations the same way, each with only its final reply trained, into one
    `Encoded` that carries the rejected side in `rejected_ids`/`rejected_labels`.

    Raises:
        TunelabError: the prompt alone exceeds max_length, or nothing in the example is trained.
    """
    if ex.rejected is not None:
        (chosen,) = encode_example(Example(ex.source, ex.messages), tokenizer, max_length)
        (rejected,) = encode_example(Example(ex.source, ex.rejected), tokenizer, max_length)
        return [Encoded(chosen.input_ids, chosen.labels, ex.source, chosen.truncated or rejected.truncated,
                        full_length=max(chosen.full_length, rejected.full_length),
                        rejected_ids=rejected.input_ids, rejected_labels=rejected.labels)]
    if ex.label is not None:
        if label_ids is None:
            raise TunelabError(f"{ex.source}: a classification row needs the label set (task: classification)")
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
        return [Encoded(ids[:max_length], [label_ids[ex.label]], ex.source, len(ids) > max_length, full_length=len(ids))]
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        return [Encoded(w, list(w), ex.source, truncated=False, full_length=len(w)) for w in windows if len(w) > 1]

    text, spans = trained_char_spans(tokenizer, ex.messages, train_on_inputs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if end > start and any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    first = next((t for t, lab in enumerate(labels) if lab != IGNORE), None)
    if first is None:
        raise TunelabError(f"{ex.source}: nothing to train in this row (every assistant turn has weight 0); remove it or set a weight to 1")
    if first >= max_length:
        raise TunelabError(
            f"{ex.source}: the prompt alone is {first} tokens, over data.max_length={max_length}; "
            "raise data.max_length or shorten the row"
        )
    truncated = len(ids) > max_length
    return [Encoded(ids[:max_length], labels[:max_length], ex.source, truncated, full_length=len(ids))]


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the ChatML one, and a pad token if it lacks one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
