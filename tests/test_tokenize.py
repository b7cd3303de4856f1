"""The loss mask: only assistant turns carry loss (unless train_on_inputs), weights 0/1, truncation, long prompts."""

from __future__ import annotations

import pytest

from tunelab.data.formats import Example
from tunelab.data.tokenize import IGNORE, encode_example, render
from tunelab.errors import TunelabError


def trained_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])


def test_only_assistant_tokens_are_trained(tiny_tokenizer):
    ex = Example("f:1", [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris is the capital."}])
    [enc] = encode_example(ex, tiny_tokenizer, 128)
    assert enc.input_ids == tiny_tokenizer(render(tiny_tokenizer, ex.messages), add_special_tokens=False)["input_ids"]
    # The reply and its end-of-turn token are trained; the prompt and the generation header are not.
    assert trained_text(tiny_tokenizer, enc) == "Paris is the capital.<|im_end|>\n"
    assert enc.labels[: enc.input_ids.index(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1] == [IGNORE] * (
        enc.input_ids.index(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1
    )


def test_multi_turn_weights_select_turns(tiny_tokenizer):
    ex = Example("f:1", [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I help?", "weight": 0},
        {"role": "user", "content": "Say the capital of France."},
        {"role": "assistant", "content": "Paris.", "weight": 1},
    ])
    [enc] = encode_example(ex, tiny_tokenizer, 256)
    assert trained_text(tiny_tokenizer, enc) == "Paris.<|im_end|>\n"


def test_train_on_inputs_trains_everything(tiny_tokenizer):
    ex = Example("f:1", [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
    [enc] = encode_example(ex, tiny_tokenizer, 128, train_on_inputs=True)
    assert enc.labels == enc.input_ids


def test_long_response_is_truncated_not_dropped(tiny_tokenizer):
    ex = Example("f:1", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the lazy dog " * 40}])
    [enc] = encode_example(ex, tiny_tokenizer, 32)
    assert len(enc.input_ids) == 32 and enc.truncated and enc.n_trained > 0


def test_prompt_over_max_length_names_the_row(tiny_tokenizer):
    ex = Example("data.jsonl:7", [{"role": "user", "content": "the quick brown fox " * 30}, {"role": "assistant", "content": "ok"}])
    with pytest.raises(TunelabError, match=r"^data.jsonl:7: the prompt alone is \d+ tokens, over data.max_length=16"):
        encode_example(ex, tiny_tokenizer, 16)


def test_all_weights_zero_is_an_error(tiny_tokenizer):
    ex = Example("d.jsonl:3", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0}])
    with pytest.raises(TunelabError, match="d.jsonl:3: nothing to train"):
        encode_example(ex, tiny_tokenizer, 64)


def test_raw_text_is_windowed_and_fully_trained(tiny_tokenizer):
    ex = Example("t.jsonl:1", text="The quick brown fox jumps over the lazy dog. " * 20)
    encs = encode_example(ex, tiny_tokenizer, 32)
    assert len(encs) > 2
    assert all(len(e.input_ids) <= 32 and e.labels == e.input_ids for e in encs)
    flat = [t for e in encs for t in e.input_ids]
    assert flat[-1] == tiny_tokenizer.eos_token_id


def test_smollm_style_template_with_default_system(tiny_tokenizer):
    """Templates that inject a default system prompt (SmolLM2's) still mask it out."""
    smol = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    original = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = smol
    try:
        ex = Example("f:1", [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}])
        [enc] = encode_example(ex, tiny_tokenizer, 128)
        assert trained_text(tiny_tokenizer, enc) == "Hi there<|im_end|>\n"
        assert "You are a helpful assistant" in tiny_tokenizer.decode(enc.input_ids)
    finally:
        tiny_tokenizer.chat_template = original
