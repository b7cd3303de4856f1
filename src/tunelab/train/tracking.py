"""Experiment tracking besides TensorBoard: MLflow and Weights & Biases (offline by default).

    tracking: {mlflow: true}            # -> sqlite:///<output.dir>/mlflow.db, artifacts in <output.dir>/mlartifacts
    tracking: {mlflow: {tracking_uri: http://mlflow.example:5000, experiment: demo}, wandb: true}

Every run logs its flattened config as params, every record MetricsLog writes as metrics at its step, and at the end
config.yaml, summary.json and loss_curve.png as artifacts. The loop calls `open_trackers(cfg)` before it writes
anything (a missing library or an unreachable tracking server is a one-line error), hands the result to MetricsLog
(which starts the runs and forwards each record) and calls `finish(run_dir)` after summary.json.

`<run_dir>/tracking.json` records which tracking runs the run directory belongs to, so a resumed run continues the same
MLflow run and a run stopped from outside (a pruned trial) can be closed with `finish_interrupted(run_dir)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tunelab.config import MlflowConfig, RunConfig, WandbConfig
from tunelab.errors import TunelabError

ARTIFACTS = ("config.yaml", "summary.json", "loss_curve.png")
MLFLOW_MISSING = "tracking.mlflow: mlflow is not installed; pip install mlflow (or set tracking.mlflow: false)"
WANDB_MISSING = "tracking.wandb: wandb is not installed; pip install wandb (or set tracking.wandb: false)"


def flatten_config(cfg: RunConfig) -> dict[str, str]:
    """The run config as `training.learning_rate -> "0.0002"` pairs (search and tune settings left out)."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk(cfg.model_dump(mode="json", exclude={"search", "tune"}), "")
    return flat


def _numeric(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _default_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def sqlite_file_lock(uri: str):
    """Serialize first-use schema creation when several processes open one SQLite file (MLflow's, Optuna's) at once."""
    db = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or not db.parent.is_dir():
        yield
        return
    import fcntl

    with open(db.with_name(f".{db.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _mlflow_client(uri: str, experiment: str):
    """(client, experiment id), creating the experiment (with its artifacts beside a SQLite file) on first use."""
    from mlflow import MlflowClient

    try:
        with sqlite_file_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return client, found.experiment_id
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            try:
                return client, client.create_experiment(experiment, artifact_location=location)
            except Exception:  # another process created it between the two calls
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                return client, found.experiment_id
    except Exception as exc:  # noqa: BLE001  (any store error: bad URI, unreachable server, locked or foreign file)
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise TunelabError(f"tracking.mlflow.tracking_uri: cannot use {uri} ({reason[:200]}); check the URI or the server") from None


class MlflowTracker:
    """One MLflow run per tunelab run, through MlflowClient (no global active run, so trials in one process never mix)."""

    def __init__(self, cfg: MlflowConfig, run_cfg: RunConfig) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TunelabError(MLFLOW_MISSING) from None
        _quiet_mlflow()
        self.cfg, self.run_cfg = cfg, run_cfg
        self.uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = self.experiment_id = self.run_id = None
        if self.uri:  # the default store lives in the run directory, which does not exist yet
            self.client, self.experiment_id = _mlflow_client(self.uri, cfg.experiment)

    def start(self, run_dir: Path, previous: dict | None) -> dict:
        from mlflow.entities import Param

        if self.client is None:
            self.uri = _default_uri(run_dir)
            self.client, self.experiment_id = _mlflow_client(self.uri, self.cfg.experiment)
        if previous and previous.get("tracking_uri") == self.uri:  # a resumed run continues its MLflow run
            with contextlib.suppress(Exception):
                self.client.update_run(previous["run_id"], status="RUNNING")
                self.run_id = previous["run_id"]
                return {"tracking_uri": self.uri, "run_id": self.run_id}
        run = self.client.create_run(self.experiment_id, run_name=self.cfg.run_name or run_dir.name,
                                     tags={"tunelab.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten_config(self.run_cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(record.get("step", 0))) for k, v in _numeric(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, status: str = "FINISHED") -> None:
        _close_mlflow_run(self.client, self.run_id, run_dir, status)


def _close_mlflow_run(client, run_id: str, run_dir: Path, status: str) -> None:
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))
    client.set_terminated(run_id, status=status)


class WandbTracker:
    """A W&B run written under <run_dir>/wandb (offline by default: `wandb sync` uploads it later)."""

    def __init__(self, cfg: WandbConfig, run_cfg: RunConfig) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TunelabError(WANDB_MISSING) from None
        self.cfg, self.run_cfg, self.run = cfg, run_cfg, None

    def start(self, run_dir: Path, previous: dict | None) -> dict:
        import wandb

        self.run = wandb.init(mode=self.cfg.mode, dir=str(run_dir), project=self.cfg.project, entity=self.cfg.entity,
                              name=run_dir.name, config=flatten_config(self.run_cfg), reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))
        return {"mode": self.cfg.mode, "id": self.run.id, "dir": str(run_dir / "wandb")}

    def log(self, record: dict) -> None:
        self.run.log(_numeric(record), step=int(record.get("step", 0)))

    def finish(self, run_dir: Path, status: str = "FINISHED") -> None:
        summary = run_dir / "summary.json"
        if summary.is_file():
            self.run.summary.update({k: v for k, v in json.loads(summary.read_text()).items() if isinstance(v, (int, float, str))})
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.run.save(str(run_dir / name), base_path=str(run_dir), policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Trackers:
    """The enabled trackers of one run; empty (and free) when tracking is off."""

    def __init__(self, trackers: dict[str, Any]) -> None:
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, run_dir: Path, resumed: bool) -> None:
        path = run_dir / "tracking.json"
        previous = json.loads(path.read_text()) if resumed and path.is_file() else {}
        ids = {name: tracker.start(run_dir, previous.get(name)) for name, tracker in self.trackers.items()}
        path.write_text(json.dumps(ids, indent=2) + "\n")

    def log(self, record: dict) -> None:
        for tracker in self.trackers.values():
            tracker.log(record)

    def finish(self, run_dir: Path) -> None:
        for tracker in self.trackers.values():
            tracker.finish(run_dir)


def open_trackers(cfg: RunConfig) -> Trackers:
    """The trackers `cfg.tracking` enables, checked before the run writes anything.

    Raises:
        TunelabError: mlflow or wandb is enabled but not installed; the MLflow tracking URI cannot be used.
    """
    trackers: dict[str, Any] = {}
    if cfg.tracking.mlflow is not None:
        trackers["mlflow"] = MlflowTracker(cfg.tracking.mlflow, cfg)
    if cfg.tracking.wandb is not None:
        trackers["wandb"] = WandbTracker(cfg.tracking.wandb, cfg)
    return Trackers(trackers)


def finish_interrupted(run_dir: Path, status: str = "KILLED") -> None:
    """Close the MLflow run of a run directory whose training was stopped from outside (e.g. a pruned trial).

    Logs the artifacts that exist and sets the run's status. A W&B run cannot be reached from here; it is finished
    when its process exits.
    """
    path = Path(run_dir) / "tracking.json"
    if not path.is_file():
        return
    ids = json.loads(path.read_text()).get("mlflow")
    if ids:
        from mlflow import MlflowClient

        _close_mlflow_run(MlflowClient(tracking_uri=ids["tracking_uri"]), ids["run_id"], Path(run_dir), status)
