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
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..." on import

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
    nproc: int | None = typer.Option(
        None, "--nproc", help="Data-parallel processes on this machine (accelerate; gloo on a CPU, one GPU each on CUDA). "
        "The global batch stays training.batch_size: each process takes its share."),
    num_machines: int = typer.Option(1, "--num-machines", help="Machines in a multi-node run (start the same command on each)."),
    machine_rank: int = typer.Option(0, "--machine-rank", help="This machine's rank in a multi-node run (0 = the main one)."),
    main_process_ip: str | None = typer.Option(None, "--main-process-ip", help="Address of machine rank 0 (multi-node)."),
    main_process_port: int = typer.Option(0, "--main-process-port", help="Port on machine rank 0 (0 = a free port; multi-node needs a fixed one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the config (every stage of a staged run) and its data "
                                 "files, print the plan, train nothing."),
) -> None:
    """Fine-tune a model as the YAML describes; writes the run directory (metrics, checkpoints, final model).
    A config with `stages:` trains them in order, each from the previous stage's model."""
    from tunelab.config import load_config

    try:
        cfg = load_config(config, overrides)
        if cfg.stages is not None:
            from tunelab.train import stages

            if nproc is not None or num_machines > 1:
                raise TunelabError("--nproc: a staged run trains in one process; drop --nproc (or train one stage's config)")
            stages.check_files(cfg)
            if dry_run:
                for line in stages.describe_stages(cfg):
                    out.print(line, highlight=False, markup=False, soft_wrap=True)
                return
            _quiet_libraries()
            stages.run_stages(cfg, resume=True if resume else None, quiet=quiet)
            return
        if dry_run:
            from tunelab.train.stages import check_files

            check_files(cfg)
            data = cfg.data.tasks and ", ".join(t.name for t in cfg.data.tasks) or cfg.data.train
            out.print(f"{cfg.method.name} on {data} from {cfg.model} -> {cfg.output.dir}", highlight=False, markup=False,
                      soft_wrap=True)
            return
        _quiet_libraries()
        from tunelab.train import distributed

        if (nproc is not None or num_machines > 1) and distributed.world_size() == 1:
            from tunelab.train.loop import check_run

            nproc = 1 if nproc is None else nproc
            command = distributed.launch_command(
                config, list(overrides or []), nproc, resume=resume, quiet=quiet, device=cfg.training.device,
                num_machines=num_machines, machine_rank=machine_rank, main_process_ip=main_process_ip,
                main_process_port=main_process_port)
            if nproc * num_machines > 1:
                check_run(cfg, resume=True if resume else None)  # bad data or run dir: exit 2 here, not in N processes
                import subprocess

                raise typer.Exit(subprocess.call(command))
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


@app.command("eval", epilog="Examples: tunelab eval default --tasks arc_easy,hellaswag --limit 200 | tunelab eval runs/demo "
             "--benchmark my_mc.jsonl --prompt '{query}\\nAnswer:' --fewshot 5 --output results.json | tunelab eval runs/demo "
             "--data data/test.jsonl | tunelab eval runs/sst --data test.csv --classify")
