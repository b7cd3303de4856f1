"""The training loop on a tiny in-process Llama: exact seeded losses, resume after kill -9, methods, run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import alpaca_rows, build_tiny_model, run_config, write_jsonl

from tunelab import load_config, train
from tunelab.data.dataset import collate
from tunelab.data.tokenize import IGNORE
from tunelab.train.loss import causal_lm_loss


def losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


# Pinned on the CPU build of torch 2.13.0: a 2-layer Llama, LoRA r=4, fp32, seed 0, 4 steps of batch 4.
EXPECTED_LORA_LOSSES = [6.002763, 5.952822, 5.890039, 5.860994]


def test_seeded_tiny_run_reproduces_exact_losses(tiny_model_dir, alpaca_file, tmp_path):
    result = train(load_config(run_config(tiny_model_dir, alpaca_file, tmp_path / "run")), quiet=True)
    assert losses(result.run_dir) == pytest.approx(EXPECTED_LORA_LOSSES, rel=1e-5)
    # A second run with the same seed is bit-identical.
    again = train(load_config(run_config(tiny_model_dir, alpaca_file, tmp_path / "run2")), quiet=True)
    assert losses(again.run_dir) == losses(result.run_dir)


def test_run_directory_contents(tiny_model_dir, alpaca_file, tmp_path):
    cfg = run_config(tiny_model_dir, alpaca_file, tmp_path / "run", data={"validation": 0.25},
                     training={"max_steps": 6, "eval_every": 3, "save_every": 2, "keep_last": 2})
    run = train(load_config(cfg), quiet=True).run_dir
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").method.name == "lora"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]  # step 0: the untouched model's eval loss
    assert all({"train_loss", "lr", "tokens_per_s"} <= set(r) for r in records[1:])
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 5, 6]  # every 3 steps, epoch end (5), the end
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert any((run / "tensorboard").iterdir())
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "model" / "adapter_model.safetensors").is_file()
    assert "chat_template" in (run / "model" / "tokenizer_config.json").read_text() or (run / "model" / "chat_template.jinja").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_examples"] == 18 and summary["eval_examples"] == 6
    assert summary["initial_eval_loss"] == records[0]["eval_loss"] > summary["final_eval_loss"]
    assert summary["tokens_trained"] > 0 and summary["wall_time_s"] > 0
    assert summary["eval_perplexity"] == pytest.approx(2.718281828 ** summary["final_eval_loss"], rel=1e-4)


def test_eval_loss_goes_down_and_lora_adapter_loads_in_plain_peft(tiny_model_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = run_config(tiny_model_dir, alpaca_file, tmp_path / "run", data={"validation": alpaca_file},
                     training={"max_steps": 30, "eval_every": 10})
    run = train(load_config(cfg), quiet=True).run_dir
    evals = [r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.2
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(run / "model")).eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "Say something about the fox."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # tunelab's own loader gives the same logits.
    from tunelab.generate import load_for_inference

    ours, _ = load_for_inference(run)
    with torch.no_grad():
        assert torch.allclose(ours(**ids).logits, model(**ids).logits, atol=1e-5)


@pytest.mark.parametrize("method, trainable_prefixes", [
    ({"name": "full"}, None),
    ({"name": "freeze", "train_top_blocks": 1}, ("model.layers.1.",)),
    ({"name": "freeze", "train_top_blocks": 0, "train_modules": ["model.norm.*"]}, ("model.norm.",)),
])
def test_full_and_freeze_change_only_what_they_train(tiny_model_dir, alpaca_file, tmp_path, method, trainable_prefixes):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = run_config(tiny_model_dir, alpaca_file, tmp_path / "run", method=method)
    run = train(load_config(cfg), quiet=True).run_dir
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = load_file(run / "model" / "model.safetensors")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed
    if trainable_prefixes is None:
        assert len(changed) >= len(after) - 1
    else:
        assert all(k.startswith(trainable_prefixes) for k in changed)


def test_early_stopping_stops_and_keeps_best(tiny_model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16))
    # Validation answers contradict training, so eval loss rises after the first steps.
    val = [{**r, "output": "Completely different words: autumn leaves haiku ground."} for r in alpaca_rows(8)]
    val_file = write_jsonl(tmp_path / "val.jsonl", val)
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run", data={"validation": str(val_file)},
                     training={"max_steps": 40, "eval_every": 2, "learning_rate": 3e-2,
                               "early_stopping": {"patience": 2}})
    result = train(load_config(cfg), quiet=True)
    s = result.summary
    assert s["stopped_early"] and s["steps"] < 40
    assert s["final_eval_loss"] == pytest.approx(s["best_eval_loss"], abs=1e-5)


def test_masked_loss_equals_transformers_loss(tiny_tokenizer):
    """Computing the head only on trained positions gives the same mean loss as HF's full-logits loss."""
    from tunelab.data.formats import Example
    from tunelab.data.tokenize import encode_example

    model = build_tiny_model(len(tiny_tokenizer))
    examples = [encode_example(Example("x", [{"role": "user", "content": f"Hello {i}"},
                                             {"role": "assistant", "content": "the quick brown fox " * (i + 1)}]),
                               tiny_tokenizer, 64)[0] for i in range(3)]
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    loss_sum, n = causal_lm_loss(model, batch)
    ref = model(**batch).loss  # HF shifts labels and ignores -100
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert float(loss_sum / n) == pytest.approx(float(ref), rel=1e-5)


