"""Progress display for training: a rich bar with loss, lr, tokens/s and ETA on a terminal, plain lines elsewhere."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total = total
        self.quiet = quiet
        self.console = Console(stderr=True, soft_wrap=True)
        self.live = self.console.is_terminal and not quiet
        self._every = max(1, total // 20)
        self._progress: Progress | None = None
        self._task = None

    def header(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[bold]tunelab train[/bold] {text}")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def __enter__(self) -> TrainProgress:  # noqa: PYI034
        if self.live:
            self._progress = Progress(
                TextColumn("[bold blue]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, stats="")
        return self

    def update(self, step: int, record: dict) -> None:
        stats = f"loss {record['train_loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if "eval_loss" in record:
            stats += f" eval {record['eval_loss']:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
            if "eval_loss" in record:
                self._progress.console.print(f"step {step}: eval loss {record['eval_loss']:.4f}")
        elif not self.quiet and (step % self._every == 0 or step == self.total or "eval_loss" in record):
            self.console.print(f"step {step}/{self.total} {stats}", highlight=False)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def footer(self, summary: dict, run_dir: Path) -> None:
        if self.quiet:
            return
        ev = summary.get("final_eval_loss")
        ppl = summary.get("eval_perplexity")
        ev_text = f", eval loss {ev:.4f}" + (f" (ppl {ppl:.2f})" if ppl is not None else "") if ev is not None else ""
        self.console.print(
            f"[green]done[/green] {summary['steps']} steps in {summary['wall_time_s']:.1f}s, "
            f"{summary['tokens_per_s']:.0f} tok/s, train loss {summary['final_train_loss']:.4f}{ev_text} -> {run_dir}"
        )
        if summary.get("method") != "reward":  # a reward model scores replies; it does not chat
            self.console.print(f"[dim]next: tunelab chat {run_dir}  |  tunelab generate {run_dir} -p \"...\"[/dim]", highlight=False)
