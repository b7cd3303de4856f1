"""Hyperparameter search with Optuna: `tunelab tune run.yaml --trials N` (see study.py for the layout on disk)."""

from __future__ import annotations

from tunelab.tune.study import StudyReport, run_study, trials_table

__all__ = ["StudyReport", "run_study", "trials_table"]