def _train_cmd(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunelab", "train", str(config_path), "--quiet", *extra]


def test_resume_after_kill_reproduces_uninterrupted_losses(tiny_model_dir, tmp_path):
    """kill -9 mid-run, then --resume: the per-step losses equal an uninterrupted run's (with dropout, so RNG matters)."""
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    common = {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
              "training": {"max_steps": 12, "save_every": 3, "gradient_accumulation": 2, "warmup_steps": 2,
                           "schedule": "cosine", "batch_size": 4}}
    straight = train(load_config(run_config(tiny_model_dir, train_file, tmp_path / "straight", **common)), quiet=True)
    expected = losses(straight.run_dir)

    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(tiny_model_dir, train_file, tmp_path / "killed", **common)))
    env = {**os.environ, "TUNELAB_STEP_DELAY": "0.4"}
    proc = subprocess.Popen(_train_cmd(cfg_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-00000006").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()  # a killed run never looks complete
    done = subprocess.run(_train_cmd(cfg_path, "--resume"), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    resumed = losses(tmp_path / "killed")
    assert [round(x, 5) for x in resumed] == [round(x, 5) for x in expected]
    assert len(resumed) == 12


def test_output_dir_safety(tiny_model_dir, alpaca_file, tmp_path):
    """A directory tunelab did not make is never deleted; a run killed before its first checkpoint restarts."""
    from tunelab.errors import TunelabError

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cfg = run_config(tiny_model_dir, alpaca_file, foreign, output={"dir": str(foreign), "overwrite": True})
    with pytest.raises(TunelabError, match="not a tunelab run"):
        train(load_config(cfg), quiet=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("from a run killed before its first checkpoint")
    (started / "metrics.jsonl").write_text("")
    result = train(load_config(run_config(tiny_model_dir, alpaca_file, started)), quiet=True)
    assert (result.run_dir / "summary.json").is_file()


def test_precision_falls_back_to_fp32_without_native_bf16():
    from tunelab.errors import TunelabError
    from tunelab.train.precision import pick_precision

    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu, cpu_bf16=True) == torch.bfloat16
    assert pick_precision("auto", cpu, cpu_bf16=False) is None
    assert pick_precision("fp32", cpu, cpu_bf16=True) is None
    with pytest.raises(TunelabError, match="training.precision: bf16 is not supported"):
        pick_precision("bf16", cpu, cpu_bf16=False)
    with pytest.raises(TunelabError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16", cpu)


def test_bf16_autocast_run_trains_and_keeps_fp32_adapters(tiny_model_dir, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    from tunelab.train.precision import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16; the fp32 fallback is covered above")
    run = train(load_config(run_config(tiny_model_dir, alpaca_file, tmp_path / "run", training={"precision": "bf16"})),
                quiet=True).run_dir
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16"
    weights = load_file(run / "model" / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert losses(run)[-1] < losses(run)[0]


def test_packed_run_trains_and_resumes_like_any_other(tiny_model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    common = {"data": {"packing": True, "max_length": 256}, "training": {"max_steps": 6, "save_every": 3}}
    full = train(load_config(run_config(tiny_model_dir, train_file, tmp_path / "full", **common)), quiet=True)
    assert full.summary["train_examples"] == 40 and full.summary["train_rows"] < 40
    assert losses(full.run_dir)[-1] < losses(full.run_dir)[0]
    # Stop after 3 steps, resume to 6: same losses as the straight run.
    part = run_config(tiny_model_dir, train_file, tmp_path / "part", **common)
    train(load_config({**part, "training": {**part["training"], "max_steps": 3}}), quiet=True)
    resumed = train(load_config(part), resume=True, quiet=True)
    assert losses(resumed.run_dir) == losses(full.run_dir)


@pytest.mark.parametrize("layout", ["alpaca-csv", "prompt_response-json", "messages-jsonl", "text-jsonl"])
def test_every_format_and_file_type_trains(tiny_model_dir, tmp_path, layout):
    from conftest import write_csv

    if layout == "alpaca-csv":
        path = write_csv(tmp_path / "d.csv", ["instruction", "input", "output"],
                         [[r["instruction"], r["input"], r["output"]] for r in alpaca_rows(12)])
    elif layout == "prompt_response-json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"prompt": r["instruction"], "response": r["output"]} for r in alpaca_rows(12)], indent=2))
    elif layout == "messages-jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": "Hello!", "weight": 0},
            {"role": "user", "content": "And again?"},
            {"role": "assistant", "content": r["output"]}]} for r in alpaca_rows(12)])
    else:
        path = write_jsonl(tmp_path / "d.jsonl", [{"text": r["output"] * 3} for r in alpaca_rows(12)])
    result = train(load_config(run_config(tiny_model_dir, path, tmp_path / "run", data={"validation": 0.25, "max_length": 256},
                                          training={"max_steps": 3})), quiet=True)
    assert result.summary["data_format"] == layout.split("-")[0]  # detected, not configured
    assert result.summary["steps"] == 3 and result.summary["final_eval_loss"] is not None


def test_importing_training_modules_never_shadows_the_train_function() -> None:
    # The subpackage tunelab.train and the API function tunelab.train share a name; importing a submodule (as the
    # evaluation engine does) must leave the function in place.
    import subprocess
    import sys

    code = ("import tunelab.evaluate.loglik, tunelab.train.loss, tunelab.train.loop, tunelab; from tunelab import train; "
            "assert callable(tunelab.train) and callable(train), (tunelab.train, train)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