def eval_(
    target: str | None = typer.Argument(None, help="A run directory, an HF model dir, a .gguf file, a hub id, or 'default'."),
    tasks: str | None = typer.Option(None, "--tasks", "-t", help="Comma-separated benchmark names (see --list)."),
    benchmark: list[str] | None = typer.Option(None, "--benchmark", "-b", help="A local benchmark file or benchmark YAML (repeatable)."),
    prompt: str | None = typer.Option(None, help="Prompt template for benchmark files, e.g. '{query}\\nAnswer:'."),
    fewshot: int | None = typer.Option(None, help="Few-shot examples per question."),
    limit: int | None = typer.Option(None, help="Score only the first N items of each task."),
    data: str | None = typer.Option(None, help="Rows in any tunelab format: generation metrics against the last assistant turn."),
    classify: bool = typer.Option(False, "--classify", help="Score --data as classification (labels = distinct responses)."),
    labels: str | None = typer.Option(None, help="Comma-separated label set for classification."),
    classify_by: str = typer.Option("loglik", help="loglik (score each label) or generate (match the reply)."),
    perplexity: str | None = typer.Option(None, help="Rows or text: loss and perplexity on their trained tokens."),
    max_new_tokens: int = typer.Option(256, help="Longest generated reply (generation tasks)."),
    temperature: float = typer.Option(0.0, help="Generation tasks: 0 = greedy; > 0 samples (seeded)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with temperature > 0)."),
    similarity: bool = typer.Option(False, "--similarity", help="Generation tasks: also MiniLM embedding similarity."),
    batch_size: int = typer.Option(16, help="Items per forward pass."),
    precision: str = typer.Option("fp32", help="fp32 (lm-eval's numbers) or bf16 (faster on CPUs with bf16)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the results as JSON here."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute even when this model, task and settings were scored before."),
    list_benchmarks: bool = typer.Option(False, "--list", help="List the named benchmarks and exit."),
) -> None:
    """Score a model: benchmarks by log-likelihood (acc, acc_norm), generation and classification metrics, perplexity."""
    try:
        _quiet_libraries()
        if list_benchmarks:
            from tunelab.evaluate.benchmarks import NAMED_BENCHMARKS

            for name in sorted(NAMED_BENCHMARKS):
                out.print(name, highlight=False)
            return
        from tunelab.evaluate.runner import EvalRequest, evaluate

        _check_sampling(max_new_tokens, temperature, top_p)
        if target is None:
            raise TunelabError("TARGET: give the model to score: a run directory, an HF model dir, a .gguf file or 'default'")
        if prompt is not None:  # typed in a shell, "\n" arrives as backslash + n
            prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
        names = [t.strip() for t in (tasks or "").split(",") if t.strip()] + list(benchmark or [])
        req = EvalRequest(target, names, prompt, fewshot, limit, data, classify, [x.strip() for x in labels.split(",")] if labels else None,
                          classify_by, perplexity, max_new_tokens, temperature, top_p, similarity, batch_size=batch_size,
                          precision=precision)
        results = evaluate(req, cache=not no_cache, log=lambda name, res: err.print(f"{name}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in res.items() if k in ("acc", "acc_norm", "mc2")), highlight=False))
    except TunelabError as exc:
        _fail(exc)
        return
    _print_eval(results)
    if output is not None:
        import json

        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        out.print(f"wrote {escape(str(output))}", highlight=False)


def _print_eval(results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"tunelab eval {escape(results['target'])}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for task, res in results["results"].items():
        for key, value in res.items():
            if isinstance(value, float) and key not in ("seconds",):
                table.add_row(escape(task), key, f"{value:.4f}", str(res.get("n", "")))
    out.print(table)


@app.command(epilog="Examples: tunelab report runs/demo | tunelab report runs/demo --forgetting arc_easy,piqa --forgetting-limit 200 "
             "--ood data/other_domain.jsonl | tunelab report runs/demo --forgetting none --limit 50")
def report(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    out_dir: Path | None = typer.Option(None, "--out", help="Where report.html and report.json go (default RUN_DIR/report)."),
    forgetting: str = typer.Option("arc_easy,hellaswag,piqa,boolq",
                                   help="Benchmarks (names or files) for the forgetting check, comma-separated; 'none' to skip."),
    forgetting_limit: int = typer.Option(100, help="Seeded sample of questions per forgetting benchmark."),
    fewshot: int = typer.Option(3, help="k of the k-shot prompting baseline (0: zero-shot only)."),
    samples: int = typer.Option(8, help="Side-by-side generations to show."),
    limit: int | None = typer.Option(None, help="Score only the first N held-out rows."),
    ood: str | None = typer.Option(None, help="An out-of-domain rows file, scored like the held-out split."),
    batch_size: int = typer.Option(16, help="Items per forward pass."),
    precision: str = typer.Option("fp32", help="fp32 or bf16."),
    max_new_tokens: int = typer.Option(256, help="Longest generated reply."),
    seed: int = typer.Option(1234, help="Seeds few-shot examples, benchmark samples and shown examples."),
) -> None:
    """The before/after report card: task metrics vs the base model (zero- and k-shot), forgetting, errors, samples."""
    try:
        _quiet_libraries()
        from tunelab.evaluate.report import build_report_card, write_report_card

        names = [] if forgetting.strip().lower() in ("", "none") else [b.strip() for b in forgetting.split(",") if b.strip()]
        card = build_report_card(run_dir, forgetting=names, forgetting_limit=forgetting_limit, fewshot=fewshot, samples=samples,
                                 limit=limit, ood=ood, batch_size=batch_size, precision=precision, max_new_tokens=max_new_tokens,
                                 seed=seed, log=lambda text: err.print(escape(text), highlight=False))
        json_path, html_path = write_report_card(card, out_dir or Path(run_dir) / "report")
    except TunelabError as exc:
        _fail(exc)
        return
    out.print(escape(card["verdict"]), highlight=False)
    out.print(f"wrote {escape(str(html_path))} and {escape(str(json_path))}", highlight=False)


# ----------------------------------------------------------------------------------------------------------------------
# tunelab data check | prepare | preview

data_app = typer.Typer(help="Validate, prepare and inspect training data before a step is spent.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _tokenizer_for(model: str):
    _quiet_libraries()
    from tunelab.models.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(model))


@data_app.command(epilog="Examples: tunelab data check raw/train.jsonl | tunelab data check raw/*.csv --format prompt_response "
                  "--max-length 1024 | tunelab data check configs/lora-alpaca.yaml --json > check.json")
def check(
    files: list[str] = typer.Argument(..., help="Data files or globs, or one run config YAML (checks every data file it names: "
                               "train/validation/test, each task's, each stage's, replay files)."),
    format: str | None = typer.Option(None, "--format", "-f", help="alpaca | prompt_response | messages | text (default: detect)."),
    model: str = typer.Option("default", help="Model whose tokenizer and chat template measure lengths ('none' to skip)."),
    max_length: int = typer.Option(512, help="Rows longer than this many tokens are reported."),
    label: str | None = typer.Option(None, help="Row field holding a class label (default: 'label' or short responses)."),
    near: float | None = typer.Option(None, help="Also report near-duplicates at this Jaccard similarity (e.g. 0.85)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate every row and list every problem (file:line: field: problem). Exit 0 when clean, 2 when not."""
    try:
        from tunelab.data.check import check_files
        from tunelab.data.formats import FORMATS

        groups = [(files, format, max_length, False)]  # (files, format, max_length, train_on_inputs) checked together
        if len(files) == 1 and files[0].endswith((".yaml", ".yml")):
            from tunelab.config import load_config
            from tunelab.train.stages import data_sections

            cfg = load_config(files[0])
            groups = []  # one check per data section: the run's, each task's, each stage's, the replay files
            for key, spec, fmt, data in data_sections(cfg):
                listed = [spec] if isinstance(spec, str) else list(spec)
                section = key.rsplit(".", 1)[0]
                if groups and groups[-1][0] == section:  # a file named twice (validation and test) is read once
                    groups[-1][1].extend(f for f in listed if f not in groups[-1][1])
                else:
                    groups.append((section, listed, format or fmt, data.max_length, data.train_on_inputs))
            groups = [g[1:] for g in groups]
            model = model if model != "default" else cfg.model
        if format is not None and format not in FORMATS:
            raise TunelabError(f"--format: unknown format '{format}'; choose one of {', '.join(FORMATS)}")
        if near is not None and not 0 < near <= 1:
            raise TunelabError(f"--near: a similarity between 0 and 1 (e.g. 0.85), got {near}")
        tokenizer = None if model.lower() == "none" else _tokenizer_for(model)
        reports = [check_files(*group[:2], tokenizer, *group[2:], label, near) for group in groups]
    except TunelabError as exc:
        _fail(exc)
        return
    if as_json:
        import json

        shown = reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports]
        sys.stdout.write(json.dumps(shown, indent=2, ensure_ascii=False) + "\n")
    else:
        for report in reports:
            _print_check(report)
    raise typer.Exit(0 if all(r.clean for r in reports) else 2)


def _print_check(report) -> None:
    from tunelab.data.check import label_balance_warning

    say = lambda text: out.print(text, highlight=False, soft_wrap=True)
    say(f"[bold]{escape(', '.join(report.files))}[/bold] (format {report.format or '?'}): "
        f"{report.rows_read:,} rows read, {report.rows_valid:,} valid")
    if report.problems:
        say(f"[red]x {len(report.problems)} invalid row(s) or file problem(s):[/red]")
        for p in report.problems:
            say(f"  {escape(p.text)}")
    if report.duplicates:
        say(f"[red]x {len(report.duplicates)} duplicate row(s) (remove them or set data.dedupe: true):[/red]")
        for row, kind, first in report.duplicates:
            say(f"  {escape(row)}: {kind} duplicate of {escape(first)}")
    if report.too_long:
        overs = [n for _, n in report.too_long]
        say(f"[yellow]! {len(overs)} row(s) longer than max_length {report.max_length} tokens, by {min(overs)} to {max(overs)} "
            "tokens; their responses will be cut (raise data.max_length to keep them):[/yellow]")
        say("  " + ", ".join(f"{escape(r)} (+{n})" for r, n in report.too_long))
    if report.mojibake:
        say(f"[yellow]! {len(report.mojibake)} row(s) look like mojibake (UTF-8 decoded as Latin-1 upstream); "
            "re-export the source as UTF-8:[/yellow]")
        say("  " + ", ".join(f"{escape(r)} ({escape(s)!r})" for r, s in report.mojibake))
    if report.labels:
        total = sum(report.labels.values())
        say(f"labels ({escape(report.label_field)}): "
            + ", ".join(f"{escape(k)} {v} ({v / total:.1%})" for k, v in report.labels.items()))
        warning = label_balance_warning(report.labels)
        if warning:
            say(f"[yellow]! {escape(warning)}[/yellow]")
    if report.clean:
        say("[green]clean[/green]")
    else:
        say(f"[red]not clean:[/red] {len(report.problems)} invalid, {len(report.duplicates)} duplicate(s)")


@data_app.command(epilog="Example: tunelab data prepare configs/prepare-alpaca.yaml | tunelab data prepare run.yaml data.pii=true "
                  "data.split.stratify=label")
def prepare(
    config: Path = typer.Argument(..., help="Run config YAML; the data: section says which steps run."),
    overrides: list[str] | None = typer.Argument(None, help="key.sub=value overrides, e.g. data.dedupe.near=true"),
) -> None:
    """Clean, anonymize, dedupe, split and augment as data: configures; write the splits and reports to <output.dir>/data.

    `tunelab train` runs the same steps with the same settings (cached, so the second time costs seconds)."""
    try:
        from tunelab.config import load_config

        cfg = load_config(config, overrides)
        if cfg.stages is not None:
            raise TunelabError("stages: `data prepare` prepares one run's data; `tunelab data check` checks every stage's "
                               "files and `tunelab train --dry-run` the whole plan")
        run_dir = Path(cfg.output.dir)
        if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
            raise TunelabError(f"output.dir: {run_dir} holds a trained run; prepare into a new output.dir so its record stays as it was")
        if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "data").is_dir() and not (run_dir / "config.yaml").exists():
            raise TunelabError(f"output.dir: {run_dir} is not empty and is not a tunelab run; choose a new or empty directory")
        _quiet_libraries()
        from tunelab.data.dataset import copy_prepared, prepare_data
        from tunelab.models.loading import load_tokenizer, resolve_model

        source = resolve_model(cfg.model)
        tokenizer = load_tokenizer(source)
        data = prepare_data(cfg.data, tokenizer, cfg.training.seed, base=source)
        copy_prepared(data, run_dir / "data")
    except TunelabError as exc:
        _fail(exc)
        return
    for name, part in (getattr(data, "parts", None) or {"": data}).items():  # data.tasks: each task's report
        if name:
            out.print(f"[bold]task {escape(name)}[/bold]", highlight=False)
        _print_prepared(part, run_dir / "data" / name if name else run_dir / "data")


def _print_prepared(data, where: Path) -> None:
    from rich.table import Table

    from tunelab.data.report import describe_step

    report = data.report
    table = Table(title=f"data prepare ({'cache hit, ' if data.cache_hit else ''}{data.seconds:.1f} s)")
    table.add_column("step")
    table.add_column("what it did")
    for step in report["steps"]:
        table.add_row(step["step"], escape(describe_step(step)))
    out.print(table)
    sizes = report["splits"]
    total = sum(sizes.values()) or 1
    out.print("splits: " + ", ".join(f"{k} {v} ({v / total:.1%})" for k, v in sizes.items()), highlight=False)
    if report["removed"]:
        out.print(f"removed {report['removed']} row(s): " + ", ".join(f"{k} {v}" for k, v in report["removed_by_step"].items())
                  + f" (each listed in {escape(str(where / 'removed_rows.jsonl'))})", highlight=False)
    for warning in report["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    out.print(f"wrote {escape(str(where))}/ (train/validation/test.jsonl, data_report.html, token_lengths.png)", highlight=False)


@data_app.command(epilog="Example: tunelab data preview configs/demo.yaml --n 2 | tunelab data preview run.yaml --split validation")
def preview(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: list[str] | None = typer.Argument(None, help="key.sub=value overrides."),
    n: int = typer.Option(3, "--n", "-n", help="How many examples to show."),
    split: str = typer.Option("train", help="train or validation."),
) -> None:
    """Show examples exactly as the model sees them: chat template applied, tokens that carry loss highlighted."""
    try:
        from tunelab.config import load_config

        cfg = load_config(config, overrides)
        if cfg.stages is not None:
            raise TunelabError("stages: preview one stage: its run config is <output.dir>/stages/<i>-<name>/config.yaml "
                               "once it starts, or copy the stage's data section into a plain config")
        if split not in ("train", "validation"):
            raise TunelabError(f"--split: choose train or validation (got '{split}')")
        if n < 1:
            raise TunelabError(f"--n: must be at least 1 (got {n})")
        _quiet_libraries()
        from tunelab.data.dataset import prepare_data
        from tunelab.models.loading import load_tokenizer, resolve_model

        source = resolve_model(cfg.model)
        tokenizer = load_tokenizer(source)
        data = prepare_data(cfg.data, tokenizer, cfg.training.seed, base=source)
    except TunelabError as exc:
        _fail(exc)
        return
    rows = data.train if split == "train" else data.validation
    if not data.labels:
        out.print("[bold green]green[/bold green] = tokens that carry loss, [dim]dim[/dim] = context only"
                  + (", [magenta]|next example|[/magenta] = packing boundary" if cfg.data.packing else ""), highlight=False)
    for i in range(min(n, len(rows))):
        enc = rows[i]
        if data.labels:  # a classification row: the text as the model reads it (special tokens included) and its class
            out.rule(f"label {data.labels[enc.labels[0]]!r}, {len(enc.input_ids)} tokens: {enc.source[-60:]}")
            out.print(escape(tokenizer.decode(enc.input_ids)), highlight=False)
        elif enc.rejected_ids is None:
            _print_example(enc, tokenizer)
        else:  # a preference pair: both conversations, each with its trained reply
            from tunelab.data.tokenize import Encoded

            _print_example(Encoded(enc.input_ids, enc.labels, enc.source, enc.truncated), tokenizer, "chosen")
            _print_example(Encoded(enc.rejected_ids, enc.rejected_labels, enc.source, enc.truncated), tokenizer, "rejected")


def _print_example(enc, tokenizer, side: str = "") -> None:
    from rich.text import Text

    from tunelab.data.tokenize import IGNORE

    out.rule(f"{enc.source[:80]}{f' {side}' if side else ''}  ({len(enc.input_ids)} tokens, {enc.n_trained} trained"
             f"{', truncated' if enc.truncated else ''})")
    text = Text()
    starts = {i for i, p in enumerate(enc.position_ids or []) if p == 0 and i > 0}
    run: list[int] = []
    trained = None
    for i, (tok, lab) in enumerate(zip(enc.input_ids, enc.labels)):
        state = lab != IGNORE
        if run and (state != trained or i in starts):
            text.append(tokenizer.decode(run), style="bold green" if trained else "dim")
            run = []
        if i in starts:
            text.append("|next example|", style="magenta")
        run.append(tok)
        trained = state
    if run:
        text.append(tokenizer.decode(run), style="bold green" if trained else "dim")
    out.print(text)


# ----------------------------------------------------------------------------------------------------------------------
# tunelab tune


@app.command(epilog="Examples: tunelab tune configs/tune-demo.yaml --trials 8 | tunelab tune run.yaml --trials 20 --sampler random "
             "--pruner hyperband | tunelab tune run.yaml --trials 10 --storage postgresql://user:pass@db/tunelab --study lr "
             "(the same line on each machine: the workers share the study) | optuna-dashboard sqlite:///runs/tune-demo/study.db")
def tune(
    config: Path = typer.Argument(..., help="Run config YAML with a search: section (see configs/tune-demo.yaml)."),
    overrides: list[str] | None = typer.Argument(None, help="key.sub=value overrides of the config, e.g. training.max_steps=20"),
    trials: int | None = typer.Option(None, "--trials", "-n", help="Trials this process runs (default tune.trials; 0 = report only)."),
    sampler: str | None = typer.Option(None, help="tpe | random | grid (default tune.sampler: tpe)."),
    pruner: str | None = typer.Option(None, help="median | hyperband | none (default tune.pruner: median)."),
    storage: str | None = typer.Option(None, help="Optuna RDB URL shared by workers (default sqlite:///<output.dir>/study.db)."),
    study: str | None = typer.Option(None, help="Study name in the storage (default: the name of output.dir)."),
    seed: int | None = typer.Option(None, help="Sampler seed (default tune.seed, else training.seed); trial n draws with (seed, n)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show each trial's training progress."),
) -> None:
    """Search hyperparameters with Optuna: each trial is a run under output.dir; prints the trials, writes best.yaml and plots."""
    import json

    from tunelab.config import load_config

    options = {"trials": trials, "sampler": sampler, "pruner": pruner, "storage": storage, "study": study, "seed": seed}
    try:
        cfg = load_config(config, list(overrides or []) + [f"tune.{k}={json.dumps(v)}" for k, v in options.items() if v is not None])
        _quiet_libraries()
        from tunelab.tune import run_study, trials_table

        report = run_study(cfg, verbose=verbose, log=lambda text: err.print(escape(text), highlight=False, soft_wrap=True))
    except TunelabError as exc:
        _fail(exc)
        return
    out.print(trials_table(report))
    if report.best is not None:
        params = ", ".join(f"{k}={v}" for k, v in report.best_params.items())
        out.print(f"best: trial {report.best.number}, {report.metric} {report.best.value:.6g} ({escape(params)})", highlight=False)
    for note in report.notes:
        out.print(f"[dim]{escape(note)}[/dim]", highlight=False)
    out.print("wrote " + ", ".join(escape(str(p)) for p in report.files), highlight=False)
    if report.best_yaml is not None:
        out.print(f"next: tunelab train {escape(str(report.best_yaml))}   |   optuna-dashboard {escape(report.storage)}", highlight=False)


# ----------------------------------------------------------------------------------------------------------------------
# tunelab serve | monitor | predict


@app.command("serve", epilog="Examples: tunelab serve runs/demo | tunelab serve default --port 8080 --api-key sk-local "
             "--rate-limit 60/min | tunelab serve runs/support --adapters legal=runs/legal --adapters hr=runs/hr --scrub-pii | "
             "then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='sk-local').chat.completions.create(model='demo', ...)")
def serve_cmd(
    target: str = typer.Argument(..., help="A run directory, an HF model dir, a .gguf file, a hub id, or 'default'."),
    adapters: list[str] | None = typer.Option(None, "--adapters", "-a", help="name=RUN_DIR: a LoRA run on the same base model, "
                                              "served as model 'name' (repeatable)."),
    name: str | None = typer.Option(None, help="TARGET's model name in the API (default: its directory or file name)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 = every interface: require an API key then)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TUNELAB_API_KEY",
                                       help="Accept this key as 'Authorization: Bearer KEY' (also $TUNELAB_API_KEY)."),
    api_keys_file: Path | None = typer.Option(None, help="Accept the keys in this file, one per line."),
    rate_limit: str | None = typer.Option(None, help="Requests per key (per address without keys), e.g. 60/min, 5/s; 429 above."),
    max_tokens_limit: int = typer.Option(2048, help="The most tokens one request may ask for; 400 above."),
    max_request_bytes: int = typer.Option(1_000_000, help="Largest request body in bytes; 413 above."),
    max_batch_size: int = typer.Option(16, help="Most sequences generated together in one batch."),
    batch_wait_ms: float = typer.Option(5.0, help="How long an idle server waits for more requests to batch with the first."),
    log_dir: Path = typer.Option(Path("serve_logs"), help="Every request and response is appended here as JSONL."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not log requests."),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="Replace e-mails, phone numbers, cards, IBANs, IPs in the log."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (faster on CPUs with native bf16)."),
    threads: int | None = typer.Option(None, help="CPU threads for generation (default: torch's; 1 leaves a core to the HTTP side)."),
) -> None:
    """Serve the model (and LoRA adapters) over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""
    try:
        from tunelab.serve import require_serve_dependencies

        require_serve_dependencies()
        for flag, value in (("--max-tokens-limit", max_tokens_limit), ("--max-request-bytes", max_request_bytes),
                            ("--max-batch-size", max_batch_size)):
            if value < 1:
                raise TunelabError(f"{flag}: must be at least 1 (got {value})")
        if not 0 < port < 65536:
            raise TunelabError(f"--port: a TCP port between 1 and 65535 (got {port})")
        if batch_wait_ms < 0:
            raise TunelabError(f"--batch-wait-ms: must be >= 0 (got {batch_wait_ms})")
        if threads is not None and threads < 1:
            raise TunelabError(f"--threads: must be at least 1 (got {threads})")
        from tunelab.serve.guards import load_api_keys, parse_rate_limit
        from tunelab.serve.models import parse_adapter_specs

        keys = load_api_keys([api_key] if api_key else [], api_keys_file)
        settings_kwargs = {"api_keys": keys, "rate_limit": parse_rate_limit(rate_limit), "max_tokens_limit": max_tokens_limit,
                           "max_body_bytes": max_request_bytes, "max_batch_rows": max_batch_size, "batch_wait_ms": batch_wait_ms,
                           "log_dir": None if no_log else log_dir, "scrub_pii": scrub_pii}
        specs = parse_adapter_specs(adapters)
        _quiet_libraries()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from tunelab.serve.app import ServeSettings, create_app, run_server
        from tunelab.serve.models import ServedModels

        models = ServedModels.load(target, specs, name=name, precision=precision)
        app_ = create_app(models, ServeSettings(**settings_kwargs))
    except TunelabError as exc:
        _fail(exc)
        return
    err.print(f"serving {escape(', '.join(models.names()))} at http://{host}:{port}/v1 "
              f"({'API key required' if keys else 'no API key'}; log: {escape(str(log_dir)) if not no_log else 'off'}"
              f"{', PII scrubbed' if scrub_pii and not no_log else ''}); Ctrl-C stops", highlight=False)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] listening on {escape(host)} without an API key: anyone who can reach it can use it",
                  highlight=False)
    run_server(app_, host=host, port=port)


@app.command("monitor", epilog="Examples: tunelab monitor serve_logs --reference data/train.jsonl | tunelab monitor serve_logs "
             "-r data/train.jsonl --last 500 --threshold 0.2 --json | tunelab monitor serve_logs --emit review.jsonl --last 200")
def monitor_cmd(
    logs: list[str] = typer.Argument(..., help="Request logs of tunelab serve: its --log-dir, or .jsonl files."),
    reference: list[str] | None = typer.Option(None, "--reference", "-r", help="The training data (files or globs, any tunelab format)."),
    format: str | None = typer.Option(None, "--format", "-f", help="Format of the reference data (default: detect)."),
    threshold: float = typer.Option(0.3, help="Drift score (0..1) at which a signal counts as drifted."),
    alpha: float = typer.Option(0.01, help="...and only when its p-value is below this."),
    last: int | None = typer.Option(None, help="Only the most recent N logged requests."),
    model: str | None = typer.Option(None, help="Only requests to this model name."),
    min_requests: int = typer.Option(20, help="Fewer distinct logged prompts than this: no verdict."),
    no_embeddings: bool = typer.Option(False, "--no-embeddings", help="Skip the MiniLM embedding signal (faster)."),
    emit: Path | None = typer.Option(None, help="Write the requests with the model's replies here as a 'messages' JSONL dataset."),
    as_json: bool = typer.Option(False, "--json", help="Print the drift report as JSON."),
) -> None:
    """Input drift of served requests vs the training data (length, vocabulary, embeddings); exit 1 when it says retrain."""
    try:
        if not reference and emit is None:
            raise TunelabError("--reference: give the training data to compare with (or --emit FILE to only export the requests)")
        if last is not None and last < 1:
            raise TunelabError(f"--last: must be at least 1 (got {last})")
        from tunelab.serve.monitor import check_drift, emit_dataset, read_request_log

        notes: list[str] = []
        requests = read_request_log(logs, model=model, last=last, notes=notes)
        report = None
        if reference:
            _quiet_libraries()
            report = check_drift(requests, reference, threshold, alpha, format, embeddings=not no_embeddings,
                                 min_requests=min_requests, notes=notes)
        emitted = emit_dataset(requests, emit) if emit is not None else None
    except TunelabError as exc:
        _fail(exc)
        return
    if report is not None and as_json:
        import json

        sys.stdout.write(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    elif report is not None:
        _print_drift(report)
    if emitted is not None:
        out.print(f"wrote {emitted[0]} request(s) to {escape(str(emit))} as 'messages' rows for review"
                  + (f" ({emitted[1]} left out: not valid training rows)" if emitted[1] else ""), highlight=False)
    raise typer.Exit(1 if report is not None and report.verdict == "retrain" else 0)


def _print_drift(report) -> None:
    from rich.table import Table

    table = Table(title=f"input drift: {report.requests} distinct logged prompts vs {report.reference} training prompts")
    for column in ("signal", "score", "p-value", "drifted", "detail"):
        table.add_column(column, justify="right" if column in ("score", "p-value") else "left")
    for s in report.signals:
        detail = s.note or ", ".join(f"{k} {v}" for k, v in s.detail.items())
        table.add_row(s.name, "-" if s.score is None else f"{s.score:.3f}", "-" if s.p_value is None else f"{s.p_value:.2g}",
                      "[red]yes[/red]" if s.drifted else "no", escape(detail))
    if report.signals:
        out.print(table)
    for note in report.notes:
        out.print(f"[dim]{escape(note)}[/dim]", highlight=False)
    out.print(("[red]" if report.verdict == "retrain" else "[green]") + escape(report.message)
              + ("[/red]" if report.verdict == "retrain" else "[/green]"), highlight=False, soft_wrap=True)


@app.command("predict", epilog="Examples: tunelab predict runs/demo --input data/test.jsonl --output preds.jsonl | tunelab "
             "predict default -i prompts.csv -o out.jsonl --batch-size 16 --max-new-tokens 64 (re-run the same line to resume)")
def predict_cmd(
    target: str = typer.Argument(..., help="A run directory, an HF model dir, a .gguf file, a hub id, or 'default'."),
    inputs: list[str] = typer.Option(..., "--input", "-i", help="Rows in any tunelab format (files or globs); the response may be missing."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL: each input row plus 'prediction'; appended, resumed on re-run."),
    batch_size: int = typer.Option(8, help="Rows per generation batch (and per flush to the output)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens to generate per row."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples (seeded per batch)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    format: str | None = typer.Option(None, "--format", "-f", help="alpaca | prompt_response | messages | text (default: detect)."),
    system: str | None = typer.Option(None, help="System message for rows that have none."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: int | None = typer.Option(None, help="CPU threads for generation (default: torch's; 1 is faster on a busy machine)."),
) -> None:
    """Batch inference over a dataset with a progress bar; re-running skips the rows already in the output."""
    try:
        _check_sampling(max_new_tokens, temperature, top_p)
        if threads is not None and threads < 1:
            raise TunelabError(f"--threads: must be at least 1 (got {threads})")
        _quiet_libraries()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from tunelab.serve.predict import predict as run_predict

        summary = run_predict(target, list(inputs), output, batch_size, max_new_tokens, temperature, top_p, seed, format, system,
                              quiet=quiet, log=lambda text: err.print(escape(text), highlight=False))
    except TunelabError as exc:
        _fail(exc)
        return
    out.print(f"wrote {summary.predicted} prediction(s) to {escape(str(summary.output))} in {summary.seconds:.1f} s"
              + (f" ({summary.skipped} already there)" if summary.skipped else ""), highlight=False)


@app.command("export", epilog="Examples: tunelab export runs/demo --to exported/demo --merge | tunelab export runs/demo --to "
             "exported/demo --onnx --quantize int8 | tunelab export runs/demo --to exported/demo --merge --gguf --prune 0.3 "
             "--overwrite | then: AutoModelForCausalLM.from_pretrained('exported/demo/merged'), or llama.cpp -m "
             "exported/demo/gguf/model-f16.gguf")
def export_cmd(
    target: str = typer.Argument(..., help="A finished run directory (adapter or full weights), or an HF model directory."),
    to: Path = typer.Option(..., "--to", help="Output directory; must be new or empty unless --overwrite."),
    merge: bool = typer.Option(False, "--merge", help="Plain HF model (adapter merged into the base) in DIR/merged (default)."),
    onnx: bool = typer.Option(False, "--onnx", help="ONNX graph for onnxruntime in DIR/onnx (needs onnx, onnxscript and "
                              "onnxruntime)."),
    quantize: str | None = typer.Option(None, "--quantize", help="int8: 8-bit weights of the ONNX graph (onnxruntime "
                                        "MatMulNBits; implies --onnx); int8-dynamic: 8-bit weights and activations "
                                        "(onnxruntime dynamic quantization); nf4: bitsandbytes 4-bit HF model."),
    prune: float | None = typer.Option(None, "--prune", help="Zero this fraction of every Linear weight by magnitude, e.g. 0.3."),
    gguf: bool = typer.Option(False, "--gguf", help="One .gguf file for llama.cpp / Ollama (llama-architecture models)."),
    gguf_dtype: str = typer.Option("f16", "--gguf-dtype", help="GGUF tensor type: f16 or f32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty DIR."),
) -> None:
    """Export a run: merged HF model, ONNX, int8/NF4 quantized, pruned, GGUF; each checked against the run's model."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..." on every import
    try:
        from tunelab.export import ExportOptions, export_run

        options = ExportOptions(merge=merge, onnx=onnx, quantize=quantize, prune=prune, gguf=gguf, gguf_dtype=gguf_dtype,
                                overwrite=overwrite)
        options.validate()
        _quiet_libraries()
        result = export_run(target, to, options, log=lambda text: err.print(f"[dim]{escape(text)}[/dim]", highlight=False))
    except TunelabError as exc:
        _fail(exc)
        return
    _print_export(result)


def _print_export(result) -> None:
    from rich.table import Table

    report = result.report
    src = report["source"]
    table = Table(title=f"tunelab export -> {escape(str(result.out_dir))}")
    for column in ("format", "path", "MB", "max |Δlogit|", "ms/fwd", "eval loss", "Δ loss"):
        table.add_column(column, justify="left" if column in ("format", "path") else "right", no_wrap=column != "path",
                         overflow="fold")
    table.add_row("source", f"({src['kind']})", f"{src['size_mb']:.1f}", "-", f"{src['ms_per_forward']:.1f}",
                  _loss_cell(src["eval_loss"]), "")
    checks = []
    for a in report["artifacts"]:
        table.add_row(a["format"], escape(a["path"]), f"{a['size_mb']:.1f}", f"{a['max_abs_logit_diff']:.1e}",
                      f"{a['ms_per_forward']:.1f}", _loss_cell(a["eval_loss"]),
                      "-" if a["eval_loss_change"] is None else f"{a['eval_loss_change']:+.4f}")
        found = [f"greedy replies {a['greedy_tokens_match']} identical" if "greedy_tokens_match" in a else "",
                 f"top-1 token agreement {a['top1_agreement']:.1%}" if not a["lossless"] else "",
                 f"Linear sparsity {a['linear_sparsity']:.1%}" if "linear_sparsity" in a else "",
                 ("tokenizer ids match" if a["tokenizer_ids_match"] else "[red]tokenizer ids differ[/red]")
                 if "tokenizer_ids_match" in a else ""]
        checks.append(f"  {a['format']}: " + ", ".join(c for c in found if c))
    out.print(table)
    out.print("\n".join(checks), highlight=False, soft_wrap=True)
    out.print(f"[dim]parity: {len(report['parity']['prompts'])} chat-template prompts vs the source; speed: batch "
              f"{'x'.join(map(str, report['speed']['batch']))}; eval loss: {report['validation']['examples']} examples from "
              f"{escape(report['validation']['source'])}[/dim]", highlight=False, soft_wrap=True)
    for warning in report["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    out.print(f"wrote {escape(str(result.out_dir / 'export_report.json'))}", highlight=False, soft_wrap=True)


def _loss_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
