"""Checkpoints: what resume needs to continue exactly where a run stopped.

A checkpoint holds the trainable weights (adapters for LoRA, the unfrozen blocks for freeze, everything for full),
the optimizer and scheduler state, every RNG state and the loop's position. It is written into a temporary directory
and renamed into place, so a `kill -9` leaves either a complete checkpoint or none; only the newest `keep_last` stay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable parameter {missing[0]}; was it written by another method config?")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loop_state: dict,
    keep_last: int,
    best: dict[str, torch.Tensor] | None = None,
    rng_ranks: list[dict] | None = None,
) -> Path:
    """Write a checkpoint; `rng_ranks` holds every process's RNG state in a multi-process run (rank 0's otherwise)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=checkpoints))
    try:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        if best is not None:
            save_file(best, tmp / "best.safetensors")
        rng = {"rng": rng_state()} if rng_ranks is None else {"rng": rng_ranks[0], "rng_ranks": rng_ranks}
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(loop_state, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoints)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are ignored)."""
    if not checkpoints.is_dir():
        return []
    done = [p for p in checkpoints.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0,
                    world: int = 1) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the loop state and the best weights if saved.

    A checkpoint of a run with another number of processes resumes too (same global batches); only dropout masks
    then differ from an uninterrupted run.
    """
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("rng_ranks")
    set_rng_state(ranks[rank] if ranks is not None and len(ranks) == world else state["rng"])
    best = load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
    return json.loads((path / "trainer_state.json").read_text()), best


def clean_partial(checkpoints: Path) -> None:
    """Remove temporary directories left by a checkpoint write that was killed."""
    if checkpoints.is_dir():
        for p in checkpoints.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
