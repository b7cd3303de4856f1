"""Data-parallel training through accelerate (DDP; on a CPU the gloo backend), FSDP or DeepSpeed ZeRO on GPUs.

`tunelab train run.yaml --nproc N` re-launches itself with `accelerate launch` (a pass-through to torchrun); a
process started by any launcher (`accelerate launch -m tunelab train run.yaml`, torchrun, a multi-node job) sees
WORLD_SIZE > 1 and joins the group. Every process runs the same loop on its share of each global batch:

- the global batch is the single-process batch (same examples, same order); rank r takes every N-th example of it,
  so N processes reach the single-process losses (tested to 1e-4 per step);
- each process scales its summed token loss by N / (trained tokens of the whole global step), so the gradient
  average that DDP computes is the single-process token-mean gradient;
- only rank 0 prepares the run directory and writes config, metrics, trackers, checkpoints and the final model;
  checkpoints keep every rank's RNG state, so `--resume` continues a multi-process run exactly.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def device_slots(device: str = "auto") -> tuple[int, str]:
    """How many processes this machine can give one device each: (count, what they are)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPUs"
    return usable_cpus(), "CPU cores"


def launch_command(config: Path, overrides: list[str], nproc: int, *, resume: bool = False, quiet: bool = False,
                   device: str = "auto", num_machines: int = 1, machine_rank: int = 0,
                   main_process_ip: str | None = None, main_process_port: int = 0) -> list[str]:
    """The `accelerate launch` command that runs `tunelab train` in `nproc` processes per machine.

    Raises:
        TunelabError: nproc below 1 or above the processes this machine can run side by side.
    """
    slots, what = device_slots(device)
    if nproc < 1:
        raise TunelabError(f"--nproc: must be at least 1 (got {nproc})")
    if nproc > slots:
        raise TunelabError(f"--nproc: {nproc} processes but this machine has {slots} {what}; use --nproc {slots} or fewer")
    if num_machines > 1 and not main_process_ip:
        raise TunelabError("--main-process-ip: required with --num-machines > 1 (the address of machine rank 0)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(nproc * num_machines), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--main_process_port", str(main_process_port),
           "--num_cpu_threads_per_process", str(max(1, usable_cpus() // nproc)),
           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet"]
    if main_process_ip:
        cmd += ["--main_process_ip", main_process_ip]
    cmd += ["-m", "tunelab", "train", str(config), *overrides]
    cmd += ["--resume"] if resume else []
    cmd += ["--quiet"] if quiet else []
    return cmd


@dataclass
class Dist:
    """This process's place in the group; with one process every method is a no-op."""

    rank: int = 0
    world: int = 1
    accelerator: object | None = None
    _gloo: object | None = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (every world-th item, starting at rank)."""
        return items[self.rank :: self.world] if self.active else items

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, group=self._gloo)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier(group=self._gloo)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self._gloo)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0, group=self._gloo)
        return out

    def on_main(self, fn):
        """fn() on rank 0, its result (or its TunelabError) on every rank: decisions such as which checkpoint to
        resume are made once."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except TunelabError as exc:
                error = str(exc)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise TunelabError(error)
        return result

    def main_first(self, fn):
        """fn() on rank 0, then on the other ranks (a cache rank 0 writes is then read by the rest)."""
        if not self.active:
            return fn()
        error = None
        if self.main:
            try:
                result = fn()
            except TunelabError as exc:
                error = str(exc)
        error = self.broadcast(error)
        if error is not None:
            raise TunelabError(error)
        return result if self.main else fn()

    def finish(self) -> None:
        if self.active and torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()

    def no_sync(self, module, sync: bool):
        """Skip DDP's gradient all-reduce for every micro-batch of a step but the last."""
        if not self.active or sync or not hasattr(module, "no_sync"):
            return contextlib.nullcontext()
        return module.no_sync()


def init_distributed(device: torch.device, cfg) -> Dist:
    """Join the process group when a launcher started several processes; else a single-process Dist."""
    if world_size() <= 1:
        return Dist()
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    strategy = cfg.strategy
    plugins = {}
    if strategy != "ddp" and device.type != "cuda":
        raise TunelabError(f"training.distributed.strategy: {strategy} needs CUDA GPUs; use ddp on a CPU")
    if strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(**cfg.fsdp)
    elif strategy == "deepspeed":
        from accelerate import DeepSpeedPlugin

        plugins["deepspeed_plugin"] = DeepSpeedPlugin(**({"zero_stage": 2} | cfg.deepspeed))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)], **plugins)
    # Object collectives (broadcast/gather of Python objects) need a CPU group when the main backend is NCCL.
    gloo = torch.distributed.new_group(backend="gloo") if torch.distributed.get_backend() != "gloo" else None
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator, _gloo=gloo)


class LossModule(torch.nn.Module):
    """The model with the loop's loss as its forward, so that DDP/FSDP hooks see every parameter the loss uses
    (the fused loss reads the LM head's weight directly instead of calling the model's forward)."""

    def __init__(self, model: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(self.model, batch)
