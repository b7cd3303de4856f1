"""One Optuna study over a run config's `search:` space; every trial is a normal run directory.

    tunelab tune configs/tune-demo.yaml --trials 8            # sqlite:///runs/tune-demo/study.db
    tunelab tune run.yaml --trials 10 --storage postgresql://user@db/tunelab --study lr   # same line on every machine

    <output.dir>/
      study.db                 the Optuna storage (default); optuna-dashboard sqlite:///<output.dir>/study.db
      trial-0000/ ...          run directories (a pruned trial keeps config.yaml, metrics.jsonl, loss_curve.png)
      trial-0000/trial.json    state, parameters and value of that trial
      best.yaml                the base config with the best parameters: `tunelab train <output.dir>/best.yaml`
      history.png, importance.png, results.json

Workers share a study through its storage: each `tunelab tune` process runs its own --trials. Optuna's heartbeat marks
the trial of a killed worker failed (after twice tune.heartbeat_interval) when any worker starts its next trial, and
the failed trial's parameters are queued again (tune.retry_failed times). Trial n samples with a seed made from
(seed, n), so workers never repeat each other's draws and a single worker's study is reproducible.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import EVAL_LOSS_METRICS, RunConfig, TuneConfig, config_from_dict, set_path
from tunelab.errors import TunelabError
from tunelab.train.tracking import sqlite_file_lock
from tunelab.tune.space import decode, grid_space, suggest

STUDY_FILES = ("study.db", "best.yaml", "results.json", "history.png", "importance.png")


@dataclass
class StudyReport:
    study_name: str
    storage: str
    study_dir: Path
    metric: str
    direction: str
    trials: list = field(default_factory=list)  # optuna FrozenTrial, by number
    best: Any = None
    best_yaml: Path | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ran: int = 0
    best_params: dict = field(default_factory=dict)  # as config values (JSON-encoded choices decoded)


class _TrialFailed(Exception):
    """A trial's run stopped with a user error after an earlier trial of this process succeeded: the study goes on."""


def _mask(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def open_storage(url: str, tune: TuneConfig):
    """An Optuna RDBStorage with heartbeats, so a killed worker's trial is failed (and retried) by the others.

    Raises:
        TunelabError: the URL is malformed, its driver is missing, or the database cannot be reached.
    """
    import optuna
    from optuna.storages import RDBStorage

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = {}
            if tune.retry_failed and hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(tune.retry_failed)}
            elif tune.retry_failed:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(tune.retry_failed)}
            with sqlite_file_lock(url):  # two workers starting at once must not both create the tables
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=tune.heartbeat_interval,
                                  grace_period=2 * tune.heartbeat_interval, **retry)
    except Exception as exc:  # noqa: BLE001  (sqlalchemy/driver errors of every kind)
        reason = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        reason = re.sub(r"\s*\(Background on this error.*", "", reason)[:200]
        raise TunelabError(f"tune.storage: cannot open {_mask(url)} ({reason}); give a reachable Optuna RDB URL such as "
                           "sqlite:///runs/study.db or postgresql://user:pass@host/db") from None


