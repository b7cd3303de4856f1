"""Sequential fine-tuning: the `stages:` of one config trained one after another, each from the previous stage's model.

    tunelab train configs/continued-pretraining.yaml          # stage 0 domain text -> stage 1 instructions
    tunelab train configs/stages.yaml --resume                # finished stages are skipped
    result = run_stages(load_config("configs/stages.yaml"))   # the Python API

A stage is the top-level config with the stage's sections put in: `data`, `method` and `continual` replace the top-level
ones, `training` keys are merged over the top-level training section. Every stage is validated (and its data checked
against its method) when the config loads, so a mistake in the last stage stops the run before the first one trains.

    <output.dir>/stages.yaml                       the staged config as given
    <output.dir>/stages/<i>-<name>/                each stage's full run directory (config.yaml, metrics, checkpoints, model/)
    <output.dir>/stages/<i>-<name>/merged/         an adapter stage followed by another: base + adapter merged with PEFT
                                                   (merge_and_unload); the next stage trains from it
    <output.dir>/{config.yaml, model/, summary.json, metrics.jsonl, loss_curve.png}
                                                   the last stage's, so generate / eval / export / serve / report read
                                                   the staged run as a plain one (summary.json lists every stage)

A full or freeze stage's saved model is the next stage's model as it is. Merging (instead of stacking adapters) keeps
one model per stage that any tool loads, and a next LoRA stage then learns a fresh low-rank update on top of the merged
weights, which is what "start from the previous stage's result" means for weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from tunelab.config import (
    DataConfig,
    RunConfig,
    StageConfig,
    check_method_fits,
    check_mixture,
    data_format_problem,
    format_validation_error,
)
from tunelab.errors import TunelabError

NOT_CONTINUABLE = {"reward": "a reward model scores replies", "prompt_tuning": "virtual tokens cannot be merged into weights",
                   "prefix_tuning": "a trained prefix cannot be merged into weights",
                   "adapter": "bottleneck adapters are non-linear and cannot be merged into weights"}
PUBLISHED = ("config.yaml", "summary.json", "metrics.jsonl", "loss_curve.png")


def stage_dir_name(i: int, stage: StageConfig) -> str:
    return f"{i}-{stage.name or f'stage{i}'}"


def stage_dict(cfg: RunConfig, i: int, model: str | None = None) -> dict:
    """Stage i as a plain run config dict: top-level sections with the stage's put in, its own output.dir."""
    stage = cfg.stages[i]
    out = cfg.model_dump(mode="json", exclude={"stages", "search", "tune"})
    for key in ("data", "method", "continual"):
        if getattr(stage, key) is not None:
            out[key] = getattr(stage, key).model_dump(mode="json")
    if stage.training is not None:
        out["training"] = {**out["training"], **stage.training.model_dump(mode="json", exclude_unset=True)}
    out["output"]["dir"] = str(Path(cfg.output.dir) / "stages" / stage_dir_name(i, stage))
    replay = (out.get("continual") or {}).get("replay")
    if replay and replay.get("data") == "previous" and i > 0:
        replay["data"] = [spec for j in range(i) for spec in stage_train_specs(cfg, j)]
    if model is not None:
        out["model"] = model
    return out


def stage_config(cfg: RunConfig, i: int, model: str | None = None) -> RunConfig:
    """Stage i as a RunConfig that `train` runs like any other; `model` is what it starts from (default: cfg.model)."""
    return RunConfig.model_validate(stage_dict(cfg, i, model), context={"task": getattr(cfg, "task", None)})


def stage_train_specs(cfg: RunConfig, i: int) -> list[str]:
    """The training files of stage i (every task's with data.tasks), for replay: 'previous'."""
    stage = cfg.stages[i]
    data = stage.data or cfg.data
    specs = [data.train] if data.train is not None else [t.train for t in data.tasks or []]
    return [s for spec in specs for s in ([spec] if isinstance(spec, str) else spec)]


