"""TPE against random search on the demo task: the same number of trials over the same space, for several sampler seeds.

    python bench/tune_compare.py                                          # 8 trials of 20 steps, seeds 0 1 2
    python bench/tune_compare.py --trials 6 --steps 8 --seeds 0 1 --val-rows 16   # a reduced run (see the README)

Both samplers search configs/tune-demo.yaml's space (learning rate, LoRA r, warmup) with the embedded SmolLM2-135M,
with the pruner off so that every trial costs the same and only the choice of points differs. The training seed stays
fixed; the sampler seed varies. Every study goes into a fresh temporary directory. Prints the best final validation loss
of each study, the mean per sampler, and the loss of the base config (no search) trained with the same budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="Trials per study.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per trial.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Sampler seeds.")
    parser.add_argument("--val-rows", type=int, default=40, help="Validation rows used (the demo has 40).")
    parser.add_argument("--startup", type=int, default=3, help="TPE: random trials before it models the space.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tune-compare-"))
    os.environ.setdefault("TUNELAB_DATA_CACHE", str(work / "cache"))
    from rich.console import Console
    from rich.table import Table

    from tunelab.cli import _quiet_libraries
    from tunelab.config import load_config
    from tunelab.train.loop import train
    from tunelab.tune import run_study

    _quiet_libraries()
    console = Console(stderr=True)
    val_rows = (REPO / "src/tunelab/demo/data/validation.jsonl").read_text().splitlines()[: args.val_rows]
    (work / "validation.jsonl").write_text("\n".join(val_rows) + "\n")

    def config(out: Path, **tune) -> dict:
        cfg = load_config(REPO / "configs" / "tune-demo.yaml").model_dump(mode="json", exclude_unset=True)
        cfg["data"]["train"] = str(REPO / cfg["data"]["train"])
        cfg["data"]["validation"] = str(work / "validation.jsonl")
        cfg["training"].update(max_steps=args.steps, eval_every=None)  # pruner off: one evaluation, at the end
        cfg["output"] = {"dir": str(out)}
        cfg["tune"] = {**cfg["tune"], "pruner": "none", "trials": args.trials, "startup_trials": args.startup, **tune}
        return cfg

    started = time.perf_counter()
    base = dict(config(work / "base"))
    base.pop("search"), base.pop("tune")
    baseline = train(load_config(base), quiet=True).summary["final_eval_loss"]
    console.print(f"base config (lr 2e-3, r 16, warmup 0.05), {args.steps} steps: final eval loss {baseline:.4f}")
    best: dict[str, list[float]] = {"tpe": [], "random": []}
    seconds: dict[str, float] = {"tpe": 0.0, "random": 0.0}
    for seed in args.seeds:
        for sampler in ("tpe", "random"):
            tick = time.perf_counter()
            cfg = load_config(config(work / f"{sampler}-{seed}", sampler=sampler, seed=seed))
            report = run_study(cfg, log=lambda text, s=sampler, d=seed: console.print(f"[dim]{s} seed {d}:[/dim] {text}", highlight=False))
            best[sampler].append(report.best.value)
            seconds[sampler] += time.perf_counter() - tick

    table = Table(title=f"best final eval loss after {args.trials} trials of {args.steps} steps "
                        f"({args.val_rows} validation rows, SmolLM2-135M, pruner off)")
    table.add_column("sampler seed", justify="right")
    table.add_column("TPE", justify="right")
    table.add_column("random", justify="right")
    for i, seed in enumerate(args.seeds):
        table.add_row(str(seed), f"{best['tpe'][i]:.4f}", f"{best['random'][i]:.4f}")
    table.add_row("mean", f"{statistics.mean(best['tpe']):.4f}", f"{statistics.mean(best['random']):.4f}")
    table.add_row("TPE better in", f"{sum(t < r for t, r in zip(best['tpe'], best['random']))} of {len(args.seeds)}", "")
    Console().print(table)
    print(f"base config without search: {baseline:.4f}; time TPE {seconds['tpe']:.0f} s, random {seconds['random']:.0f} s, "
          f"all {time.perf_counter() - started:.0f} s; studies in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