def _sampler(tune: TuneConfig, cfg: RunConfig, seed: int):
    import optuna

    if tune.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg.search), seed=seed)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=tune.startup_trials, seed=seed)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number`: studies with seeds 0 and 1 must not share draws (seed + n would)."""
    return (seed * 1_000_003 + number) % 2**32


def _pruner(tune: TuneConfig, cfg: RunConfig):
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_steps)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(tune.warmup_steps, cfg.training.eval_every or 1))
    return optuna.pruners.NopPruner()


def _check(cfg: RunConfig, tune: TuneConfig) -> None:
    if not cfg.search:
        raise TunelabError("search: nothing to tune; declare the space, e.g. "
                           "search: {training.learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}")
    task_validation = any(t.validation is not None for t in cfg.data.tasks or [])  # data.tasks: each task's own
    if tune.metric in EVAL_LOSS_METRICS and cfg.data.validation is None and cfg.data.split is None and not task_validation:
        raise TunelabError(f"data.validation: tune.metric {tune.metric} needs validation data; "
                           "set data.validation (a file or a fraction such as 0.1)")
    study_dir = Path(cfg.output.dir)
    if (study_dir / "config.yaml").is_file() or (study_dir / "summary.json").is_file():
        raise TunelabError(f"output.dir: {study_dir} holds a training run, not a study; choose another output.dir")


def trial_config(base: dict, params: dict, run_dir: Path, study_name: str, study_dir: Path, number: int) -> RunConfig:
    """The base config with this trial's parameters and its own run directory (and MLflow store next to the study)."""
    data = json.loads(json.dumps(base))
    for path, value in params.items():
        set_path(data, path, value)
    data["output"] = {**(data.get("output") or {}), "dir": str(run_dir)}
    tracking = data.get("tracking") or {}
    if isinstance(tracking.get("mlflow"), dict):
        mlflow = tracking["mlflow"]
        if not mlflow.get("tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow["tracking_uri"] = f"sqlite:///{(study_dir / 'mlflow.db').resolve()}"
        mlflow.setdefault("experiment", study_name)
        mlflow.setdefault("run_name", f"{study_name}/{run_dir.name}")
    return config_from_dict(data, f"trial {number}")


def _stopped_run(run_dir: Path, status: str) -> None:
    """A run stopped from outside (pruned, failed): draw its loss curve from metrics.jsonl and close its tracking."""
    from tunelab.train.run_dir import plot_loss
    from tunelab.train.tracking import finish_interrupted

    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if records:
            plot_loss(records, run_dir / "loss_curve.png")
    with contextlib.suppress(Exception):  # tracking must never hide why the trial stopped
        finish_interrupted(run_dir, status)


def _write_trial_json(run_dir: Path, trial_number: int, state: str, params: dict, value: float | None, **extra) -> None:
    if run_dir.is_dir():
        info = {"trial": trial_number, "state": state, "params": params, "value": value, **extra}
        (run_dir / "trial.json").write_text(json.dumps(info, indent=2) + "\n")


def run_study(cfg: RunConfig, verbose: bool = False, log: Callable[[str], None] = print) -> StudyReport:
    """Run `cfg.tune.trials` trials of the study (creating or joining it), then report on the whole study.

    Raises:
        TunelabError: empty search space, no validation data for an eval-loss metric, unreachable storage, a study
            of the same name made for another metric or direction, or a user error in this process's first trial.
    """
    import optuna

    from tunelab.train.loop import train

    tune = cfg.tune or TuneConfig()
    _check(cfg, tune)
    study_dir = Path(cfg.output.dir)
    study_name = tune.study or study_dir.resolve().name
    url = tune.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if tune.storage is None:
        study_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(url, tune)
    seed = cfg.training.seed if tune.seed is None else tune.seed
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=tune.goal, load_if_exists=True,
                                    sampler=_sampler(tune, cfg, seed), pruner=_pruner(tune, cfg))
    except Exception as exc:  # noqa: BLE001
        raise TunelabError(f"tune.storage: cannot create study '{study_name}' in {_mask(url)} ({str(exc)[:200]})") from None
    made_for = study.user_attrs.get("metric")
    if made_for is not None and (made_for != tune.metric or study.direction.name.lower() != tune.goal):
        raise TunelabError(f"tune.study: '{study_name}' in {_mask(url)} optimizes {made_for} ({study.direction.name.lower()}); "
                           f"choose another --study for {tune.metric} ({tune.goal})")
    if made_for is None:
        study.set_user_attr("metric", tune.metric)
        study.set_user_attr("search", {k: v.model_dump(exclude_none=True) for k, v in cfg.search.items()})
    study_dir.mkdir(parents=True, exist_ok=True)

    base = cfg.model_dump(mode="json", exclude_unset=True, exclude={"search", "tune"})
    prune = tune.pruner != "none"
    report = StudyReport(study_name, _mask(url), study_dir, tune.metric, tune.goal)
    completed_here = 0

    def objective(trial) -> float:
        nonlocal completed_here
        if tune.sampler != "grid":  # trial n draws with its own seed: reproducible alone, distinct across workers
            study.sampler = _sampler(tune, cfg, trial_seed(seed, trial.number))
        params = {path: suggest(trial, path, param, tune.sampler == "grid") for path, param in cfg.search.items()}
        run_dir = study_dir / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        started = time.perf_counter()

        def on_eval(step: int, eval_loss: float) -> None:
            trial.report(math.exp(eval_loss) if tune.metric == "eval_perplexity" else eval_loss, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"eval loss {eval_loss:.4f} at step {step}")

        try:
            run_cfg = trial_config(base, params, run_dir, study_name, study_dir, trial.number)
            result = train(run_cfg, quiet=not verbose, on_eval=on_eval if prune else None)
        except optuna.TrialPruned:
            _stopped_run(run_dir, "KILLED")
            _write_trial_json(run_dir, trial.number, "PRUNED", params, None, pruned_at_step=trial.user_attrs.get("pruned_at_step"))
            raise
        except TunelabError as exc:
            trial.set_user_attr("error", str(exc))
            _stopped_run(run_dir, "FAILED")
            _write_trial_json(run_dir, trial.number, "FAIL", params, None, error=str(exc))
            if completed_here == 0:
                raise  # the first trial of this process: most likely every trial would fail the same way
            raise _TrialFailed(str(exc)) from None
        value = result.summary.get(tune.metric)
        if value is None:
            raise TunelabError(f"tune.metric: trial {trial.number}'s summary.json has no {tune.metric}")
        trial.set_user_attr("steps", result.summary.get("steps"))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        completed_here += 1
        _write_trial_json(run_dir, trial.number, "COMPLETE", params, value)
        return float(value)

    def announce(_study, frozen) -> None:
        report.ran += 1
        log(describe_trial(frozen, tune.metric))

    if tune.trials:
        grid_note = f" over a grid of {math.prod(len(v) for v in grid_space(cfg.search).values())} points" if tune.sampler == "grid" else ""
        log(f"study '{study_name}' in {_mask(url)}: {tune.trials} trial(s) with the {tune.sampler} sampler{grid_note}, "
            f"pruner {tune.pruner}, {tune.goal} {tune.metric}")
        study.optimize(objective, n_trials=tune.trials, catch=(_TrialFailed,), callbacks=[announce], gc_after_trial=True)
        gc.collect()
    return write_results(study, cfg, tune, report)


def describe_trial(frozen, metric: str) -> str:
    params = ", ".join(f"{k}={_short(v)}" for k, v in frozen.params.items())
    state = frozen.state.name
    if state == "COMPLETE":
        what = f"{metric} {frozen.value:.4f}"
    elif state == "PRUNED":
        what = f"pruned at step {frozen.user_attrs.get('pruned_at_step', '?')}"
    else:
        what = f"failed: {frozen.user_attrs.get('error', 'see the run directory')}"
    seconds = frozen.duration.total_seconds() if frozen.duration else None
    return f"trial {frozen.number}: {what} ({params})" + (f" [{seconds:.1f} s]" if seconds is not None else "")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_results(study, cfg: RunConfig, tune: TuneConfig, report: StudyReport) -> StudyReport:
    """best.yaml, results.json and the two plots, from every trial of the study (other workers' included)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of workers that died since
    report.trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in report.trials if t.state.name == "COMPLETE"]
    study_dir = report.study_dir
    if complete:
        report.best = study.best_trial
        report.best_params = _params(report.best, cfg)
        report.best_yaml = write_best_yaml(cfg, report)
        report.files.append(report.best_yaml)
    else:
        report.notes.append("no trial completed yet: no best.yaml")
    report.files += _plots(study, study_dir, len(complete), report.notes)
    results = {
        "study": report.study_name, "storage": report.storage, "metric": report.metric, "direction": report.direction,
        "states": {s: sum(t.state.name == s for t in report.trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
        "best": None if report.best is None else {
            "trial": report.best.number, "value": report.best.value, "params": _params(report.best, cfg),
            "run_dir": report.best.user_attrs.get("run_dir")},
        "trials": [{"trial": t.number, "state": t.state.name, "value": t.value, "params": _params(t, cfg),
                    "seconds": t.duration.total_seconds() if t.duration else None, **t.user_attrs} for t in report.trials],
    }
    _replace_atomically(study_dir / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    report.files.append(study_dir / "results.json")
    return report


def _params(trial, cfg: RunConfig) -> dict:
    return {k: decode(k, v, cfg.search) for k, v in trial.params.items()}


def write_best_yaml(cfg: RunConfig, report: StudyReport) -> Path:
    """The base config with the best parameters, no search/tune sections, and a fresh output.dir."""
    best = report.best
    data = cfg.model_dump(mode="json", exclude_unset=True, exclude={"search", "tune"})
    for path, value in _params(best, cfg).items():
        set_path(data, path, value)
    fresh = report.study_dir / "best"
    n = 2
    while fresh.exists():
        fresh = report.study_dir / f"best-{n}"
        n += 1
    data["output"] = {**(data.get("output") or {}), "dir": str(fresh)}
    header = (f"# Best of study '{report.study_name}' ({report.storage}): trial {best.number}, {report.metric} {best.value:.6g}.\n"
              f"#   tunelab train {report.study_dir / 'best.yaml'}\n")
    target = report.study_dir / "best.yaml"
    _replace_atomically(target, lambda p: p.write_text(header + yaml.safe_dump(data, sort_keys=False)))
    return target


def _plots(study, study_dir: Path, n_complete: int, notes: list[str]) -> list[Path]:
    """Optimization history and parameter importances as PNG (optuna.visualization.matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    plots = [("history.png", vis.plot_optimization_history, 1), ("importance.png", vis.plot_param_importances, 2)]
    for name, plot, needs in plots:
        if n_complete < needs:
            notes.append(f"{name}: needs {needs} complete trial(s)")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = ax.figure
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            _replace_atomically(study_dir / name, lambda p, fig=fig: fig.savefig(p, dpi=110))
            plt.close(fig)
            written.append(study_dir / name)
        except Exception as exc:  # noqa: BLE001  (importances fail on degenerate studies, e.g. one value per parameter)
            notes.append(f"{name}: not drawn ({str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__})")
    return written


def trials_table(report: StudyReport):
    """A rich table of every trial of the study."""
    from rich.table import Table

    names = list(dict.fromkeys(k for t in report.trials for k in t.params))
    table = Table(title=f"study {report.study_name}: {len(report.trials)} trial(s), {report.direction} {report.metric}")
    table.add_column("trial", justify="right")
    table.add_column("state")
    table.add_column(report.metric, justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("steps", justify="right")
    table.add_column("s", justify="right")
    best = report.best.number if report.best is not None else None
    for t in report.trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        steps = t.user_attrs.get("steps", t.user_attrs.get("pruned_at_step", ""))
        seconds = f"{t.duration.total_seconds():.1f}" if t.duration else ""
        table.add_row(str(t.number), t.state.name + (" *" if t.number == best else ""), value,
                      *[_short(t.params[n]) if n in t.params else "" for n in names], str(steps), seconds)
    return table
