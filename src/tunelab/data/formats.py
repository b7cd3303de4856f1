"""Data formats: each maps one row to an `Example` (a conversation, a preference pair, or raw text). Tokenizing is
elsewhere.

Adding a format is one function and one `register_format(...)` line. Formats validate their row and raise a
`TunelabError` naming `file:line`, the field, the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.data.readers import Record
from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training example: either chat `messages` (role, content, optional weight) or raw `text`.

    A preference pair (format `preference`) is two conversations with the same prompt: `messages` ends with the chosen
    reply and `rejected` with the rejected one; only those two final replies carry weight 1.
    """

    source: str
    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    rejected: list[dict] | None = None
    label: str | None = None  # format `classification`: the class of `text` (ints are kept as their decimal string)


@dataclass(frozen=True)
class DataFormat:
    name: str
    required: tuple[str, ...]
    to_example: Callable[[Record], Example]


FORMATS: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> None:
    FORMATS[fmt.name] = fmt


def _text_field(rec: Record, key: str, fmt: str, required: bool = True) -> str:
    value = rec.row.get(key)
    if value is None:
        if required:
            raise TunelabError(f"{rec.where}: {key}: missing field (format '{fmt}' needs {', '.join(FORMATS[fmt].required)})")
        return ""
    if not isinstance(value, str):
        raise TunelabError(f"{rec.where}: {key}: expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise TunelabError(f"{rec.where}: {key}: empty; fill it in or remove the row")
    return value


def _system(rec: Record) -> list[dict]:
    system = rec.row.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise TunelabError(f"{rec.where}: system: expected a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}]


def alpaca(rec: Record) -> Example:
    instruction = _text_field(rec, "instruction", "alpaca")
    extra = _text_field(rec, "input", "alpaca", required=False)
    output = _text_field(rec, "output", "alpaca")
    messages = _system(rec)
    history = rec.row.get("history") or []
    if not isinstance(history, list):
        raise TunelabError(f"{rec.where}: history: expected a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TunelabError(f"{rec.where}: history[{i}]: expected a pair [instruction, response] of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(rec.where, messages)


def prompt_response(rec: Record) -> Example:
    prompt = _text_field(rec, "prompt", "prompt_response")
    response = _text_field(rec, "response", "prompt_response")
    return Example(rec.where, _system(rec) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def chat_messages(rec: Record) -> Example:
    messages = rec.row.get("messages")
    if messages is None:
        raise TunelabError(f"{rec.where}: messages: missing field (format 'messages' needs a list of {{role, content}})")
    if not isinstance(messages, list):
        raise TunelabError(f"{rec.where}: messages: expected a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise TunelabError(f"{rec.where}: messages: empty conversation; add user and assistant turns or remove the row")
    out = chat_turns(messages, f"{rec.where}: messages")
    if not any(m["role"] == "assistant" for m in out):
        raise TunelabError(f"{rec.where}: messages: no assistant message; nothing to learn from this row")
    check_turn_order(out, f"{rec.where}: messages")
    return Example(rec.where, out)


def chat_turns(messages: list, where: str) -> list[dict]:
    """Validate OpenAI-style chat turns (`where` names the list, e.g. `data.jsonl:3: messages`); return clean copies.

    Raises:
        TunelabError: a turn is not an object, has a bad role, a non-string or empty content, an unknown key or a bad
            weight; a system message that is not first.
    """
    out = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise TunelabError(f"{at}: expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TunelabError(f"{at}.role: bad role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise TunelabError(f"{at}: a system message must come first")
        if not isinstance(content, str):
            raise TunelabError(f"{at}.content: expected a string, got {type(content).__name__}")
        if not content.strip() and role != "system":
            raise TunelabError(f"{at}.content: empty {role} message; fill it in or remove the turn")
        unknown = set(m) - {"role", "content", "weight", "name"}
        if unknown:
            raise TunelabError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}; a message has role, content and optional weight")
        msg = {"role": role, "content": content}
        if "weight" in m:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise TunelabError(f"{at}.weight: must be 0 or 1, got {m['weight']!r}")
            if role != "assistant":
                raise TunelabError(f"{at}.weight: only assistant messages carry a weight")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    return out


def check_turn_order(messages: list[dict], at: str) -> None:
    """A conversation is an optional system message, then user and assistant turns alternating, user first.

    Chat templates and loss masks assume that order; two user turns in a row usually mean a lost reply.

    Raises:
        TunelabError: assistant first, or two turns of the same role in a row.
    """
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if turns and turns[0] != "user":
        raise TunelabError(f"{at}[{len(messages) - len(turns)}]: the conversation starts with an {turns[0]} turn; "
                           "start with a user turn (after an optional system message)")
    offset = len(messages) - len(turns)
    for i in range(1, len(turns)):
        if turns[i] == turns[i - 1]:
            raise TunelabError(f"{at}[{offset + i}]: two {turns[i]} turns in a row; merge them or add the missing "
                               f"{'assistant' if turns[i] == 'user' else 'user'} turn between them")


def raw_text(rec: Record) -> Example:
    return Example(rec.where, text=_text_field(rec, "text", "text"))


def preference(rec: Record) -> Example:
    """`prompt` (a string, or chat turns ending with a user turn) with a `chosen` and a `rejected` reply (each a string
    or a one-message assistant list); optional `system` beside a string prompt."""
    prompt = rec.row.get("prompt")
    if prompt is None:
        raise TunelabError(f"{rec.where}: prompt: missing field (format 'preference' needs {', '.join(FORMATS['preference'].required)})")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise TunelabError(f"{rec.where}: prompt: empty; fill it in or remove the row")
        turns = _system(rec) + [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        if not prompt:
            raise TunelabError(f"{rec.where}: prompt: empty conversation; give the prompt as a string or a list of turns ending with a user turn")
        turns = chat_turns(prompt, f"{rec.where}: prompt")
        check_turn_order(turns, f"{rec.where}: prompt")
        if turns[-1]["role"] != "user":
            raise TunelabError(f"{rec.where}: prompt[{len(turns) - 1}]: the prompt's last turn is {turns[-1]['role']!r}; "
                               "end it with the user turn that chosen and rejected answer")
        if "system" in rec.row:
            raise TunelabError(f"{rec.where}: system: put the system message first in the prompt list instead")
        turns = [{**t, "weight": 0} if t["role"] == "assistant" else t for t in turns]  # only the replies compared train
    else:
        raise TunelabError(f"{rec.where}: prompt: expected a string or a list of {{role, content}} turns, got {type(prompt).__name__}")
    chosen, rejected = _reply(rec, "chosen"), _reply(rec, "rejected")
    if chosen == rejected:
        raise TunelabError(f"{rec.where}: rejected: the same text as chosen; a pair needs two different replies "
                           "(fix one or remove the row)")
    return Example(rec.where, turns + [{"role": "assistant", "content": chosen}],
                   rejected=turns + [{"role": "assistant", "content": rejected}])


def _reply(rec: Record, key: str) -> str:
    """A preference reply: a string, or a list holding one assistant message (TRL's conversational layout)."""
    value = rec.row.get(key)
    if value is None:
        raise TunelabError(f"{rec.where}: {key}: missing field (format 'preference' needs {', '.join(FORMATS['preference'].required)})")
    if isinstance(value, list):
        if len(value) != 1:
            raise TunelabError(f"{rec.where}: {key}: expected one assistant message, got a list of {len(value)}; "
                               "give the reply as a string or [{\"role\": \"assistant\", \"content\": ...}]")
        (turn,) = chat_turns(value, f"{rec.where}: {key}")
        if turn["role"] != "assistant":
            raise TunelabError(f"{rec.where}: {key}[0].role: a reply must be an assistant message, got {turn['role']!r}")
        return turn["content"]
    if not isinstance(value, str):
        raise TunelabError(f"{rec.where}: {key}: expected a string or a one-message assistant list, got {type(value).__name__}")
    if not value.strip():
        raise TunelabError(f"{rec.where}: {key}: empty; fill it in or remove the row")
    return value


def classification(rec: Record) -> Example:
    """`text` to classify and its `label` (a string or an integer; the set of labels comes from the training rows)."""
    text = _text_field(rec, "text", "classification")
    label = rec.row.get("label")
    if label is None:
        raise TunelabError(f"{rec.where}: label: missing field (format 'classification' needs text, label)")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise TunelabError(f"{rec.where}: label: expected a string or an integer, got {type(label).__name__}")
    if not str(label).strip():
        raise TunelabError(f"{rec.where}: label: empty; fill it in or remove the row")
    return Example(rec.where, text=text, label=str(label).strip())


def label_names(train: list[Example], held_out: dict[str, list[Example]]) -> list[str]:
    """The classes of a classification dataset, from its training rows: integers in numeric order, else sorted.

    Raises:
        TunelabError: fewer than two classes in train, or a validation/test row whose label train never has.
    """
    names = sorted({ex.label for ex in train}, key=lambda n: (0, int(n), "") if _is_int(n) else (1, 0, n))
    if len(names) < 2:
        only = f"every training row has label {names[0]!r}" if names else "no training rows"
        raise TunelabError(f"data.train: classification needs at least two labels, but {only}; add rows of the other "
                           "class(es)")
    known = set(names)
    for split, examples in held_out.items():
        for ex in examples:
            if ex.label not in known:
                raise TunelabError(f"{ex.source}: label: {ex.label!r} never occurs in the training data (data.{split}; "
                                   f"training labels: {', '.join(names)}); fix the label or add training rows with it")
    return names


def _is_int(name: str) -> bool:
    return name.lstrip("-").isdigit()


register_format(DataFormat("alpaca", ("instruction", "output"), alpaca))
register_format(DataFormat("prompt_response", ("prompt", "response"), prompt_response))
register_format(DataFormat("messages", ("messages",), chat_messages))
register_format(DataFormat("text", ("text",), raw_text))
register_format(DataFormat("preference", ("prompt", "chosen", "rejected"), preference))
register_format(DataFormat("classification", ("text", "label"), classification))


def detect_format(rec: Record) -> str:
    """Name the format whose required keys the row has (the most specific one wins).

    Raises:
        TunelabError: no format fits the row's keys.
    """
    keys = set(rec.row)
    for name in ("messages", "alpaca", "preference", "prompt_response", "text"):
        if set(FORMATS[name].required) <= keys:
            return name
    raise TunelabError(
        f"{rec.where}: cannot tell the data format from the keys {sorted(keys)}; "
        f"set data.format to one of {', '.join(FORMATS)} (fields: alpaca=instruction/input/output, "
        "prompt_response=prompt/response, messages=messages, text=text, preference=prompt/chosen/rejected)"
    )


def to_examples(records: list[Record], fmt: str | None) -> tuple[list[Example], str]:
    """Convert rows to examples with the given (or detected) format; returns the examples and the format name."""
    if not records:
        raise TunelabError("the data files contain no rows; add rows to the training file")
    name = fmt or detect_format(records[0])
    convert = FORMATS[name].to_example
    return [convert(r) for r in records], name