def check_stages(cfg: RunConfig, source: str, lines: dict) -> None:
    """Every stage as its own run config, before anything trains: all stages' errors before the first step.

    Raises:
        TunelabError: `run.yaml:14: stages.1.data.format: dpo trains on preference pairs, ...` and the like.
    """
    def where(*loc: str) -> str:
        line = lines.get(loc)
        return f"{source}:{line}: {'.'.join(loc)}" if line else f"{source}: {'.'.join(loc)}"

    if cfg.stages is None:
        raise TunelabError(f"{where('data')}: required; give the data section (train: ...) or a stages: list")
    if not cfg.stages:
        raise TunelabError(f"{where('stages')}: an empty list; list the stages ({{name, data, method, training}}) or remove it")
    if cfg.search or cfg.tune is not None:
        raise TunelabError(f"{where('search' if cfg.search else 'tune')}: `tunelab tune` searches a plain run; remove stages "
                           "or search a single stage's config")
    last = len(cfg.stages) - 1
    for i, stage in enumerate(cfg.stages):
        at = ("stages", str(i))
        if stage.data is None and cfg.data is None:
            raise TunelabError(f"{where(*at)}: this stage has no data; give it data: {{train: ...}} or set a top-level data section")
        try:
            sub = stage_config(cfg, i)
        except ValidationError as err:
            problem = format_validation_error(err, "stage", stage_dict(cfg, i), {}).removeprefix("stage: ")
            raise TunelabError(f"{where(*at)}.{problem}") from None
        check_method_fits(sub, source, lines, set(), at)
        check_mixture(sub, source, lines, at)
        method = sub.method.name
        inner = getattr(getattr(sub.method, "adapter", None), "name", None)  # dpo/distill train through an inner method
        method = inner if inner in NOT_CONTINUABLE and method not in NOT_CONTINUABLE else method
        if i < last and method in NOT_CONTINUABLE:
            raise TunelabError(f"{where(*at, 'method', 'name')}: {method} cannot be the model the next stage starts from "
                               f"({NOT_CONTINUABLE[method]}); make it the last stage")
        if i < last and getattr(cfg, "task", "causal_lm") == "classification":
            raise TunelabError(f"{where('task')}: a classifier cannot be the model a next stage starts from; "
                               "train classification in a single stage (or as the last one of a plain run)")
        replay = cfg.stages[i].continual.replay if cfg.stages[i].continual is not None else cfg.continual.replay
        if replay is not None and replay.data == "previous":
            if i == 0:
                raise TunelabError(f"{where(*at, 'continual', 'replay', 'data')}: 'previous' replays the earlier stages' "
                                   "data, and stage 0 has none; give replay file(s) or remove replay here")
            pairs = getattr(sub.method, "trains_on_pairs", False)
            for j in range(i):
                earlier = stage_config(cfg, j)
                if getattr(earlier.method, "trains_on_pairs", False) != pairs:
                    fmt = "preference" if not pairs else (earlier.data.format or "instruction")
                    raise TunelabError(f"{where(*at, 'continual', 'replay', 'data')}: 'previous' would replay stage {j}'s "
                                       f"rows: {data_format_problem(method, pairs, fmt)}")


def data_sections(cfg: RunConfig) -> list[tuple[str, str | list[str], str | None, DataConfig]]:
    """(config key, file spec, format, the data section) of every data file a run reads: each stage's, each task's,
    the replay files'."""
    runs = [(f"stages.{i}.", stage_config(cfg, i)) for i in range(len(cfg.stages))] if cfg.stages else [("", cfg)]
    out = []
    for at, run in runs:
        data = run.data
        if data.tasks:
            for j, task in enumerate(data.tasks):
                for key in ("train", "validation"):
                    spec = getattr(task, key)
                    if isinstance(spec, (str, list)):
                        out.append((f"{at}data.tasks.{j}.{key}", spec, task.format or data.format, data))
        else:
            for key in ("train", "validation", "test"):
                spec = getattr(data, key)
                if isinstance(spec, (str, list)):
                    out.append((f"{at}data.{key}", spec, data.format, data))
        replay = run.continual.replay
        if replay is not None and not (at and _replays_previous(cfg, at)):  # 'previous': the earlier stages' files
            out.append((f"{at}continual.replay.data", replay.data, replay.format, data))
    return out


def _replays_previous(cfg: RunConfig, at: str) -> bool:
    stage = cfg.stages[int(at.split(".")[1])]
    replay = stage.continual.replay if stage.continual is not None else cfg.continual.replay
    return replay is not None and replay.data == "previous"


def check_files(cfg: RunConfig) -> None:
    """Every data file of every stage exists, before the first stage trains.

    Raises:
        TunelabError: `stages.2.data.train: file not found: 'prefs.jsonl'; ...`.
    """
    from tunelab.data.readers import expand_paths

    for key, spec, _, _ in data_sections(cfg):
        expand_paths(spec, key)


def describe_stages(cfg: RunConfig) -> list[str]:
    """One line per stage: what it trains on, with which method, from which model, into which directory."""
    lines = []
    for i, stage in enumerate(cfg.stages or []):
        sub = stage_config(cfg, i)
        data = sub.data
        what = (", ".join(t.name for t in data.tasks) if data.tasks
                else ", ".join([data.train] if isinstance(data.train, str) else data.train))
        start = cfg.model if i == 0 else f"stage {i - 1}'s model" + (" (merged)" if _is_adapter(stage_config(cfg, i - 1)) else "")
        extra = f", replay {sub.continual.replay.fraction:g}" if sub.continual.replay is not None else ""
        lines.append(f"stage {i} {stage_dir_name(i, stage)}: {sub.method.name} on {what} (format {data.format or 'auto'}"
                     f"{', packed' if data.packing else ''}{extra}) from {start} -> {sub.output.dir}")
    return lines


def _is_adapter(sub: RunConfig) -> bool:
    inner = getattr(sub.method, "adapter", sub.method)
    return inner.name not in ("full", "freeze")


