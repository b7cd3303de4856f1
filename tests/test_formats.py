"""Data formats map one row to an Example; a bad row fails with `file:line: field: problem; fix`."""

from __future__ import annotations

import pytest

from tunelab.data.formats import FORMATS, Example, alpaca, chat_messages, detect_format, prompt_response, raw_text, to_examples
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

FILE = "data/train.jsonl"


def rec(row: dict, line: int = 7) -> Record:
    return Record(FILE, line, row)


def error_of(fn, row: dict, line: int = 7) -> str:
    with pytest.raises(TunelabError) as info:
        fn(rec(row, line))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{FILE}:{line}: "), msg
    return msg[len(f"{FILE}:{line}: "):]


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


# ----------------------------------------------------------------------------------------------------------------------
# alpaca


def test_alpaca_without_input() -> None:
    ex = alpaca(rec({"instruction": "Name a colour.", "output": "Blue."}))
    assert ex == Example(f"{FILE}:7", [U("Name a colour."), A("Blue.")])


def test_alpaca_with_input_joins_instruction_and_input() -> None:
    ex = alpaca(rec({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}))
    assert ex.messages == [U("Translate.\n\nBonjour"), A("Hello")]


def test_alpaca_blank_or_null_input_is_ignored() -> None:
    assert alpaca(rec({"instruction": "Hi", "input": "  ", "output": "Yo"})).messages == [U("Hi"), A("Yo")]
    assert alpaca(rec({"instruction": "Hi", "input": None, "output": "Yo"})).messages == [U("Hi"), A("Yo")]


def test_alpaca_with_system() -> None:
    ex = alpaca(rec({"system": "Be terse.", "instruction": "Hi", "output": "Yo"}))
    assert ex.messages == [{"role": "system", "content": "Be terse."}, U("Hi"), A("Yo")]


def test_alpaca_with_history_pairs() -> None:
    row = {"system": "S", "instruction": "third", "output": "3", "history": [["first", "1"], ("second", "2")]}
    assert alpaca(rec(row)).messages == [
        {"role": "system", "content": "S"}, U("first"), A("1"), U("second"), A("2"), U("third"), A("3"),
    ]


@pytest.mark.parametrize(
    "history, expected",
    [
        ("first then second", "history: expected a list of [instruction, response] pairs"),
        ([["a", "b"], ["only one"]], "history[1]: expected a pair [instruction, response] of strings"),
        ([["a", "b", "c"]], "history[0]: expected a pair"),
        ([["a", 3]], "history[0]: expected a pair"),
        (["ab"], "history[0]: expected a pair"),
    ],
)
def test_alpaca_bad_history(history, expected: str) -> None:
    msg = error_of(alpaca, {"instruction": "i", "output": "o", "history": history})
    assert msg.startswith(expected)


def test_alpaca_missing_field_names_the_field_and_what_the_format_needs() -> None:
    msg = error_of(alpaca, {"instruction": "i"})
    assert msg.startswith("output: missing field")
    assert "'alpaca'" in msg and "instruction, output" in msg


def test_alpaca_null_field_counts_as_missing() -> None:
    assert error_of(alpaca, {"instruction": None, "output": "o"}).startswith("instruction: missing field")


@pytest.mark.parametrize("field, value, type_name", [("output", 5, "int"), ("instruction", ["a"], "list"), ("input", {"x": 1}, "dict")])
def test_alpaca_non_string_field(field: str, value, type_name: str) -> None:
    row = {"instruction": "i", "input": "", "output": "o", field: value}
    assert error_of(alpaca, row) == f"{field}: expected a string, got {type_name}"


def test_alpaca_empty_required_field() -> None:
    msg = error_of(alpaca, {"instruction": "   ", "output": "o"})
    assert msg.startswith("instruction: empty")


def test_alpaca_non_string_system() -> None:
    assert error_of(alpaca, {"system": 1, "instruction": "i", "output": "o"}) == "system: expected a string, got int"


# ----------------------------------------------------------------------------------------------------------------------
# prompt_response and text


