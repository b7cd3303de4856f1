"""The `tunelab` command line: each verb loads its inputs and calls the library.

    tunelab demo                                   # the end-to-end demo (before/after exact match)
    tunelab train configs/lora-alpaca.yaml training.epochs=1
    tunelab train configs/lora-alpaca.yaml --resume
    tunelab generate runs/demo --prompt "..."
    tunelab chat runs/demo

User mistakes print one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tunelab.errors import TunelabError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="tunelab",
    help="Fine-tune pre-trained language models from one YAML file: data -> method -> training -> use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_debug = False


def _print_version(value: bool) -> None:
    if value:
        from tunelab import __version__

        out.print(f"tunelab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    global _debug
    _debug = debug


def _fail(exc: Exception) -> None:
    if _debug:
        raise exc
    err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command(epilog="Examples: tunelab train configs/demo.yaml | tunelab train configs/lora-alpaca.yaml training.max_steps=50 "
             "method.r=8 output.dir=runs/short | tunelab train configs/lora-alpaca.yaml --resume")
def train(
    config: Path = typer.Argument(..., help="Run config YAML (see configs/)."),
    overrides: list[str] | None = typer.Argument(None, help="key.sub=value overrides, e.g. training.epochs=1"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in output.dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Fine-tune a model as the YAML describes; writes the run directory (metrics, checkpoints, final model)."""
    from tunelab.config import load_config

    try:
        cfg = load_config(config, overrides)
        _quiet_libraries()
        from tunelab.train.loop import train as run_train

        run_train(cfg, resume=True if resume else None, quiet=quiet)
    except TunelabError as exc:
        _fail(exc)


@app.command(epilog='Example: tunelab generate runs/demo -p "Extract the ticket as JSON ..." -p "second prompt"')
def generate(
    target: str = typer.Argument(..., help="A run directory, an HF model dir, a .gguf file, a hub id, or 'default'."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="User message (repeat for several prompts)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens to generate per reply."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with temperature > 0)."),
    system: str | None = typer.Option(None, help="System message to prepend."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
) -> None:
    """Generate replies with the same chat template training used."""
    try:
        _check_sampling(max_new_tokens, temperature, top_p)
        _quiet_libraries()
        from tunelab.generate import generate as gen
        from tunelab.generate import load_for_inference

        model, tokenizer = load_for_inference(target)
        for reply in gen(model, tokenizer, list(prompt), max_new_tokens, temperature, top_p, system_prompt=system, seed=seed):
            out.print(reply, highlight=False, markup=False)
    except TunelabError as exc:
        _fail(exc)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise TunelabError(f"--max-new-tokens: must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise TunelabError(f"--temperature: must be >= 0 (got {temperature}); 0 means greedy")
    if not 0 < top_p <= 1:
        raise TunelabError(f"--top-p: must be in (0, 1] (got {top_p})")


@app.command()
def chat(
    target: str = typer.Argument(..., help="A run directory, an HF model dir, a .gguf file, a hub id, or 'default'."),
    max_new_tokens: int = typer.Option(256, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    system: str | None = typer.Option(None, help="System message for the conversation."),
) -> None:
    """Interactive chat in the terminal (/reset clears the history, /exit or Ctrl-D quits)."""
    try:
        _check_sampling(max_new_tokens, temperature, top_p)
        _quiet_libraries()
        from tunelab.generate import load_for_inference, stream_reply

        model, tokenizer = load_for_inference(target)
    except TunelabError as exc:
        _fail(exc)
        return
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    err.print("[dim]chat with the model; /reset clears history, /exit quits[/dim]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            err.print("[dim]history cleared[/dim]")
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        reply = stream_reply(model, tokenizer, history, max_new_tokens, temperature, top_p,
                             write=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


@app.command()
def demo(
    output: str = typer.Option("runs/demo", help="Run directory for the demo."),
    epochs: float = typer.Option(2, help="Epochs over the 320 training rows."),
    overwrite: bool = typer.Option(True, help="Replace an earlier demo run."),
) -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct on the ticket-extraction demo; print exact match before and after."""
    try:
        _quiet_libraries()
        from tunelab.demo import run_demo

        demo_run = run_demo(output, epochs, overwrite, log=lambda text: err.print(text, highlight=False))
    except TunelabError as exc:
        _fail(exc)
        return
    from rich.table import Table

    table = Table(title=f"Ticket extraction, {len(demo_run.rows)} held-out rows")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for key in ("exact_match", "valid_json", "product_acc", "category_acc", "urgency_acc", "order_id_acc"):
        table.add_row(key, f"{demo_run.before[key]:.1%}", f"{demo_run.after[key]:.1%}")
    out.print(table)
    example = demo_run.rows[0]["prompt"].splitlines()[-1]
    out.print(f"example: {example}\n  -> {demo_run.predictions[0]}", highlight=False, markup=False)
    out.print(f"train time {demo_run.summary['wall_time_s']:.0f}s; try: tunelab chat {demo_run.run_dir}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
