"""The run config: YAML -> typed RunConfig, `key=value` overrides, and one-line errors that name file:line and key."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import yaml

from tunelab.config import FreezeMethod, FullMethod, LoraMethod, RunConfig, load_config
from tunelab.errors import TunelabError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

FULL = """\
model: default
data:
  train: data/train.jsonl
  validation: 0.1
  format: alpaca
  max_length: 256
method:
  name: lora
  r: 8
  alpha: 16
  dropout: 0.1
  target_modules: [q_proj, v_proj]
training:
  epochs: 2
  batch_size: 4
  gradient_accumulation: 2
  learning_rate: 1.0e-4
  schedule: linear
  warmup_ratio: 0.1
  seed: 7
output:
  dir: runs/my-run
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def error_of(path, overrides=None) -> str:
    with pytest.raises(TunelabError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing needle."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_full_config_loads_every_section(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.model == "default"
    assert cfg.data.train == "data/train.jsonl"
    assert cfg.data.validation == 0.1
    assert cfg.data.format == "alpaca"
    assert cfg.data.max_length == 256
    assert isinstance(cfg.method, LoraMethod)
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (8, 16, 0.1)
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    t = cfg.training
    assert (t.epochs, t.batch_size, t.gradient_accumulation, t.learning_rate) == (2, 4, 2, 1e-4)
    assert (t.schedule, t.warmup_ratio, t.seed) == ("linear", 0.1, 7)
    assert cfg.output.dir == "runs/my-run"


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {train: a.jsonl}\n"))
    assert cfg.model == "default"
    assert isinstance(cfg.method, LoraMethod) and cfg.method.target_modules == "all-linear"
    assert cfg.training.learning_rate == 2.0e-4
    assert cfg.data.validation is None


def test_exponent_without_dot_and_list_of_train_files(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 as a string; the typed config still makes it a float
    cfg = load_config(write(tmp_path, "data: {train: [a.jsonl, 'b/*.csv'], validation: val.jsonl}\ntraining: {learning_rate: 1e-4}\n"))
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.data.train == ["a.jsonl", "b/*.csv"]
    assert cfg.data.validation == "val.jsonl"


def test_numeric_model_name_becomes_a_string(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "model: 123\ndata: {train: a.jsonl}\n")).model == "123"


# ----------------------------------------------------------------------------------------------------------------------
# Unknown keys, types, ranges


def test_unknown_top_level_key_names_line_and_suggests(tmp_path: Path) -> None:
    text = FULL + "trainig:\n  epochs: 1\n"
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg == f"{p}:{line_of(text, 'trainig')}: trainig: unknown key; did you mean 'training'?"


def test_unknown_top_level_key_without_a_close_match_lists_valid_keys(tmp_path: Path) -> None:
    p = write(tmp_path, FULL + "zzz: 1\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:23: zzz: unknown key; valid keys: ")
    for key in ("model", "data", "method", "training", "output"):
        assert key in msg


def test_unknown_nested_key_names_line_and_suggests(tmp_path: Path) -> None:
    text = FULL.replace("  learning_rate: 1.0e-4", "  learnign_rate: 1.0e-4")
    p = write(tmp_path, text)
    msg = error_of(p)
    n = line_of(text, "learnign_rate")
    assert n == 17
    assert msg.startswith(f"{p}:{n}: ")
    assert "training.learnign_rate: unknown key" in msg
    assert "did you mean 'learning_rate'" in msg


def test_unknown_key_in_a_flow_mapping_names_line(tmp_path: Path) -> None:
    text = "model: default\n\ndata: {train: a.jsonl, max_lenght: 128}\n"
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg == f"{p}:3: data.max_lenght: unknown key; did you mean 'max_length'?"


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    text = FULL.replace("batch_size: 4", "batch_size: eight")
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg.startswith(f"{p}:{line_of(text, 'batch_size')}: training.batch_size: ")
    assert "integer" in msg and "'eight'" in msg


@pytest.mark.parametrize(
    "old, new, key, words",
    [
        ("validation: 0.1", "validation: 1.5", "data.validation", "between 0 and 1"),
        ("validation: 0.1", "validation: 0", "data.validation", "between 0 and 1"),
        ("max_length: 256", "max_length: 4", "data.max_length", "greater than or equal to 8"),
        ("r: 8", "r: 0", "method.r", "greater than or equal to 1"),
        ("dropout: 0.1", "dropout: 1.0", "method.dropout", "less than 1"),
        ("epochs: 2", "epochs: 0", "training.epochs", "greater than 0"),
        ("learning_rate: 1.0e-4", "learning_rate: -1.0", "training.learning_rate", "greater than 0"),
        ("schedule: linear", "schedule: cosnie", "training.schedule", "'cosine'"),
        ("format: alpaca", "format: sharegpt", "data.format", "'alpaca'"),
    ],
)
def test_out_of_range_or_invalid_choice_names_key_and_line(tmp_path: Path, old: str, new: str, key: str, words: str) -> None:
    assert old in FULL
    text = FULL.replace(old, new)
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg.startswith(f"{p}:{line_of(text, new)}: {key}: "), msg
    assert words in msg


def test_unknown_method_name_suggests_closest(tmp_path: Path) -> None:
    text = FULL.replace("name: lora", "name: lorra")
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg.startswith(f"{p}:")
    assert "method.name: unknown method 'lorra'; did you mean 'lora'?" in msg


def test_unknown_method_name_far_from_any_lists_the_methods(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "data: {train: a.jsonl}\nmethod: {name: qqqqqq}\n"))
    assert "unknown method 'qqqqqq'" in msg and "full, freeze, lora" in msg