def test_prompt_response() -> None:
    ex = prompt_response(rec({"prompt": "2+2?", "response": "4"}))
    assert ex.messages == [U("2+2?"), A("4")]
    ex = prompt_response(rec({"prompt": "2+2?", "response": "4", "system": "math"}))
    assert ex.messages[0] == {"role": "system", "content": "math"}


def test_prompt_response_missing_and_wrong_type() -> None:
    msg = error_of(prompt_response, {"prompt": "p"})
    assert msg.startswith("response: missing field") and "'prompt_response'" in msg
    assert error_of(prompt_response, {"prompt": 1.5, "response": "r"}) == "prompt: expected a string, got float"


def test_text() -> None:
    ex = raw_text(rec({"text": "Once upon a time."}))
    assert ex.text == "Once upon a time." and ex.messages == []
    assert ex.source == f"{FILE}:7"


def test_text_missing_and_wrong_type() -> None:
    assert error_of(raw_text, {"body": "x"}).startswith("text: missing field")
    assert error_of(raw_text, {"text": ["x"]}) == "text: expected a string, got list"


# ----------------------------------------------------------------------------------------------------------------------
# messages


def test_messages_system_user_assistant() -> None:
    msgs = [{"role": "system", "content": "S"}, U("hi"), A("hello"), U("bye"), A("ciao")]
    assert chat_messages(rec({"messages": msgs})).messages == msgs


def test_messages_empty_system_content_is_allowed_and_name_key_is_dropped() -> None:
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "hi", "name": "bob"}, A("hello")]
    assert chat_messages(rec({"messages": msgs})).messages == [{"role": "system", "content": ""}, U("hi"), A("hello")]


@pytest.mark.parametrize("weight", [0, 1])
def test_messages_assistant_weight_0_or_1_is_kept(weight: int) -> None:
    out = chat_messages(rec({"messages": [U("a"), A("b", weight=weight), U("c"), A("d")]})).messages
    assert out[1] == A("b", weight=weight)
    assert "weight" not in out[3]


def test_messages_weight_on_a_user_message_is_rejected() -> None:
    msg = error_of(chat_messages, {"messages": [{"role": "user", "content": "a", "weight": 1}, A("b")]})
    assert msg == "messages[0].weight: only assistant messages carry a weight"


@pytest.mark.parametrize("weight", [2, -1, 0.5, True, "1", None])
def test_messages_weight_other_than_0_or_1_is_rejected(weight) -> None:
    msg = error_of(chat_messages, {"messages": [U("a"), A("b", weight=weight)]})
    assert msg == f"messages[1].weight: must be 0 or 1, got {weight!r}"


@pytest.mark.parametrize("role", ["bot", "User", None, 3])
def test_messages_bad_role_is_named(role) -> None:
    msg = error_of(chat_messages, {"messages": [U("a"), {"role": role, "content": "b"}, A("c")]})
    assert msg.startswith(f"messages[1].role: bad role {role!r}")
    assert "system, user, assistant" in msg


def test_messages_system_not_first() -> None:
    msg = error_of(chat_messages, {"messages": [U("a"), {"role": "system", "content": "S"}, A("c")]})
    assert msg == "messages[1]: a system message must come first"


def test_messages_empty_conversation() -> None:
    msg = error_of(chat_messages, {"messages": []})
    assert msg.startswith("messages: empty conversation")


@pytest.mark.parametrize("idx, msgs, role", [(0, [U("  "), A("b")], "user"), (1, [U("a"), A("")], "assistant")])
def test_messages_empty_content(idx: int, msgs: list, role: str) -> None:
    msg = error_of(chat_messages, {"messages": msgs})
    assert msg.startswith(f"messages[{idx}].content: empty {role} message")


def test_messages_non_string_content() -> None:
    msg = error_of(chat_messages, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}, A("b")]})
    assert msg == "messages[0].content: expected a string, got list"
    msg = error_of(chat_messages, {"messages": [{"role": "user"}, A("b")]})
    assert msg == "messages[0].content: expected a string, got NoneType"


