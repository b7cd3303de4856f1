"""Shared fixtures: a tiny BPE tokenizer and a tiny Llama built in-process (no downloads), and data-file writers."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prepared-data and eval cache entries of test runs go to throw-away directories, never the user's cache.
os.environ.setdefault("TUNELAB_DATA_CACHE", tempfile.mkdtemp(prefix="tunelab-test-data-cache-"))
os.environ.setdefault("TUNELAB_EVAL_CACHE", tempfile.mkdtemp(prefix="tunelab-test-eval-cache-"))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Extract the ticket as JSON with keys product, category and urgency.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about autumn leaves falling slowly to the ground.",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
    '{"product": "desk lamp", "category": "defect", "urgency": "high", "order_id": null}',
    "Hello! How can I help you today? Thanks, goodbye.",
] * 4


def build_tiny_tokenizer():
    """A byte-level BPE with ChatML special tokens, trained on a few sentences (deterministic, ~400 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.data.tokenize import DEFAULT_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama + tokenizer directory that `model:` can point at."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def alpaca_rows(n: int = 24) -> list[dict]:
    topics = ["fox", "dog", "France", "autumn", "numbers", "ticket"]
    return [
        {"instruction": f"Say something about the {topics[i % len(topics)]}.", "input": "" if i % 2 else f"item {i}",
         "output": f"The {topics[i % len(topics)]} is number {i}."}
        for i in range(n)
    ]


def run_config(model_dir: Path, train: Path, out: Path, **sections) -> dict:
    """A small, fast, fp32, deterministic config dict for the tiny model."""
    cfg = {
        "model": str(model_dir),
        "data": {"train": str(train), "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 0,
                     "warmup_steps": 0, "schedule": "constant"},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "method":
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows())