def test_method_without_name_means_the_default_lora(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {train: a.jsonl}\nmethod: {r: 8}\n"))
    assert cfg.method.name == "lora" and cfg.method.r == 8
    msg = error_of(write(tmp_path, "data: {train: a.jsonl}\nmethod: {train_top_blocks: 2}\n"))
    assert "method.train_top_blocks: unknown key" in msg


def test_method_specific_key_on_another_method_is_unknown(tmp_path: Path) -> None:
    text = "data: {train: a.jsonl}\nmethod:\n  name: full\n  r: 8\n"
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg == f"{p}:4: method.r: unknown key; valid keys: name"


def test_method_specific_key_typo_suggests_within_the_method(tmp_path: Path) -> None:
    text = "data: {train: a.jsonl}\nmethod:\n  name: freeze\n  train_top_block: 2\n"
    p = write(tmp_path, text)
    assert error_of(p) == f"{p}:4: method.train_top_block: unknown key; did you mean 'train_top_blocks'?"


@pytest.mark.parametrize("method", ["{name: freeze, train_top_blocks: 0}", "{name: freeze, train_top_blocks: null}"])
def test_freeze_with_nothing_to_train(tmp_path: Path, method: str) -> None:
    p = write(tmp_path, f"data: {{train: a.jsonl}}\nmethod: {method}\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:2: method: freeze trains nothing")
    assert "train_top_blocks >= 1" in msg


def test_each_method_gets_its_own_section_type(tmp_path: Path) -> None:
    assert isinstance(load_config(write(tmp_path, "data: {train: a}\nmethod: {name: full}\n")).method, FullMethod)
    cfg = load_config(write(tmp_path, "data: {train: a}\nmethod: {name: freeze, train_top_blocks: 0, train_modules: ['*.norm.*']}\n"))
    assert isinstance(cfg.method, FreezeMethod) and cfg.method.train_modules == ["*.norm.*"]


def test_missing_required_section(tmp_path: Path) -> None:
    p = write(tmp_path, "model: default\n")
    assert error_of(p) == f"{p}: data: required key is missing; add it (see configs/ for examples)"


def test_missing_required_nested_key(tmp_path: Path) -> None:
    p = write(tmp_path, "data:\n  max_length: 64\n")
    assert error_of(p).startswith(f"{p}: data.train: required key is missing")


# ----------------------------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_change_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), ["training.epochs=1", "method.r=16", "data.format=messages", "output.dir=runs/x"])
    assert cfg.training.epochs == 1
    assert cfg.method.r == 16 and cfg.method.alpha == 16  # other method keys are kept
    assert cfg.data.format == "messages"
    assert cfg.output.dir == "runs/x"


def test_override_values_are_yaml_scalars(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, FULL),
        ["training.max_grad_norm=null", "data.train_on_inputs=true", "method.target_modules=[q_proj]", "training.learning_rate=3e-5"],
    )
    assert cfg.training.max_grad_norm is None
    assert cfg.data.train_on_inputs is True
    assert cfg.method.target_modules == ["q_proj"]
    assert cfg.training.learning_rate == pytest.approx(3e-5)


def test_override_creates_nested_sections(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), ["training.early_stopping.patience=5", "output.overwrite=true"])
    assert cfg.training.early_stopping is not None and cfg.training.early_stopping.patience == 5
    assert cfg.output.overwrite is True
    cfg = load_config(write(tmp_path, "data: {train: a.jsonl}\n"), ["training.seed=3"])
    assert cfg.training.seed == 3


def test_override_can_switch_method(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {train: a}\nmethod: {name: full}\n"), ["method.name=freeze", "method.train_top_blocks=1"])
    assert isinstance(cfg.method, FreezeMethod) and cfg.method.train_top_blocks == 1


def test_override_leading_dashes_are_ignored(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, FULL), ["--training.epochs=4"]).training.epochs == 4


