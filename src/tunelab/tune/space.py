"""The search space: each `search:` entry becomes an Optuna suggestion, and --sampler grid gets the list of its values.

    search:
      training.learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3, grid: [1.0e-4, 1.0e-3]}
      method.r: {type: categorical, choices: [8, 16]}
      training.batch_size: {type: int, low: 4, high: 16, step: 4}

Parameters are named by their config path, so Optuna's tables, plots and optuna-dashboard show `method.r`.
Choices that are lists or mappings (e.g. target_modules) travel through Optuna as JSON strings.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.config import SearchParam


def _choices(values: list[Any]) -> tuple[list[Any], bool]:
    """Optuna takes None, bool, int, float and str choices; anything else goes as its JSON text."""
    if all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        return list(values), False
    return [json.dumps(v) for v in values], True


def grid_values(param: SearchParam) -> list[Any]:
    """The values --sampler grid tries (config validation already refused float ranges without grid:)."""
    if param.type == "categorical":
        return _choices(param.choices)[0]
    if param.grid is not None:
        return list(param.grid)
    return list(range(int(param.low), int(param.high) + 1, int(param.step or 1)))


def grid_space(search: dict[str, SearchParam]) -> dict[str, list[Any]]:
    return {path: grid_values(param) for path, param in search.items()}


def suggest(trial, path: str, param: SearchParam, grid: bool) -> Any:
    """Ask `trial` for the value of one parameter."""
    if param.type == "categorical":
        values, encoded = _choices(param.choices)
        value = trial.suggest_categorical(path, values)
        return json.loads(value) if encoded else value
    if grid and param.grid is not None:
        return trial.suggest_categorical(path, list(param.grid))
    if param.type == "int":
        return trial.suggest_int(path, int(param.low), int(param.high), step=int(param.step or 1), log=param.is_log)
    return trial.suggest_float(path, float(param.low), float(param.high), step=param.step, log=param.is_log)


def decode(path: str, value: Any, search: dict[str, SearchParam]) -> Any:
    """A value as Optuna stored it -> the config value (JSON-encoded choices back to lists)."""
    param = search.get(path)
    if param is not None and param.type == "categorical" and _choices(param.choices)[1] and isinstance(value, str):
        return json.loads(value)
    return value