@pytest.mark.parametrize("value, type_name", [("hi", "str"), ({"role": "user"}, "dict"), (3, "int")])
def test_messages_not_a_list(value, type_name: str) -> None:
    msg = error_of(chat_messages, {"messages": value})
    assert msg.startswith("messages: expected a list") and type_name in msg


def test_messages_element_not_an_object() -> None:
    msg = error_of(chat_messages, {"messages": [U("a"), "assistant: b"]})
    assert msg == "messages[1]: expected an object with role and content, got str"


def test_messages_missing_field() -> None:
    assert error_of(chat_messages, {"conversation": []}).startswith("messages: missing field")


def test_messages_without_assistant_message() -> None:
    msg = error_of(chat_messages, {"messages": [{"role": "system", "content": "S"}, U("a")]})
    assert msg.startswith("messages: no assistant message")


def test_messages_unknown_message_key() -> None:
    msg = error_of(chat_messages, {"messages": [U("a"), A("b", tool_calls=[], loss=1)]})
    assert msg.startswith("messages[1]: unknown key(s) loss, tool_calls")


# ----------------------------------------------------------------------------------------------------------------------
# detection and to_examples


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o", "text": "t"}, "alpaca"),
        ({"prompt": "p", "response": "r"}, "prompt_response"),
        ({"prompt": "p", "response": "r", "text": "t"}, "prompt_response"),
        ({"messages": [U("a"), A("b")]}, "messages"),
        ({"messages": [U("a"), A("b")], "instruction": "i", "output": "o"}, "messages"),
        ({"text": "t", "meta": 1}, "text"),
    ],
)
def test_detect_format(row: dict, expected: str) -> None:
    assert detect_format(rec(row)) == expected


def test_detect_format_unknown_keys_lists_the_formats() -> None:
    msg = error_of(detect_format, {"question": "q", "answer": "a"})
    assert msg.startswith("cannot tell the data format from the keys ['answer', 'question']")
    assert "data.format" in msg
    for name in FORMATS:
        assert name in msg
    assert "alpaca=instruction/input/output" in msg


def test_detect_format_partial_keys_are_not_enough() -> None:
    # instruction without output is not alpaca; prompt without response is not prompt_response
    msg = error_of(detect_format, {"instruction": "i", "prompt": "p"})
    assert "cannot tell the data format" in msg


@pytest.mark.parametrize(
    "rows, name",
    [
        ([{"instruction": "i", "output": "o"}], "alpaca"),
        ([{"prompt": "p", "response": "r"}], "prompt_response"),
        ([{"messages": [U("a"), A("b")]}], "messages"),
        ([{"text": "t"}], "text"),
    ],
)
def test_to_examples_detects_each_format(rows: list, name: str) -> None:
    examples, fmt = to_examples([rec(r, i + 1) for i, r in enumerate(rows)], None)
    assert fmt == name
    assert len(examples) == len(rows)


def test_to_examples_explicit_format_overrides_detection() -> None:
    row = {"instruction": "i", "output": "o", "text": "plain"}
    examples, fmt = to_examples([rec(row)], "text")
    assert fmt == "text" and examples[0].text == "plain"


def test_to_examples_row_in_another_format_names_its_line() -> None:
    records = [rec({"instruction": "i", "output": "o"}, 1), rec({"instruction": "i", "output": "o"}, 2), rec({"prompt": "p", "response": "r"}, 3)]
    with pytest.raises(TunelabError) as info:
        to_examples(records, None)
    assert str(info.value).startswith(f"{FILE}:3: instruction: missing field")


def test_to_examples_no_rows() -> None:
    with pytest.raises(TunelabError, match="contain no rows"):
        to_examples([], None)


def test_examples_keep_their_source_for_later_errors() -> None:
    examples, _ = to_examples([rec({"text": "a"}, 3), rec({"text": "b"}, 9)], None)
    assert [e.source for e in examples] == [f"{FILE}:3", f"{FILE}:9"]