# ----------------------------------------------------------------------------------------------------------------------
# Running


def run_stages(cfg: RunConfig, resume: bool | None = None, quiet: bool = False):
    """Train every stage in order, each from the previous stage's model; publish the last stage as the run.

    Raises:
        TunelabError: the output directory holds something else, or a stage fails as `train` would.
    """
    from tunelab.train.checkpoint import list_checkpoints
    from tunelab.train.loop import TrainResult, train

    check_files(cfg)
    out = Path(cfg.output.dir)
    setting = cfg.resume if resume is None else resume
    resume = (out / "stages.yaml").is_file() if setting == "auto" else bool(setting)  # auto: continue what is there
    _prepare_out(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.yaml").write_text(cfg.to_yaml())
    model = cfg.model
    results = []
    for i, stage in enumerate(cfg.stages):
        sub = stage_config(cfg, i, model)
        stage_dir = Path(sub.output.dir)
        if resume and (stage_dir / "summary.json").is_file() and (stage_dir / "model").is_dir():
            summary = json.loads((stage_dir / "summary.json").read_text())
            result = TrainResult(stage_dir, summary)
            if not quiet:
                print(f"stage {i} ({stage_dir_name(i, stage)}): finished before, skipped")
        else:
            if not quiet:
                print(f"stage {i} ({stage_dir_name(i, stage)}): {sub.method.name} from {model}")
            has_checkpoint = bool(list_checkpoints(stage_dir / "checkpoints"))
            result = train(sub, resume=resume and has_checkpoint, quiet=quiet)
        results.append((stage_dir_name(i, stage), sub, result))
        if i < len(cfg.stages) - 1:
            model = str(next_stage_model(stage_dir).resolve())
    return _publish(out, cfg, results)


def _prepare_out(out: Path, cfg: RunConfig, resume: bool) -> None:
    if resume:
        if not (out / "stages.yaml").is_file():
            raise TunelabError(f"--resume: {out} holds no staged run to continue; run without --resume to start it")
        return
    if out.exists() and any(out.iterdir()):
        if not (out / "stages.yaml").is_file() and not (out / "config.yaml").is_file():
            raise TunelabError(f"output.dir: {out} is not empty and is not a tunelab run; choose a new or empty directory")
        if not cfg.output.overwrite:
            raise TunelabError(f"output.dir: {out} already holds a run; pass --resume to continue it, "
                               "output.overwrite=true to replace it, or choose another output.dir")
        shutil.rmtree(out)


def next_stage_model(run_dir: Path) -> Path:
    """The model the next stage starts from: a full stage's saved model, or an adapter merged into its base.

    Raises:
        TunelabError: the stage saved something that is neither (a method whose result cannot be merged).
    """
    model_dir = run_dir / "model"
    if (model_dir / "adapter_config.json").is_file():
        return merge_stage(run_dir)
    if (model_dir / "config.json").is_file():
        return model_dir
    raise TunelabError(f"{run_dir}: its model cannot be continued by a next stage (no HF weights or PEFT adapter in model/)")


def merge_stage(run_dir: Path) -> Path:
    """Base + the stage's PEFT adapter, merged (merge_and_unload) in float32 and saved as an HF directory with the
    stage's tokenizer: `<run_dir>/merged`. Written once (atomically); a resumed run reuses it."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunelab.evaluate.report import adapter_base_target
    from tunelab.models.loading import load_model, resolve_model

    out = run_dir / "merged"
    if (out / "config.json").is_file():
        return out
    base = load_model(resolve_model(adapter_base_target(run_dir)))  # full precision, also after a qlora stage
    model = PeftModel.from_pretrained(base, str(run_dir / "model")).merge_and_unload().eval()
    model.config.use_cache = True
    tmp = out.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(run_dir / "model").save_pretrained(tmp)
    os.rename(tmp, out)
    return out


def _publish(out: Path, cfg: RunConfig, results: list):
    """Copy the last stage's run files to the top-level directory, so the staged run reads like a plain one."""
    from tunelab.train.loop import TrainResult

    _, last_cfg, last = results[-1]
    for file in PUBLISHED:
        if (last.run_dir / file).is_file():
            shutil.copyfile(last.run_dir / file, out / file)
    (out / "config.yaml").write_text(last_cfg.model_copy(update={"output": last_cfg.output.model_copy(
        update={"dir": str(out)})}).to_yaml())
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last.run_dir / "model", tmp, copy_function=_link_or_copy)
    shutil.rmtree(out / "model", ignore_errors=True)
    os.rename(tmp, out / "model")
    summary = dict(last.summary)
    summary["stages"] = [{"stage": n, "dir": str(r.run_dir), "method": c.method.name, "model": c.model,
                          "steps": r.summary.get("steps"), "initial_eval_loss": r.summary.get("initial_eval_loss"),
                          "final_eval_loss": r.summary.get("final_eval_loss")} for n, c, r in results]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(out, summary)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
