"""The training loop, top to bottom: setup -> (resume) -> fit -> save.

    from tunelab import load_config, train
    result = train(load_config("configs/demo.yaml"))

Every input a user controls is validated before the run directory is created, so a bad row or key leaves nothing
behind. The loop is deterministic for a seed: the example order of each epoch depends only on (seed, epoch), and a
checkpoint stores every RNG state and the loop position, so a resumed run repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from tunelab.config import RunConfig
from tunelab.data.dataset import (
    PreparedData,
    batches_of,
    budget_chunks,
    copy_prepared,
    epoch_order,
    length_grouped_batches,
    micro_batches,
    prepare_data,
    token_budget_batches,
)
from tunelab.data.mixture import with_replay
from tunelab.data.tokenize import Encoded
from tunelab.errors import TunelabError
from tunelab.methods import attach_method, build_objective, classification, count_parameters, method_load_kwargs
from tunelab.methods.freeze import gradual_unfreezing
from tunelab.models.loading import ModelSource, load_model, load_tokenizer, resolve_model
from tunelab.train.attention import NAME as ATTENTION_NAME
from tunelab.train.attention import restore_attention, use_short_attention
from tunelab.train.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    rng_state,
    save_checkpoint,
    trainable_state,
)
from tunelab.train.distributed import LossModule, init_distributed
from tunelab.train.lora_fused import restore_lora, use_fused_lora
from tunelab.train.loss import SharedPrefix, causal_lm_loss
from tunelab.train.memory import CPU_MICRO_BATCH_TOKENS, available_memory, plan_memory, return_freed_memory
from tunelab.train.objective import Objective, check_data_format
from tunelab.train.parallel import Workers, backward_in_threads, split_step, step_threads
from tunelab.train.penalty import build_penalty
from tunelab.train.precision import autocast, pick_device, pick_precision, share_input_casts, store_frozen_in
from tunelab.train.progress import TrainProgress
from tunelab.train.run_dir import MetricsLog, plot_loss, round_metric, write_json_atomic
from tunelab.train.schedule import build_scheduler, layer_lr_scales
from tunelab.train.tracking import Trackers, open_trackers


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_loss(model, examples: list[Encoded], batch_size: int, pad_id: int, device, dtype,
                  objective: Objective | None = None) -> float:
    """Mean loss per unit over examples (per trained token for the causal LM loss; batched by length so padding is
    small)."""
    total, count = loss_totals(model, examples, batch_size, pad_id, device, dtype, objective)
    return total / max(count, 1)


@torch.no_grad()
def loss_totals(model, examples: list[Encoded], batch_size: int, pad_id: int, device, dtype,
                objective: Objective | None = None, stats: dict[str, float] | None = None,
                workers: Workers | None = None) -> tuple[float, int]:
    """(summed loss, units: trained tokens or pairs) over examples; the objective's metric sums go into `stats`.

    Batches hold examples of similar length, at most `batch_size` of them; on a CPU also at most ~512 padded tokens,
    since bigger activations fall out of the cache there (16 rows at a time ran slower than one row at a time)."""
    objective = objective or Objective()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # the tokens every row starts with (a chat template's system prompt) run once, not once per row (loss.SharedPrefix)
    with autocast(device, dtype):
        prefix = SharedPrefix.find(model, examples, device) if type(objective) is Objective else None
    if prefix is not None:
        examples = [prefix.strip(e) for e in examples]
    lengths = [e.batch_tokens for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    if device.type == "cpu":
        chunks = budget_chunks(order, lengths, CPU_MICRO_BATCH_TOKENS, batch_size)
    else:
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    threads = torch.get_num_threads() if device.type == "cpu" and objective.thread_safe else 1
    threads = min(threads, workers.threads) if workers is not None else threads

    # One autocast region for all of a thread's batches: autocast keeps its bf16 copy of each fp32 weight that requires
    # grad for the region, so such weights are cast once per evaluation instead of once per batch. Those copies (one set
    # per thread) must fit easily, else each batch gets its own region.
    copies = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dtype == torch.float32) * 2 * threads
    one_region = dtype is not None and copies < available_memory(device) // 4

    def score(_thread: int, queue: Iterator[int]) -> dict[int, tuple[float, int, dict[str, float]]]:
        out = {}
        with autocast(device, dtype) if one_region else contextlib.nullcontext():
            for c in queue:
                batch = {k: v.to(device) for k, v in objective.collate([examples[i] for i in chunks[c]], pad_id).items()}
                sums: dict[str, float] = {}
                with contextlib.nullcontext() if one_region else autocast(device, dtype):
                    if prefix is not None:
                        loss, n = causal_lm_loss(model, batch, prefix)
                    else:
                        loss, n = objective.loss(model, batch, sums if stats is not None else None)
                out[c] = (float(loss), n, sums)
        return out

    # On a CPU the batches run side by side, one core each (train/parallel.py), each thread taking the next batch,
    # longest first, as it finishes one; summed in batch order either way.
    scored: dict[int, tuple[float, int, dict[str, float]]] = {}
    with contextlib.nullcontext(workers) if workers is not None else Workers(threads) as pool:
        for part in pool.share(score, range(len(chunks)), threads):
            scored.update(part)
    for c in range(len(chunks)):
        loss, n, sums = scored[c]
        total, count = total + loss, count + n
        for key, value in sums.items():
            stats[key] = stats.get(key, 0.0) + value
    model.train(was_training)
    return total, count


# ----------------------------------------------------------------------------------------------------------------------
# Setup


def check_run(cfg: RunConfig, resume: bool | str | None = None) -> None:
    """Everything `train` checks before writing (model, data, run directory), without writing the run directory:
    a launcher runs it once before starting several processes. Prepared data lands in the cache the processes read.

    Raises:
        TunelabError: as `train` would.
    """
    source = resolve_model(cfg.model)
    method_load_kwargs(cfg.method, source, pick_device(cfg.training.device))
    open_trackers(cfg)
    tokenizer = load_tokenizer(source)
    data = with_replay(prepare_data(cfg.data, tokenizer, cfg.training.seed, base=source), cfg, tokenizer, cfg.training.seed, source)
    check_data_format(cfg.method, data.format)
    _prepare_run_dir(cfg, cfg.resume if resume is None else resume, dry_run=True)


def _prepare_run_dir(cfg: RunConfig, resume: bool | str, dry_run: bool = False) -> tuple[Path, Path | None]:
    """Decide between a fresh run and a resume; never clobber a finished run or a directory tunelab did not make."""
    run_dir = Path(cfg.output.dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if resume:
        if checkpoints:
            return run_dir, checkpoints[-1]
        if resume is True:
            raise TunelabError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; run without --resume to start fresh")
    if run_dir.exists() and any(run_dir.iterdir()):
        if {p.name for p in run_dir.iterdir()} == {"data"} and any(run_dir.glob("data/**/data_report.json")):
            return run_dir, None  # only `tunelab data prepare` output: train writes the same files again
        if not (run_dir / "config.yaml").is_file():
            raise TunelabError(f"output.dir: {run_dir} is not empty and is not a tunelab run; choose a new or empty directory")
        # A run killed before its first checkpoint has nothing to resume or keep; anything more needs consent.
        started_only = not checkpoints and not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()
        if not (cfg.output.overwrite or started_only):
            raise TunelabError(
                f"output.dir: {run_dir} already holds a run; pass --resume to continue it, "
                "output.overwrite=true to replace it, or choose another output.dir"
            )
        if not dry_run:
            shutil.rmtree(run_dir)
    return run_dir, None


def _optimizer(model, cfg, optim: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: a decayed and a not-decayed group (biases, norms) per learning rate, one
    learning rate unless training.layer_lr_decay gives each block its own (the schedule scales every group alike)."""
    scales = layer_lr_scales(model, cfg.layer_lr_decay) if cfg.layer_lr_decay is not None else {}
    by_scale: dict[float, tuple[list, list]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay, no_decay = by_scale.setdefault(scales.get(id(p), 1.0), ([], []))
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [group for scale, (decay, no_decay) in sorted(by_scale.items(), key=lambda kv: -kv[0])
              for group in ({"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate * scale},
                            {"params": no_decay, "weight_decay": 0.0, "lr": cfg.learning_rate * scale})]
    groups = groups or [{"params": [], "weight_decay": cfg.weight_decay}, {"params": [], "weight_decay": 0.0}]
    if optim in ("adamw_8bit", "paged_adamw_8bit"):  # qlora's optim: bitsandbytes' 8-bit states (paging is CUDA-only)
        import bitsandbytes as bnb

        adamw_8bit = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return adamw_8bit(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), **fused)


def epoch_batches(n: int, lengths: list[int], cfg, epoch: int) -> list[list[int]]:
    """The batches (example indices) of one epoch, in training order."""
    if cfg.max_tokens_per_batch:
        return token_budget_batches(lengths, cfg.max_tokens_per_batch, cfg.seed, epoch)
    order = epoch_order(n, cfg.seed, epoch)
    if cfg.group_by_length:
        return length_grouped_batches(order, lengths, cfg.batch_size, cfg.seed, epoch)
    return batches_of(order, cfg.batch_size)


def plan_steps(data: PreparedData, cfg) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    if getattr(data, "mixture", None) is not None:
        n_batches = data.mixture.batches_per_epoch(cfg.batch_size)
    elif cfg.max_tokens_per_batch:
        n_batches = len(token_budget_batches(train_lengths(data), cfg.max_tokens_per_batch, cfg.seed, 0))
    else:
        n_batches = math.ceil(len(data.train) / cfg.batch_size)
    per_epoch = math.ceil(n_batches / cfg.gradient_accumulation)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return per_epoch, total


def train_lengths(data: PreparedData) -> list[int]:
    """Padded tokens of each training example in a batch (a preference pair counts both of its rows)."""
    return data.train.lengths() if hasattr(data.train, "lengths") else [e.batch_tokens for e in data.train]


def save_model(model, tokenizer, out: Path) -> None:
    """Final weights (adapter for LoRA, full model otherwise) with the tokenizer and chat template, atomically."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    classification.save_labels(model, tmp)  # a classifier's class names (a PEFT adapter has no config.json for them)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def train(cfg: RunConfig, resume: bool | str | None = None, quiet: bool = False,
          on_eval: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.method`; write the run directory; return its summary.

    `on_eval(step, eval_loss)` is called after each in-training evaluation but the last (tune's pruner); an exception
    it raises stops the run, leaving metrics.jsonl and no summary.json.

    Raises:
        TunelabError: bad data row, unknown model, impossible method/model pair, existing run directory, tracking.
    """
    t = cfg.training
    resume = cfg.resume if resume is None else resume
    seed_everything(t.seed)
    return_freed_memory()

    # 1. Everything a user can get wrong, checked before anything is written.
    source: ModelSource = resolve_model(cfg.model)
    device = pick_device(t.device)
    dist = init_distributed(device, t.distributed)  # one process unless a launcher started several (--nproc)
    if dist.active and device.type == "cuda":
        device = dist.accelerator.device
    load_kwargs = method_load_kwargs(cfg.method, source, device)  # e.g. qlora's 4-bit quantization; checks the method fits
    quiet = quiet or not dist.main
    # MLflow / W&B: a missing library or unusable tracking URI fails here; only rank 0 reports.
    trackers = open_trackers(cfg) if dist.main else Trackers({})
    tokenizer = load_tokenizer(source)
    data = dist.main_first(lambda: with_replay(prepare_data(cfg.data, tokenizer, t.seed, base=source), cfg, tokenizer, t.seed,
                                               source))  # one cache write; data.tasks and replay: mixed batches
    check_data_format(cfg.method, data.format)
    dtype = pick_precision(t.precision, device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    run_dir, checkpoint = dist.on_main(lambda: _prepare_run_dir(cfg, resume))
    if cfg.task == "classification":  # a classification head with one output per training label
        load_kwargs = {**load_kwargs, **classification.load_kwargs(data.labels, tokenizer)}
    model = load_model(source, **load_kwargs)
    model.config.use_cache = False
    torch.manual_seed(t.seed)  # method init (LoRA A matrices) is seeded independently of loading
    model = attach_method(model, cfg.method, cfg.task).to(device)
    # attention as blocked matmuls on a CPU (train/attention.py); the model leaves train() with its own again
    attention = use_short_attention(model) if device.type == "cpu" else None
    if dist.active:
        torch.manual_seed(t.seed + dist.rank)  # dropout masks differ between ranks
    if dtype is not None and hasattr(model, "peft_config"):
        store_frozen_in(model, dtype)
    if dtype is not None:
        share_input_casts(model, dtype)
    fused = use_fused_lora(model)  # plain LoRA layers as one autograd node each (train/lora_fused.py); undone at the end
    objective = build_objective(cfg.method, model, tokenizer, dtype, cfg.task)  # what a step optimizes; before any weight moves
    lengths = train_lengths(data)
    threads = step_threads(t.micro_batch_threads, device, model, objective.thread_safe, dist.world)
    workers = Workers(threads)  # pool threads for the whole run (training steps and evaluation)
    micro_tokens, checkpointing, memory_plan = plan_memory(
        t.micro_batch_tokens, t.gradient_checkpointing if getattr(cfg.method, "supports_gradient_checkpointing", True) else False,
        model.config, dtype, device, max(lengths, default=1), threads=threads)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # a prefix every row of a step shares runs once per step (loss.SharedPrefix, which also refuses a checkpointed
    # decoder): one process (DDP's hooks expect one backward pass per forward), no fp16 loss scaling, the plain loss
    share_prefix = t.share_prefix and type(objective) is Objective and not dist.active and dtype != torch.float16
    model.train()

    # 2. Optimizer, schedule, plan.
    per_epoch, total_steps = plan_steps(data, t)
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    optimizer = _optimizer(model, t, getattr(cfg.method, "optim", "adamw"))
    # continual.penalty (l2sp/ewc): anchored at the starting weights, before a resumed checkpoint loads over them
    penalty = build_penalty(cfg, model, objective, data.train, tokenizer, tokenizer.pad_token_id, device, dtype, t.seed)
    unfreezing = gradual_unfreezing(model, cfg.method)  # freeze with unfreeze_every: blocks join the training over time
    if unfreezing is not None:
        unfreezing.apply(0, 0)  # the optimizer holds every block; the checkpoint to resume holds at least these
    step_model = LossModule(model, objective.loss)
    if dist.active:  # DDP (or FSDP/DeepSpeed) wraps the loss so that its hooks see every trainable parameter
        if t.distributed.strategy == "ddp":
            step_model = dist.accelerator.prepare(step_model)
        else:
            step_model, optimizer = dist.accelerator.prepare(step_model, optimizer)
    scheduler = build_scheduler(optimizer, total_steps, warmup, t.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # loss scaling for fp16 only
    pad_id = tokenizer.pad_token_id

    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        copy_prepared(data, run_dir / "data", splits=bool(cfg.data.pipeline_steps) or data.report.get("removed", 0) > 0)
        clean_partial(run_dir / "checkpoints")
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval": None, "bad_evals": 0, "tokens": 0, "trained_tokens": 0, "elapsed": 0.0}
    best: dict | None = None
    if checkpoint is not None:
        state, best = load_checkpoint(checkpoint, model, optimizer, scheduler, rank=dist.rank, world=dist.world)
    log = (MetricsLog(run_dir, resume_step=state["step"] if checkpoint is not None else None, trackers=trackers)
           if dist.main else _NoLog())
    trainable, total_params = count_parameters(model)
    progress = TrainProgress(total_steps, quiet=quiet)
    progress.header(
        f"{cfg.method.name} on {source.spec} ({trainable:,} of {total_params:,} params trainable) | "
        f"{data.train_examples} train"
        + (f" (packed into {len(data.train)} rows)" if cfg.data.packing else "")
        + f" / {len(data.validation)} eval examples | {total_steps} steps | "
        f"{device.type} {precision} | {memory_plan}"
        + (f" | {dist.world} processes ({t.distributed.strategy})" if dist.active else "")
        + (f" | resumed at step {state['step']}" if checkpoint is not None else "")
    )
    progress.note(f"data: {'cache hit' if data.cache_hit else 'prepared'} in {data.seconds:.1f} s -> {run_dir / 'data'}")
    for warning in data.warnings:
        progress.note(f"[yellow]warning:[/yellow] {escape(warning)}")

    def evaluate() -> dict[str, float] | None:
        """{"eval_loss": mean loss per unit, "eval_<stat>": the objective's metrics per unit}, or None without data."""
        if not data.validation:
            return None
        names = objective.metric_names  # fixed, so that ranks without validation rows sum the same values
        stats = dict.fromkeys(names, 0.0)
        total, count, per_task = 0.0, 0, {}
        for task, part in (getattr(data, "eval_parts", None) or {"": data.validation}).items():  # data.tasks: each task
            examples = dist.shard(list(part)) if dist.active else part
            part_total, part_count = loss_totals(model, examples, t.batch_size, pad_id, device, dtype, objective, stats,
                                                  workers if workers.threads > 1 else None)
            if dist.active:
                part_total, part_count = dist.sum(part_total, part_count)
            total, count = total + part_total, count + int(part_count)
            if task:
                per_task[f"eval_loss/{task}"] = part_total / max(part_count, 1)
        if dist.active and names:
            stats = dict(zip(names, dist.sum(*(stats[k] for k in names))))
        return {"eval_loss": total / max(count, 1), **per_task,
                **{f"eval_{k}": v for k, v in objective.eval_metrics(stats, count).items()}}

    def checkpoint_now() -> None:
        rngs = dist.gather(rng_state()) if dist.active else None  # every rank's dropout stream, for an exact resume
        if dist.main:
            save_checkpoint(run_dir / "checkpoints", state["step"], model, optimizer, scheduler, state, t.keep_last, best,
                            rng_ranks=rngs)

    if t.eval_at_start and checkpoint is None and data.validation:
        metrics = evaluate()
        state["initial_eval"] = metrics["eval_loss"]
        log.log({"step": 0, **{k: round(v, 6) for k, v in metrics.items()}})
        progress.note(f"eval loss before training: {state['initial_eval']:.4f}")

    step_delay = float(os.environ.get("TUNELAB_STEP_DELAY", "0") or 0)  # crash-recovery tests kill a slowed run
    started = time.perf_counter() - state["elapsed"]
    last_train_loss = None
    stop = state["step"] >= total_steps
    # 3. Fit.
    with progress:
        while not stop:
            batches_now = (data.mixture.epoch_batches(t.batch_size, t.seed, state["epoch"]) if getattr(data, "mixture", None)
                           else epoch_batches(len(data.train), lengths, t, state["epoch"]))
            steps = [batches_now[i : i + t.gradient_accumulation] for i in range(0, len(batches_now), t.gradient_accumulation)]
            for step_batches in steps[state["step_in_epoch"] :]:
                tick = time.perf_counter()
                if unfreezing is not None:
                    unfreezing.apply(state["step"], state["epoch"])
                # With several processes each takes every world-th example of each batch; a rank left without any
                # (a batch smaller than the group) still runs one example at weight 0 to join the gradient all-reduce.
                mine = [part for part in (dist.shard(b) for b in step_batches) if part]
                idle = not mine
                rows = [i for b in mine for i in b]
                # the tokens all the step's rows start with (a chat template's system prompt) run once (loss.SharedPrefix)
                prefix = None
                if share_prefix:
                    with autocast(device, dtype):
                        prefix = SharedPrefix.find(model, [data.train[i] for i in rows], device, train=True)
                if threads > 1 and not idle:  # the step's rows dealt to the threads, then cut into micro-batches
                    plan = split_step(rows, lengths, threads, micro_tokens)
                else:
                    plan = [[mb for b in (mine or [step_batches[0][:1]]) for mb in micro_batches(b, lengths, micro_tokens)]]
                batches = [objective.collate([prefix.strip(data.train[i]) if prefix else data.train[i] for i in mb], pad_id)
                           for group in plan for mb in group]
                bounds = itertools.accumulate(map(len, plan), initial=0)  # each thread's micro-batches in `batches`
                groups = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
                n_trained = 0 if idle else sum(objective.count(b) for b in batches)
                n_trained = max(1, int(dist.sum(n_trained)[0]))
                loss_sum, tokens = 0.0, 0

                def batch_loss(batch, prefix=prefix):
                    """(summed loss, units) of one micro-batch, under autocast."""
                    with autocast(device, dtype):
                        return causal_lm_loss(model, batch, prefix) if prefix is not None else step_model(batch)

                def real_tokens(batch, prefix=prefix) -> int:
                    """The batch's tokens, padding left out and a stripped prefix counted back in for every row."""
                    return int(batch["attention_mask"].sum()) + (prefix.length * len(batch["input_ids"]) if prefix else 0)

                if threads > 1 and len(batches) > 1:  # a CPU: micro-batches side by side, one core each
                    def loss_of(batch, n_trained=n_trained):
                        loss, _ = batch_loss(batch)
                        return loss / n_trained, float(loss.detach())

                    trainable_now = [p for p in model.parameters() if p.requires_grad]
                    if prefix is not None:  # their gradients summed like the parameters', for prefix.backward()
                        trainable_now += prefix.leaves()
                    loss_sum = sum(backward_in_threads(loss_of, batches, trainable_now, workers, groups))
                    tokens = sum(real_tokens(b) for b in batches)
                for k, batch in enumerate(batches if threads == 1 or len(batches) == 1 else []):
                    batch = {key: v.to(device) for key, v in batch.items()}
                    with dist.no_sync(step_model, sync=k == len(batches) - 1):
                        loss, _ = batch_loss(batch)
                        if idle:
                            loss = loss * 0.0
                        # DDP averages the ranks' gradients: each scales by world / global units -> the mean per
                        # trained token (or pair).
                        scaler.scale(loss / (n_trained / dist.world)).backward()
                    loss_sum += float(loss.detach())
                    tokens += 0 if idle else real_tokens(batch)
                if prefix is not None:
                    prefix.backward()
                if dist.active:
                    loss_sum, tokens = dist.sum(loss_sum, tokens)
                    tokens = int(tokens)
                penalty_value = None
                if penalty is not None:  # once per step, on the weights (identical on every rank)
                    value = penalty()
                    if value.requires_grad:
                        scaler.scale(value).backward()
                    penalty_value = float(value.detach())
                grad_norm = None
                scaler.unscale_(optimizer)
                if t.max_grad_norm is not None:
                    trainable_params = [p for p in model.parameters() if p.requires_grad]
                    if dist.active:
                        grad_norm = float(dist.accelerator.clip_grad_norm_(trainable_params, t.max_grad_norm))
                    else:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_params, t.max_grad_norm))
                lr = scheduler.get_last_lr()[0]
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["step_in_epoch"] += 1
                state["tokens"] += tokens
                state["trained_tokens"] += n_trained
                last_train_loss = loss_sum / n_trained
                dt = time.perf_counter() - tick
                record = {"step": state["step"], "epoch": round(state["epoch"] + state["step_in_epoch"] / len(steps), 4),
                          "train_loss": round(last_train_loss, 6), "lr": lr, "tokens_per_s": round(tokens / dt, 1)}
                if grad_norm is not None:
                    record["grad_norm"] = round(grad_norm, 6)
                if penalty_value is not None:
                    record["penalty"] = round(penalty_value, 6)
                end_of_epoch = state["step_in_epoch"] == len(steps)
                done = state["step"] >= total_steps
                if (t.eval_every and state["step"] % t.eval_every == 0) or end_of_epoch or done:
                    metrics = evaluate()
                    if metrics is not None:
                        eval_loss = state["last_eval"] = metrics["eval_loss"]
                        record.update({k: round(v, 6) for k, v in metrics.items()})
                        improved = state["best_eval"] is None or eval_loss < state["best_eval"] - (t.early_stopping.min_delta if t.early_stopping else 0.0)
                        if improved:
                            state["best_eval"], state["bad_evals"] = eval_loss, 0
                            if t.early_stopping:
                                best = trainable_state(model)
                        else:
                            state["bad_evals"] += 1
                        if t.early_stopping and state["bad_evals"] >= t.early_stopping.patience:
                            state["stopped_early"] = True
                            done = True
                if state["step"] % t.log_every == 0 or "eval_loss" in record or done:
                    log.log(record)
                progress.update(state["step"], record)
                if on_eval is not None and "eval_loss" in record and not done:
                    on_eval(state["step"], eval_loss)
                if end_of_epoch:
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                state["elapsed"] = time.perf_counter() - started
                if (t.save_every and state["step"] % t.save_every == 0) or done:
                    checkpoint_now()
                if step_delay:
                    time.sleep(step_delay)
                if done:
                    stop = True
                    break

    # 4. Save: restore the best weights when early stopping kept them, then the final model and the summary.
    final_eval = state.get("last_eval")
    if best is not None and t.early_stopping:
        load_trainable_state(model, best)
        final_eval = state["best_eval"]
    workers.close()
    restore_attention(model, attention)
    restore_lora(fused)
    if not dist.main:
        dist.finish()
        return TrainResult(run_dir, {})
    save_model(model, tokenizer, run_dir / "model")
    records = log.records()
    log.close()
    plot_loss(records, run_dir / "loss_curve.png")
    wall = time.perf_counter() - started
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    summary = {
        "model": cfg.model,
        "base_model_path": source.path,
        "method": cfg.method.name,
        "data_format": data.format,
        "train_examples": data.train_examples,
        "train_rows": len(data.train),
        "eval_examples": len(data.validation),
        "truncated_examples": data.truncated,
        "data_cache_hit": data.cache_hit,
        "data_prepare_s": round(data.seconds, 3),
        "trainable_params": trainable,
        "total_params": total_params,
        "steps": state["step"],
        "epochs": round(state["epoch"] + state["step_in_epoch"] / max(per_epoch, 1), 4),
        "stopped_early": bool(state.get("stopped_early")),
        "tokens_trained": state["tokens"],
        "loss_tokens": state["trained_tokens"],
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(state["tokens"] / max(state["elapsed"], 1e-9), 1),
        "final_train_loss": train_losses[-1] if train_losses else last_train_loss,
        "final_eval_loss": round_metric(final_eval),
        "eval_perplexity": round(math.exp(final_eval), 4) if final_eval is not None and objective.unit == "token" else None,
        "loss_unit": objective.unit,
        "initial_eval_loss": round_metric(state.get("initial_eval")),
        "best_eval_loss": round_metric(state["best_eval"]),
        "precision": precision,
        "device": device.type,
        "micro_batch_tokens": micro_tokens,
        "micro_batch_threads": threads,
        "attention": ATTENTION_NAME if attention else getattr(model.config, "_attn_implementation", None),
        "gradient_checkpointing": checkpointing,
        "processes": dist.world,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    trackers.finish(run_dir)
    progress.footer(summary, run_dir)
    dist.finish()
    return TrainResult(run_dir, summary)


class _NoLog:
    """Ranks other than 0 write no metrics."""

    def log(self, record: dict) -> None:
        pass

    def records(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass
