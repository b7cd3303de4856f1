"""Experiment tracking: MLflow (params, per-step metrics, artifacts; resume; tune trials) and W&B offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import alpaca_rows, run_config, write_jsonl
from test_cli_errors import user_error, write_config
from typer.testing import CliRunner

import tunelab
from tunelab.cli import app
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train.tracking import flatten_config

mlflow = pytest.importorskip("mlflow")


def tracked_config(model_dir: Path, tmp_path: Path, out: str = "run", **tracking) -> dict:
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))
    return run_config(model_dir, train_file, tmp_path / out, data={"validation": 0.25},
                      training={"max_steps": 4, "eval_every": 2, "save_every": 2}, tracking=tracking)


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_run_has_params_metrics_and_artifacts_and_resume_continues_it(tiny_model_dir, tmp_path):
    cfg = tracked_config(tiny_model_dir, tmp_path, mlflow=True)
    cfg["training"]["max_steps"] = 2
    run_dir = tunelab.train(cfg, quiet=True).run_dir
    ids = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"  # the default store: in the run dir
    client = mlflow.MlflowClient(ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tunelab"
    assert run.data.params == flatten_config(load_config(cfg))
    assert run.data.params["training.learning_rate"] == "0.01" and run.data.params["method.name"] == "lora"
    assert sorted(a.path for a in client.list_artifacts(ids["run_id"])) == ["config.yaml", "loss_curve.png", "summary.json"]
    assert (run_dir / "mlartifacts").is_dir()

    # --resume with more steps continues the same MLflow run; its metric history is metrics.jsonl, step by step.
    cfg["training"]["max_steps"] = 4
    tunelab.train(cfg, resume=True, quiet=True)
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == ids["run_id"]
    assert client.get_run(ids["run_id"]).info.status == "FINISHED"
    records = metrics_of(run_dir)
    for key in ("train_loss", "eval_loss", "lr", "tokens_per_s", "grad_norm"):
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records if key in r]
        history = sorted((m.step, m.value) for m in client.get_metric_history(ids["run_id"], key))
        assert history == expected, key
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]


def test_mlflow_explicit_uri_and_experiment(tiny_model_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    cfg = tracked_config(tiny_model_dir, tmp_path, mlflow={"tracking_uri": uri, "experiment": "lr-sweep", "run_name": "first"})
    run_dir = tunelab.train(cfg, quiet=True).run_dir
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lr-sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["first"] and not (run_dir / "mlflow.db").exists()
    assert runs[0].data.metrics["eval_loss"] == metrics_of(run_dir)[-1]["eval_loss"]


def test_missing_mlflow_is_a_one_line_error_before_anything_is_written(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    cfg = tracked_config(tiny_model_dir, tmp_path, mlflow=True)
    with pytest.raises(TunelabError, match=r"tracking.mlflow: mlflow is not installed; pip install mlflow"):
        tunelab.train(cfg, quiet=True)
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, cfg))])
    user_error(result, "pip install mlflow")
    assert not (tmp_path / "run").exists()


def test_unusable_tracking_uri_is_a_one_line_error(tiny_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    cfg = tracked_config(tiny_model_dir, tmp_path, mlflow={"tracking_uri": uri})
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, cfg))])
    user_error(result, f"tracking.mlflow.tracking_uri: cannot use {uri}")
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tunelab.train(tracked_config(tiny_model_dir, tmp_path, wandb={"project": "tiny"}), quiet=True).run_dir
    ids = json.loads((run_dir / "tracking.json").read_text())["wandb"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{ids['id']}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert {"config.yaml", "summary.json", "loss_curve.png"} <= {p.name for p in (offline[0] / "files").iterdir()}


def test_missing_wandb_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, tracked_config(tiny_model_dir, tmp_path, wandb=True)))])
    user_error(result, "tracking.wandb: wandb is not installed; pip install wandb")
    assert not (tmp_path / "run").exists()


def test_tune_trials_log_to_one_mlflow_experiment_per_study(tiny_model_dir, tmp_path):
    from tunelab.tune import run_study

    cfg = tracked_config(tiny_model_dir, tmp_path, out="study", mlflow=True)
    cfg["training"].update({"eval_every": 1, "eval_at_start": False, "save_every": None})
    cfg["search"] = {"training.learning_rate": {"type": "categorical", "choices": [3.0e-2, 1.0e-4]}}
    cfg["tune"] = {"sampler": "grid", "startup_trials": 1, "trials": 2, "seed": 1}
    report = run_study(load_config(cfg), log=lambda _: None)
    states = {t.number: t.state.name for t in report.trials}
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'study' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"study/trial-{n:04d}" for n in states}
    for n, state in states.items():
        run = by_name[f"study/trial-{n:04d}"]
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[state]
        assert float(run.data.params["training.learning_rate"]) == report.trials[n].params["training.learning_rate"]
    assert sorted(states.values()) == ["COMPLETE", "PRUNED"]  # 1e-4 trails 3e-2 at its first eval
