"""Multi-task data (data.tasks) and replay (continual.replay): mixing proportions, per-task eval, resume, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import alpaca_rows, run_config, write_jsonl
from typer.testing import CliRunner

from tunelab import load_config, train
from tunelab.cli import app
from tunelab.config import DataConfig
from tunelab.data.dataset import prepare_data
from tunelab.data.mixture import MixedData, Mixture, mixing_probabilities, task_data_config
from tunelab.data.pipeline import target_counts
from tunelab.errors import TunelabError
from tunelab.train.loop import loss_totals
from tunelab.train.objective import Objective

runner = CliRunner()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def text_rows(n: int, start: int = 0) -> list[dict]:
    return [{"text": f"The quick brown fox number {i} jumps over the lazy dog {i}."} for i in range(start, start + n)]


@pytest.fixture()
def task_files(tmp_path) -> dict[str, Path]:
    rows = alpaca_rows(30)
    return {
        "a": write_jsonl(tmp_path / "a.jsonl", rows[:24]),
        "a_val": write_jsonl(tmp_path / "a_val.jsonl", rows[24:]),
        "b": write_jsonl(tmp_path / "b.jsonl", text_rows(8)),
        "b_val": write_jsonl(tmp_path / "b_val.jsonl", text_rows(4, start=100)),
        "general": write_jsonl(tmp_path / "general.jsonl", [{"text": f"Paris is the capital of France, {i}."} for i in range(6)]),
    }


def tasks_config(tiny_model_dir, files, out: Path, **data) -> dict:
    cfg = run_config(tiny_model_dir, files["a"], out, training={"max_steps": 4, "eval_every": 2})
    cfg["data"] = {"max_length": 64, "tasks": [
        {"name": "support", "train": str(files["a"]), "validation": str(files["a_val"]), "format": "alpaca"},
        {"name": "text", "train": str(files["b"]), "validation": str(files["b_val"]), "format": "text"},
    ], **data}
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Mixing


def task_of(index: int, sizes: list[int]) -> int:
    bound = 0
    for task, n in enumerate(sizes):
        bound += n
        if index < bound:
            return task
    return len(sizes)  # a replay row


def test_mixing_counts_are_exact_per_epoch_and_each_task_cycles_through_its_rows():
    sizes, probs = [30, 10, 5], mixing_probabilities("weights", [30, 10, 5], [1.0, 2.0, None], None)
    assert probs == pytest.approx([0.25, 0.5, 0.25])
    mixture = Mixture(["a", "b", "c"], sizes, probs)
    epochs = [mixture.epoch_batches(batch_size=4, seed=3, epoch=e) for e in range(6)]
    assert all(len(b) == mixture.batches_per_epoch(4) == 12 for b in epochs)  # 45 slots -> 12 batches
    expected = target_counts(45, probs)  # each within one slot of 45 * p
    assert expected == [11, 23, 11] and all(abs(c - 45 * p) <= 1 for c, p in zip(expected, probs))
    for batches in epochs:
        assert [Counter(task_of(i, sizes) for b in batches for i in b)[t] for t in range(3)] == expected
    # Task b (10 rows, 23 slots an epoch) reads an endless stream of permutations, in batch order: every row once per
    # pass of 10 draws, across epoch boundaries too.
    stream = [i - 30 for batches in epochs for b in batches for i in b if task_of(i, sizes) == 1]
    assert len(stream) == 6 * 23
    assert all(sorted(stream[k : k + 10]) == list(range(10)) for k in range(0, 130, 10))
    # Same (seed, epoch) -> the same batches; another seed -> other batches.
    assert mixture.epoch_batches(4, 3, 2) == epochs[2]
    assert mixture.epoch_batches(4, 4, 2) != epochs[2]


def test_proportional_mixing_visits_every_row_once_per_epoch():
    mixture = Mixture(["a", "b"], [17, 6], mixing_probabilities("proportional", [17, 6], [None, None], None))
    for epoch in range(3):
        rows = [i for b in mixture.epoch_batches(5, 0, epoch) for i in b]
        assert sorted(rows) == list(range(23))


def test_temperature_mixing_follows_size_to_the_one_over_t():
    probs = mixing_probabilities("temperature", [400, 100], [None, None], 2.0)
    assert probs == pytest.approx([20 / 30, 10 / 30])  # sqrt(400) : sqrt(100)
    assert mixing_probabilities("temperature", [400, 100], [None, None], None) == probs  # T defaults to 2


def test_replay_fraction_in_every_batch():
    mixture = Mixture(["new"], [40], [1.0], replay_size=7, replay_fraction=0.2)
    assert mixture.slots() == 50  # 40 new rows are 80% of the epoch
    for epoch in range(3):
        batches = mixture.epoch_batches(8, 0, epoch)
        replayed = [sum(i >= 40 for i in b) for b in batches]
        assert all(r in (1, 2) for r in replayed[:-1])  # 8 * 0.2 = 1.6 -> 1 or 2 in every full batch
        ends = [min(8 * (k + 1), 50) for k in range(len(batches))]
        assert [sum(replayed[: k + 1]) for k in range(len(batches))] == [int(e * 0.2 + 0.5) for e in ends]
        assert sum(len(b) - r for b, r in zip(batches, replayed)) == 40
        assert sorted(i for b in batches for i in b if i < 40) == list(range(40))  # the new data once per epoch


def test_replay_rows_come_from_the_replay_file(tiny_model_dir, tiny_tokenizer, task_files, tmp_path):
    from tunelab.data.mixture import with_replay

    cfg = load_config(run_config(tiny_model_dir, task_files["a"], tmp_path / "r",
                                 continual={"replay": {"data": str(task_files["general"]), "fraction": 0.25}}))
    data = with_replay(prepare_data(cfg.data, tiny_tokenizer, 0), cfg, tiny_tokenizer, 0)
    assert isinstance(data, MixedData) and len(data.train) == 24 + 6
    for batch in data.mixture.epoch_batches(4, 0, 0):
        sources = [data.train[i].source for i in batch]
        assert sum("general.jsonl" in s for s in sources) == sum(i >= 24 for i in batch) >= 1
    assert list(data.validation) == []  # replay rows are never evaluated as the task


# ----------------------------------------------------------------------------------------------------------------------
# Training


def test_per_task_eval_losses_equal_evaluating_each_task_alone(tiny_model_dir, tiny_tokenizer, task_files, tmp_path):
    from tunelab.generate import load_for_inference

    result = train(load_config(tasks_config(tiny_model_dir, task_files, tmp_path / "run")), quiet=True)
    records = [r for r in metrics(result.run_dir) if "eval_loss" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all({"eval_loss/support", "eval_loss/text"} <= set(r) for r in records)
    # The final model evaluated on each task's validation set prepared on its own, as a plain run would.
    model, _ = load_for_inference(result.run_dir)
    cfg = load_config(tasks_config(tiny_model_dir, task_files, tmp_path / "run"))
    totals = {}
    for task in cfg.data.tasks:
        alone = prepare_data(task_data_config(cfg.data, task), tiny_tokenizer, 0)
        totals[task.name] = loss_totals(model, list(alone.validation), 4, tiny_tokenizer.pad_token_id,
                                        torch.device("cpu"), None, Objective())
        assert records[-1][f"eval_loss/{task.name}"] == pytest.approx(totals[task.name][0] / totals[task.name][1], rel=1e-5)
    pooled = sum(t for t, _ in totals.values()) / sum(n for _, n in totals.values())  # token-weighted over all tasks
    assert records[-1]["eval_loss"] == pytest.approx(pooled, rel=1e-5)
    assert result.summary["train_examples"] == 24 + 8
    assert all((result.run_dir / "data" / task / "data_report.json").is_file() for task in ("support", "text"))


def test_multitask_with_replay_resumes_to_the_same_losses(tiny_model_dir, task_files, tmp_path):
    extra = {"training": {"max_steps": 6, "save_every": 3, "eval_every": None},
             "continual": {"replay": {"data": str(task_files["general"]), "fraction": 0.3}}}

    def cfg(out: str, steps: int) -> dict:
        c = tasks_config(tiny_model_dir, task_files, tmp_path / out, mixing="temperature", temperature=3.0)
        c["training"].update(extra["training"], max_steps=steps)
        c["continual"] = extra["continual"]
        return c

    full = train(load_config(cfg("full", 6)), quiet=True)
    train(load_config(cfg("part", 3)), quiet=True)
    resumed = train(load_config(cfg("part", 6)), resume=True, quiet=True)
    losses = lambda run: [r["train_loss"] for r in metrics(run) if "train_loss" in r]
    assert len(losses(full.run_dir)) == 6
    assert losses(resumed.run_dir) == losses(full.run_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Errors and data check


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: "):]


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["tasks"][1].update(trian="x.jsonl"), "data.tasks.1.trian: unknown key; did you mean 'train'?"),
    (lambda d: d["tasks"][1].update(name="support"), "data.tasks: duplicate task name 'support'; give every task its own name"),
    (lambda d: d["tasks"][0].update(weight=0), "data.tasks.0.weight: Input should be greater than 0"),
    (lambda d: d["tasks"][0].update(weight=-1.5), "data.tasks.0.weight: Input should be greater than 0"),
    (lambda d: d.update(train="a.jsonl"), "data.tasks: data.train and data.tasks are both set"),
    (lambda d: d.update(tasks=[]), "data.tasks: an empty list"),
    (lambda d: d.update(mixing="temperature", temperature=0), "data.temperature: Input should be greater than 0"),
    (lambda d: d.update(temperature=2.0), "data.temperature: temperature applies to data.mixing: temperature"),
    (lambda d: d.update(validation=0.1), "data.tasks: data.validation does not combine with data.tasks"),
])
def test_bad_task_config_is_one_line_exit_2(tiny_model_dir, task_files, tmp_path, change, expected):
    cfg = tasks_config(tiny_model_dir, task_files, tmp_path / "out")
    change(cfg["data"])
    msg = one_line_error(runner.invoke(app, ["train", str(write_config(tmp_path, cfg))]))
    assert expected in msg, msg
    assert not (tmp_path / "out").exists()


def test_bad_rows_in_one_task_name_the_task(tiny_model_dir, task_files, tmp_path):
    write_jsonl(task_files["b"], text_rows(3) + [{"txt": "no text key"}])
    msg = one_line_error(runner.invoke(app, ["train", str(write_config(tmp_path, tasks_config(tiny_model_dir, task_files, tmp_path / "o")))]))
    assert msg.startswith("data.tasks.1 (text): ") and "b.jsonl:4" in msg, msg


def test_replay_errors(tiny_model_dir, task_files, tmp_path):
    base = run_config(tiny_model_dir, task_files["a"], tmp_path / "o")
    with pytest.raises(TunelabError, match=r"continual.replay.data: 'previous' means the earlier stages' data"):
        load_config({**base, "continual": {"replay": {"data": "previous"}}})
    with pytest.raises(TunelabError, match=r"continual.replay.fraction: Input should be less than 1"):
        load_config({**base, "continual": {"replay": {"data": "x.jsonl", "fraction": 1.0}}})
    with pytest.raises(TunelabError, match=r"training.max_tokens_per_batch: mixed batches"):
        load_config({**base, "continual": {"replay": {"data": "x.jsonl"}},
                     "training": {**base["training"], "max_tokens_per_batch": 256}})
    missing = {**base, "continual": {"replay": {"data": str(tmp_path / "nope.jsonl")}}}
    msg = one_line_error(runner.invoke(app, ["train", str(write_config(tmp_path, missing))]))
    assert msg.startswith("continual.replay.data (") and "file not found" in msg, msg


def test_data_check_checks_every_task(tiny_model_dir, task_files, tmp_path):
    cfg_path = write_config(tmp_path, tasks_config(tiny_model_dir, task_files, tmp_path / "o"))
    ok = runner.invoke(app, ["data", "check", str(cfg_path), "--model", "none", "--json"])
    assert ok.exit_code == 0, ok.output
    reports = json.loads(ok.stdout)
    assert [r["files"] for r in reports] == [[str(task_files["a"]), str(task_files["a_val"])],
                                             [str(task_files["b"]), str(task_files["b_val"])]]
    write_jsonl(task_files["b_val"], text_rows(2) + [{"text": ""}])
    bad = runner.invoke(app, ["data", "check", str(cfg_path), "--model", "none"])
    assert bad.exit_code == 2 and "b_val.jsonl:3" in bad.stdout, bad.output


def test_data_config_without_tasks_is_unchanged():
    cfg = DataConfig(train="a.jsonl")
    assert cfg.tasks is None and cfg.mixing_rule == "proportional"


def test_data_prepare_writes_each_task_then_train_uses_the_directory(tiny_model_dir, task_files, tmp_path):
    cfg = tasks_config(tiny_model_dir, task_files, tmp_path / "out")
    cfg["training"]["max_steps"] = 1
    path = write_config(tmp_path, cfg)
    result = runner.invoke(app, ["data", "prepare", str(path)])
    assert result.exit_code == 0, result.output
    assert "task support" in result.stdout and "task text" in result.stdout
    kept = json.loads((tmp_path / "out" / "data" / "text" / "data_report.json").read_text())
    assert kept["splits"] == {"train": 8, "validation": 4, "test": 0}
    trained = runner.invoke(app, ["train", str(path), "--quiet"])
    assert trained.exit_code == 0, trained.output
