"""Sequential fine-tuning (`stages:`): each stage starts from the previous stage's weights; resume; errors up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import alpaca_rows, run_config, write_jsonl
from typer.testing import CliRunner

from tunelab import load_config
from tunelab.cli import app
from tunelab.config import DataConfig
from tunelab.data.dataset import collate, prepare_data
from tunelab.data.tokenize import IGNORE
from tunelab.train.stages import run_stages

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in metrics(run_dir) if "train_loss" in r]


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    rows = alpaca_rows(30)
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:24]),
        "val": write_jsonl(tmp_path / "val.jsonl", rows[24:]),
        "text": write_jsonl(tmp_path / "text.jsonl", [{"text": f"The quick brown fox {i} jumps over the lazy dog."} for i in range(10)]),
        "pref": write_jsonl(tmp_path / "pref.jsonl", [{"prompt": f"Say something about item {i}.", "chosen": f"Item {i} is fine.",
                                                        "rejected": f"No {i}."} for i in range(8)]),
    }


def staged(tiny_model_dir, out: Path, stages: list[dict]) -> dict:
    cfg = run_config(tiny_model_dir, Path("unused.jsonl"), out, training={"max_steps": 3})
    del cfg["data"]
    cfg["stages"] = stages
    return cfg


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("first", ["lora", "full"])
def test_stage_two_starts_from_stage_one_weights(tiny_model_dir, files, tmp_path, first):
    from transformers import AutoModelForCausalLM

    from tunelab.generate import load_for_inference

    data = {"train": str(files["train"]), "validation": str(files["val"]), "max_length": 64}
    method = {"name": "full"} if first == "full" else {"name": "lora", "r": 4, "alpha": 8}
    cfg = staged(tiny_model_dir, tmp_path / "run", [
        {"name": "one", "data": data, "method": method, "training": {"learning_rate": 1e-3 if first == "full" else 1e-2}},
        {"name": "two", "data": data},
    ])
    result = run_stages(load_config(cfg), quiet=True)
    one, two = tmp_path / "run" / "stages" / "0-one", tmp_path / "run" / "stages" / "1-two"
    # Stage 2's untouched model (step 0) scores the validation set exactly as stage 1's final model did.
    final_one = json.loads((one / "summary.json").read_text())["final_eval_loss"]
    start_two = metrics(two)[0]
    assert start_two["step"] == 0 and start_two["eval_loss"] == pytest.approx(final_one, rel=1e-5)
    assert final_one < json.loads((one / "summary.json").read_text())["initial_eval_loss"]  # stage 1 did learn
    base = load_config(two / "config.yaml").model
    if first == "lora":  # the merged model computes what base + adapter computes
        assert base == str((one / "merged").resolve())
        adapter_model, tokenizer = load_for_inference(one)
        merged = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        torch.testing.assert_close(logits(merged, tokenizer), logits(adapter_model, tokenizer), rtol=1e-5, atol=1e-5)
    else:
        assert base == str((one / "model").resolve())
    # The run directory reads like a plain run's: its config, final model and summary are the last stage's.
    out = result.run_dir
    assert load_config(out / "config.yaml").model == base and load_config(out / "config.yaml").output.dir == str(out)
    assert [s["stage"] for s in result.summary["stages"]] == ["0-one", "1-two"]
    assert json.loads((out / "summary.json").read_text())["final_eval_loss"] == json.loads((two / "summary.json").read_text())["final_eval_loss"]
    final, tokenizer = load_for_inference(out)
    last, _ = load_for_inference(two)
    torch.testing.assert_close(logits(final, tokenizer), logits(last, tokenizer))


def test_text_stage_then_sft_with_replay_then_dpo(tiny_model_dir, files, tmp_path):
    cfg = staged(tiny_model_dir, tmp_path / "run", [
        {"name": "domain", "data": {"train": str(files["text"]), "format": "text", "packing": True, "max_length": 64}},
        {"name": "sft", "data": {"train": str(files["train"]), "max_length": 64},
         "continual": {"replay": {"data": "previous", "fraction": 0.25}}},
        {"name": "pref", "data": {"train": str(files["pref"]), "max_length": 64},
         "method": {"name": "dpo", "adapter": {"name": "lora", "r": 4, "alpha": 8}}},
    ])
    result = run_stages(load_config(cfg), quiet=True)
    stages = tmp_path / "run" / "stages"
    sft = load_config(stages / "1-sft" / "config.yaml")
    assert sft.continual.replay.data == [str(files["text"])]  # 'previous': stage 0's training data
    summary = json.loads((stages / "1-sft" / "summary.json").read_text())
    assert summary["train_rows"] == 24 + 10  # the new rows and the replayed text rows
    assert load_config(stages / "2-pref" / "config.yaml").model == str((stages / "1-sft" / "merged").resolve())
    assert result.summary["method"] == "dpo" and (result.run_dir / "model" / "adapter_config.json").is_file()
    adapter = json.loads((result.run_dir / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((stages / "1-sft" / "merged").resolve())


def test_text_format_trains_every_token_with_or_without_packing(tiny_tokenizer, files):
    for packing in (False, True):
        data = prepare_data(DataConfig(train=str(files["text"]), format="text", packing=packing, max_length=64,
                                       train_on_inputs=False), tiny_tokenizer, 0)
        for row in data.train:  # the labels are the tokens (packed: but the first of each example, as for any format)
            starts = {i for i, p in enumerate(row.position_ids) if p == 0} if packing else set()
            assert row.labels == [IGNORE if i in starts else t for i, t in enumerate(row.input_ids)]
        batch = collate(list(data.train), tiny_tokenizer.pad_token_id)
        trained = int((batch["labels"][:, 1:] != IGNORE).sum())
        n_tokens = sum(len(tiny_tokenizer(r["text"])["input_ids"]) + 1 for r in map(json.loads, files["text"].read_text().splitlines()))
        assert trained == n_tokens - 10  # every token after each example's first, eos included
    assert packing and len(data.train) < 10


def test_resume_skips_finished_stages_and_repeats_the_rest(tiny_model_dir, files, tmp_path):
    import shutil

    data = {"train": str(files["train"]), "validation": str(files["val"]), "max_length": 64}
    cfg = load_config(staged(tiny_model_dir, tmp_path / "run", [{"name": "a", "data": data}, {"name": "b", "data": data}]))
    run_stages(cfg, quiet=True)
    stages = tmp_path / "run" / "stages"
    first_losses, second_losses = train_losses(stages / "0-a"), train_losses(stages / "1-b")
    stamp = (stages / "0-a" / "metrics.jsonl").stat().st_mtime_ns
    shutil.rmtree(stages / "1-b")  # stage b never ran (as after a crash before its first checkpoint)
    (tmp_path / "run" / "summary.json").unlink()
    run_stages(cfg, resume=True, quiet=True)
    assert (stages / "0-a" / "metrics.jsonl").stat().st_mtime_ns == stamp  # stage a was skipped
    assert train_losses(stages / "0-a") == first_losses and train_losses(stages / "1-b") == second_losses
    assert (tmp_path / "run" / "summary.json").is_file()
    # Without --resume an existing staged run is not overwritten.
    result = runner.invoke(app, ["train", str(write_config(tmp_path, staged(tiny_model_dir, tmp_path / "run", [
        {"name": "a", "data": data}, {"name": "b", "data": data}])))])
    assert result.exit_code == 2 and "already holds a run; pass --resume" in result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Errors, dry run, shipped configs


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: "):]


@pytest.mark.parametrize("stages, expected", [
    ([{"name": "a", "data": "T"}, {"name": "b", "data": "T", "method": {"name": "lora", "rr": 2}}],
     ":{rr}: stages.1.method.rr: unknown key; did you mean 'r'?"),
    ([{"name": "a", "data": "T"}, {"name": "b", "data": "P", "method": {"name": "lora"}}],
     "stages.1.data.format: preference rows train with method dpo or reward, not lora"),
    ([{"name": "a", "data": "T", "method": {"name": "prompt_tuning"}}, {"name": "b", "data": "T"}],
     "stages.0.method.name: prompt_tuning cannot be the model the next stage starts from"),
    ([{"name": "a", "data": "T", "method": {"name": "adapter"}}, {"name": "b", "data": "T"}],
     "stages.0.method.name: adapter cannot be the model the next stage starts from (bottleneck adapters are non-linear"),
    ([{"name": "a", "data": "T", "continual": {"replay": {"data": "previous"}}}, {"name": "b", "data": "T"}],
     "stages.0.continual.replay.data: 'previous' replays the earlier stages' data, and stage 0 has none"),
    ([{"name": "a", "data": "T"}, {"name": "b", "data": "P", "method": {"name": "dpo"}, "continual": {"replay": {"data": "previous"}}}],
     "stages.1.continual.replay.data: 'previous' would replay stage 0's rows: dpo trains on preference pairs"),
    ([{"name": "a", "data": "T"}, {"name": "b"}], "stages.1: this stage has no data"),
    ([{"name": "a b", "data": "T"}], "stages.0.name: String should match pattern"),
    ([{"name": "a", "data": "T"}, {"name": "b", "data": "MISSING"}], "stages.1.data.train: file not found"),
])
def test_every_stage_is_checked_before_anything_trains(tiny_model_dir, files, tmp_path, stages, expected):
    datasets = {"T": {"train": str(files["train"]), "max_length": 64},
                "P": {"train": str(files["pref"]), "format": "preference", "max_length": 64},
                "MISSING": {"train": str(tmp_path / "missing.jsonl")}}
    for stage in stages:
        if "data" in stage:
            stage["data"] = datasets[stage["data"]]
    path = write_config(tmp_path, staged(tiny_model_dir, tmp_path / "out", stages))
    rr_line = next((n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith("rr:")), 0)
    msg = one_line_error(runner.invoke(app, ["train", str(path)]))
    assert expected.format(rr=rr_line) in msg, msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["continued-pretraining.yaml", "stages.yaml"])
def test_shipped_staged_configs_dry_run(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["train", f"configs/{name}", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("stage 0 ") and "from stage 0's model (merged)" in lines[1]


def test_data_prepare_refuses_a_staged_config(tiny_model_dir, files, tmp_path):
    path = write_config(tmp_path, staged(tiny_model_dir, tmp_path / "out", [{"data": {"train": str(files["train"])}}]))
    msg = one_line_error(runner.invoke(app, ["data", "prepare", str(path)]))
    assert msg.startswith("stages: `data prepare` prepares one run's data")