@pytest.mark.parametrize("bad", ["training.epochs", "training.epochs 1"])
def test_override_without_equals(tmp_path: Path, bad: str) -> None:
    msg = error_of(write(tmp_path, FULL), [bad])
    assert msg == f"override '{bad}': expected key.sub=value (e.g. training.epochs=1)"


def test_override_with_empty_key(tmp_path: Path) -> None:
    assert "the key is empty" in error_of(write(tmp_path, FULL), ["=3"])


def test_override_with_unknown_key_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, FULL)
    msg = error_of(p, ["training.learnign_rate=1e-3"])
    assert msg.startswith("command-line override: training.learnign_rate: unknown key")
    assert "did you mean 'learning_rate'?" in msg


def test_override_with_bad_value_names_key(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, FULL), ["training.batch_size=lots"])
    assert "training.batch_size:" in msg and "'lots'" in msg


def test_overrides_on_a_dict_config() -> None:
    base = {"data": {"train": "a.jsonl"}, "training": {"epochs": 3}}
    cfg = load_config(base, ["training.epochs=1"])
    assert cfg.training.epochs == 1
    with pytest.raises(TunelabError, match=r"^config: training.epoch: unknown key; did you mean 'epochs'\?"):
        load_config({"data": {"train": "a"}, "training": {"epoch": 1}})


def test_overrides_do_not_modify_the_callers_dict() -> None:
    base = {"data": {"train": "a.jsonl"}, "training": {"epochs": 3}}
    before = copy.deepcopy(base)
    load_config(base, ["training.epochs=1"])
    assert base == before


# ----------------------------------------------------------------------------------------------------------------------
# The file itself


def test_missing_config_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    msg = error_of(p)
    assert msg.startswith(f"{p}: config file not found")


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    assert "config file not found" in error_of(tmp_path)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, "model: default\ndata:\n  train: [a.jsonl, b.jsonl\nmethod: {name: lora}\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:4: invalid YAML")
    assert "fix the indentation or quoting" in msg


def test_invalid_yaml_bad_indentation_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, "model: default\ndata:\n  train: a.jsonl\n   max_length: 64\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:4: invalid YAML")


def test_tabs_in_yaml(tmp_path: Path) -> None:
    p = tmp_path / "run.yaml"
    p.write_text("data:\n\ttrain: a.jsonl\n", encoding="utf-8")
    msg = error_of(p)
    assert msg.startswith(f"{p}:2: invalid YAML")


def test_config_that_is_a_list(tmp_path: Path) -> None:
    p = write(tmp_path, "- model: default\n- data: {train: a}\n")
    assert error_of(p) == f"{p}: the config must be a mapping of sections (model, data, method, training, output)"


def test_config_that_is_a_scalar(tmp_path: Path) -> None:
    assert "must be a mapping" in error_of(write(tmp_path, "just a string\n"))


def test_empty_config_file_asks_for_data(tmp_path: Path) -> None:
    p = write(tmp_path, "# nothing yet\n")
    assert error_of(p).startswith(f"{p}: data: required key is missing")


def test_config_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "run.yaml"
    p.write_bytes(b"model: caf\xe9\ndata: {train: a}\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}: cannot read the config") and "UTF-8" in msg


@pytest.mark.parametrize("text", [FULL, "data: {train: a.jsonl}\nmethod: {name: freeze, train_modules: ['*.norm.*']}\n",
                                  "data: {train: a.jsonl}\nmethod: {name: full}\ntraining: {early_stopping: {patience: 2}}\n"])
def test_to_yaml_round_trips(tmp_path: Path, text: str) -> None:
    cfg = load_config(write(tmp_path, text))
    dumped = cfg.to_yaml()
    again = load_config(write(tmp_path, dumped, "again.yaml"))
    assert again == cfg
    assert again.to_yaml() == dumped
    assert isinstance(yaml.safe_load(dumped), dict)


def test_run_config_sections_forbid_unknown_attributes() -> None:
    cfg = RunConfig.model_validate({"data": {"train": "a"}})
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        cfg.training.batch_size = "many"


# ----------------------------------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_shipped_demo_yaml_is_the_demo_run() -> None:
    """configs/demo.yaml and `tunelab demo` describe the same run (only paths and output dir differ)."""
    from tunelab.demo import demo_config

    root = Path(__file__).resolve().parents[1]
    shipped = load_config(root / "configs" / "demo.yaml").model_dump()
    built = load_config(demo_config()).model_dump()
    for cfg in (shipped, built):
        cfg["data"]["train"] = Path(cfg["data"]["train"]).name
        cfg["data"]["validation"] = Path(cfg["data"]["validation"]).name
        cfg["data"]["test"] = Path(cfg["data"]["test"]).name
        cfg["output"] = None
    assert shipped == built
