"""What a run leaves behind: metrics.jsonl, TensorBoard events, a loss-curve PNG and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path


def round_metric(x: float | None) -> float | None:
    """A loss or metric as run files store it: 6 decimals (None stays None)."""
    return None if x is None else round(x, 6)


class MetricsLog:
    """Append-only metrics.jsonl plus TensorBoard scalars. On resume, lines past the checkpoint are dropped.

    `trackers` (train/tracking.py: MLflow, W&B) are started here and get every record too.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, trackers=None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in self._lines() if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (held for the run, closed in close())
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is optional at run time
            pass
        self._trackers = trackers
        if trackers:
            trackers.start(run_dir, resumed=resume_step is not None)

    def _lines(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "eval_")) else key, value, record["step"])
        if self._trackers:
            self._trackers.log(record)

    def records(self) -> list[dict]:
        return self._lines()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_loss(records: list[dict], out: Path) -> None:
    """Train loss per step and eval loss at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color="#1f77b4", linewidth=0.8, alpha=0.35, label="train loss")
        width = max(5, len(values) // 20) | 1  # odd, so the moving average is centred on its step
        if len(values) >= 2 * width:  # the trend under batch-to-batch noise
            import numpy as np

            smooth = np.convolve(values, np.ones(width) / width, mode="valid")
            ax.plot(steps[width // 2 : width // 2 + len(smooth)], smooth, color="#1f77b4", linewidth=1.8,
                    label=f"train loss (mean of {width} steps)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728", linewidth=1.5, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
