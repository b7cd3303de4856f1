"""Data-parallel training through accelerate: 2 gloo processes reach the 1-process losses; rank 0 writes; resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import alpaca_rows, run_config, write_jsonl

from tunelab.config import RunConfig
from tunelab.train import distributed
from tunelab.train.loop import train


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _launch(cfg_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path), "--nproc", str(nproc), "--quiet", *args],
                          check=False, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture()
def ddp_config(tmp_path, tiny_model_dir):
    # 21 training rows in batches of 5: the last batch has 1 example, so rank 1 runs an idle (weight 0) step;
    # 24-token micro-batches split the others, exercising DDP's no_sync accumulation.
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(26))
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "one",
                     data={"validation": 0.2, "max_length": 64},
                     training={"max_steps": None, "epochs": 1, "batch_size": 5, "micro_batch_tokens": 24,
                               "max_grad_norm": 1.0, "save_every": 2, "keep_last": 5})
    return cfg


def test_two_processes_reach_the_one_process_losses(tmp_path, ddp_config):
    one = train(RunConfig.model_validate(ddp_config), quiet=True)
    cfg = json.loads(json.dumps(ddp_config))
    cfg["output"]["dir"] = str(tmp_path / "two")
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _launch(path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ref, got = _records(one.run_dir), _records(tmp_path / "two")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert len([r for r in ref if "train_loss" in r]) == 5  # 21 rows / 5 -> 5 steps, the last with one example
    for a, b in zip(ref, got):
        for key in ("train_loss", "eval_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["tokens_trained"] == one.summary["tokens_trained"]  # every example trained once, by one rank
    assert abs(summary["final_eval_loss"] - one.summary["final_eval_loss"]) <= 1e-4
    # rank 0 wrote the run; checkpoints hold both ranks' RNG states
    assert (tmp_path / "two" / "model" / "adapter_model.safetensors").is_file()
    state = torch.load(tmp_path / "two" / "checkpoints" / "step-00000002" / "state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2

    # resume: drop everything after step 2 and continue with 2 processes -> the same later losses
    run = tmp_path / "two"
    for name in ("step-00000004", "step-00000005"):
        shutil.rmtree(run / "checkpoints" / name)
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    proc = _launch(path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _records(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in got]
    for a, b in zip(got, resumed):
        assert a.get("train_loss") == pytest.approx(b.get("train_loss"), abs=1e-6)


def test_nproc_beyond_the_machine_is_one_line_exit_2(tmp_path, ddp_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(ddp_config))
    for n in (distributed.usable_cpus() + 1, 0):
        proc = _launch(path, nproc=n)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and "--nproc" in proc.stderr, proc.stderr
    assert not Path(ddp_config["output"]["dir"]).exists()


def test_bad_data_fails_before_launching(tmp_path, ddp_config):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"instruction": "x", "output": "y"}', "{not json"])
    ddp_config["data"]["train"] = str(bad)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(ddp_config))
    proc = _launch(path)
    assert proc.returncode == 2
    assert "bad.jsonl:2" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not Path(ddp_config["output"]["dir"]).exists()


def test_launch_command_and_single_process_dist():
    cmd = distributed.launch_command(Path("run.yaml"), ["training.epochs=1"], 1, resume=True)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[-5:] == ["tunelab", "train", "run.yaml", "training.epochs=1", "--resume"]
    with pytest.raises(Exception, match="--main-process-ip"):
        distributed.launch_command(Path("run.yaml"), [], 1, num_machines=2)
    one = distributed.Dist()
    assert one.shard([1, 2, 3]) == [1, 2, 3] and one.sum(2.0, 3) == [2.0, 3] and one.main and not one.active
    two = distributed.Dist(rank=1, world=2)
    assert two.shard([1, 2, 3, 4, 5]) == [2, 4]
