"""`tunelab tune`: Optuna studies over a tiny model on SQLite, pruning, best.yaml, shared studies, killed workers, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import alpaca_rows, run_config, write_jsonl
from test_cli_errors import user_error
from typer.testing import CliRunner

import tunelab
from tunelab.cli import app
from tunelab.config import load_config
from tunelab.tune import run_study

PNG = b"\x89PNG\r\n\x1a\n"

# Low learning rates barely move the tiny model in 4 steps, so they trail the median at the first evaluation and are
# pruned; high ones win. Every draw is seeded, so which trials are pruned is fixed.
SEARCH = {
    "training.learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 5.0e-2, "grid": [1.0e-4, 3.0e-3, 3.0e-2]},
    "method.r": {"type": "categorical", "choices": [2, 4]},
}


def study_config(model_dir: Path, tmp_path: Path, out: str = "study", **tune) -> dict:
    train_file = tmp_path / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, alpaca_rows(24))
    cfg = run_config(model_dir, train_file, tmp_path / out, data={"validation": 0.25},
                     training={"max_steps": 4, "eval_every": 1, "eval_at_start": False})
    cfg["search"] = json.loads(json.dumps(SEARCH))
    cfg["tune"] = {"startup_trials": 2, "trials": 6, **tune}
    return cfg


def trial_states(storage: str, name: str) -> list[tuple[int, str]]:
    study = optuna.load_study(study_name=name, storage=storage)
    return sorted((t.number, t.state.name) for t in study.get_trials(deepcopy=False))


@pytest.mark.parametrize("sampler", ["tpe", pytest.param("random", marks=pytest.mark.slow), pytest.param("grid", marks=pytest.mark.slow)])
def test_study_with_each_sampler_prunes_and_writes_best_yaml(tiny_model_dir, tmp_path, sampler):
    report = run_study(load_config(study_config(tiny_model_dir, tmp_path, sampler=sampler)), log=lambda _: None)
    study_dir = tmp_path / "study"
    states = trial_states(f"sqlite:///{study_dir / 'study.db'}", "study")  # read back from the SQLite file itself
    assert [n for n, _ in states] == list(range(6))
    names = [s for _, s in states]
    assert "PRUNED" in names and "COMPLETE" in names and "FAIL" not in names, states
    assert sorted(p.name for p in study_dir.glob("trial-*")) == [f"trial-{n:04d}" for n in range(6)]

    pruned = next(n for n, s in states if s == "PRUNED")
    run = study_dir / f"trial-{pruned:04d}"
    info = json.loads((run / "trial.json").read_text())
    assert info["state"] == "PRUNED" and set(info["params"]) == set(SEARCH)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == info["pruned_at_step"] and "eval_loss" in records[-1]  # the eval that pruned it is kept
    assert not (run / "summary.json").exists() and (run / "loss_curve.png").read_bytes()[:8] == PNG

    for name in ("history.png", "importance.png"):
        assert (study_dir / name).read_bytes()[:8] == PNG
    results = json.loads((study_dir / "results.json").read_text())
    assert results["best"]["trial"] == report.best.number and results["states"]["PRUNED"] >= 1
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert "search" not in best and "tune" not in best
    assert best["output"]["dir"] == str(study_dir / "best") and not (study_dir / "best").exists()
    assert best["training"]["learning_rate"] == report.best_params["training.learning_rate"]
    assert best["method"]["r"] == report.best_params["method.r"]
    if sampler == "grid":
        assert report.best_params["training.learning_rate"] in SEARCH["training.learning_rate"]["grid"]
    if sampler == "tpe":  # best.yaml is a normal run config: training it repeats the best trial (seeded, same settings)
        result = tunelab.train(study_dir / "best.yaml", quiet=True)
        assert result.summary["final_eval_loss"] == pytest.approx(report.best.value, abs=1e-6)


def test_on_eval_hook_sees_each_periodic_eval_and_can_stop_the_run(tiny_model_dir, tmp_path):
    cfg = study_config(tiny_model_dir, tmp_path, out="run")
    del cfg["search"], cfg["tune"]
    seen = []

    def stop_at_3(step: int, eval_loss: float) -> None:
        seen.append(step)
        if step == 3:
            raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        tunelab.train(cfg, quiet=True, on_eval=stop_at_3)
    assert seen == [1, 2, 3]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and not (tmp_path / "run" / "summary.json").exists()
    # The final eval is the result, not a pruning point: a full run calls the hook for steps 1-3 only.
    seen.clear()
    cfg["output"]["dir"] = str(tmp_path / "run2")
    tunelab.train(cfg, quiet=True, on_eval=lambda step, loss: seen.append(step))
    assert seen == [1, 2, 3]


def _tune_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab", "tune", str(config), *args]


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tiny_model_dir, tmp_path):
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(study_config(tiny_model_dir, tmp_path, sampler="random", pruner="none")))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [subprocess.Popen(_tune_cmd(config, "--trials", "3", "--storage", storage, "--study", "shared"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr
    states = trial_states(storage, "shared")
    assert states == [(n, "COMPLETE") for n in range(6)]  # 2 x 3 trials: none lost, none run twice
    dirs = sorted(p.name for p in (tmp_path / "study").glob("trial-*"))
    assert dirs == [f"trial-{n:04d}" for n in range(6)]
    assert all((tmp_path / "study" / d / "summary.json").is_file() for d in dirs)
    params = [tuple(json.loads((tmp_path / "study" / d / "trial.json").read_text())["params"].values()) for d in dirs]
    assert len(set(params)) == 6  # trial n samples with its own seed: the workers never draw the same point


@pytest.mark.slow
def test_killed_workers_trial_is_marked_failed_and_retried(tiny_model_dir, tmp_path):
    cfg = study_config(tiny_model_dir, tmp_path, sampler="random", pruner="none", heartbeat_interval=1)
    cfg["training"]["max_steps"] = 40
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TUNELAB_STEP_DELAY": "0.3"}
    victim = subprocess.Popen(_tune_cmd(config, "--trials", "1"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "study" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("train_loss") >= 2):
        assert victim.poll() is None, victim.stderr.read().decode()
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    storage = f"sqlite:///{tmp_path / 'study' / 'study.db'}"
    assert trial_states(storage, "study") == [(0, "RUNNING")]  # nobody has noticed yet
    time.sleep(2.5)  # past the grace period (2 x heartbeat_interval)
    cfg["training"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(_tune_cmd(config, "--trials", "1"), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="study", storage=storage)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs.get("failed_trial") == 0 and trials[1].params == trials[0].params  # retried as it was
    assert not (tmp_path / "study" / "trial-0000" / "summary.json").exists()
    assert (tmp_path / "study" / "trial-0001" / "summary.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing written

runner = CliRunner()


def tune_cli(tmp_path: Path, cfg: dict, *args: str):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return runner.invoke(app, ["tune", str(path), *args])


@pytest.mark.parametrize("change, fragments", [
    ({"training.learning_rate": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-5}},
     ["search.training.learning_rate: empty range: low (0.001) must be below high (1e-05)"]),
    ({"training.learning_rate": {"type": "uniform", "low": 1.0e-3, "high": 1.0e-3}}, ["empty range"]),
    ({"training.learnign_rate": {"type": "uniform", "low": 0.1, "high": 0.2}},
     ["search.training.learnign_rate: unknown config path; did you mean 'training.learning_rate'?"]),
    ({"method.alhpa": {"type": "int", "low": 2, "high": 8}}, ["search.method.alhpa: unknown config path; did you mean 'method.alpha'?"]),
    ({"method.rank": {"type": "int", "low": 2, "high": 8}}, ["search.method.rank: unknown config path; valid keys under method: name, target_modules,"]),
    ({"training.learning_rate": {"type": "uniform", "low": 0, "high": 0.1}},
     ["search.training.learning_rate: the value 0.0 is rejected: training.learning_rate: Input should be greater than 0"]),
    ({"method.r": {"type": "uniform", "low": 2, "high": 9}}, ["search.method.r: the value 5.5 is rejected", "valid integer"]),
    ({"training.schedule": {"type": "categorical", "choices": ["cosine", "cosnie"]}}, ["the value 'cosnie' is rejected"]),
    ({"method.r": {"type": "categorical", "choices": []}}, ["categorical needs a non-empty choices list"]),
    ({"output.dir": {"type": "categorical", "choices": ["a"]}}, ["search.output.dir: output cannot be searched"]),
])
def test_bad_search_space_is_one_line_exit_2_before_anything_is_written(tiny_model_dir, tmp_path, change, fragments):
    cfg = study_config(tiny_model_dir, tmp_path)
    cfg["search"] = change
    msg = user_error(tune_cli(tmp_path, cfg), *fragments)
    assert msg.startswith(f"{tmp_path / 'tune.yaml'}:")  # file:line
    assert not (tmp_path / "study").exists()


def test_grid_needs_values_for_a_float_range(tiny_model_dir, tmp_path):
    cfg = study_config(tiny_model_dir, tmp_path)
    del cfg["search"]["training.learning_rate"]["grid"]
    user_error(tune_cli(tmp_path, cfg, "--sampler", "grid"), "search.training.learning_rate: --sampler grid needs the values")
    user_error(tune_cli(tmp_path, cfg, "--sampler", "gird"), "tune.sampler", "'grid'")
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("url, fragment", [
    ("sqlite:////nonexistent-dir/sub/study.db", "unable to open database file"),
    ("postgresql://user:secret@127.0.0.1:9/tunelab", "cannot open postgresql://user:***@127.0.0.1:9/tunelab"),
    ("study.db", "cannot open study.db"),
])
def test_unusable_storage_is_one_line_exit_2(tiny_model_dir, tmp_path, url, fragment):
    msg = user_error(tune_cli(tmp_path, study_config(tiny_model_dir, tmp_path), "--storage", url), "tune.storage:", fragment)
    assert "secret" not in msg
    assert not (tmp_path / "study").exists()


def test_study_needs_a_space_and_validation_data(tiny_model_dir, tmp_path):
    cfg = study_config(tiny_model_dir, tmp_path)
    cfg["search"] = {}
    user_error(tune_cli(tmp_path, cfg), "search: nothing to tune")
    cfg = study_config(tiny_model_dir, tmp_path)
    del cfg["data"]["validation"]
    user_error(tune_cli(tmp_path, cfg), "data.validation: tune.metric final_eval_loss needs validation data")
    cfg = study_config(tiny_model_dir, tmp_path, metric="tokens_per_s")
    user_error(tune_cli(tmp_path, cfg), "pruner: median reads the periodic eval loss", "set pruner: none")
    assert not (tmp_path / "study").exists()
