"""Checkpoints of a pipeline run: each worker saves its own stages, nothing is ever half-written.

Model and optimizer state go through ``torch.distributed.checkpoint`` (each worker writes its
own layers, named by global layer index, so the files do not depend on who held what).
Step, data position and RNG state go to one small file per rank. Everything is written to
``step_N.tmp`` first; only when every rank has finished does rank 0 rename it to ``step_N``
and then atomically point ``latest`` at it. A crash at any moment leaves the previous
checkpoint untouched and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# flattened keys ('state.3.mlp.fc_in.weight.exp_avg') are unique per parameter, so workers
# holding different layers never collide in the checkpoint's global namespace
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
KEEP = 2


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(
    ckpt_dir: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
) -> Path:
    """Save this worker's part of step ``step`` (collective); return the final directory."""
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f"step_{step:07d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {
        "model": get_model_state_dict(module),
        "optim": get_optimizer_state_dict(module, optimizer, options=OPTIONS),
    }
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(extra, tmp / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_dir / "latest.json.tmp"
        pointer.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(pointer, ckpt_dir / "latest.json")
        for old in sorted(ckpt_dir.glob("step_*"))[:-KEEP]:
            if old.name != final.name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest(ckpt_dir: Path) -> Path | None:
    """Return the newest complete checkpoint directory, or None."""
    pointer = ckpt_dir / "latest.json"
    if not pointer.exists():
        return None
    path = ckpt_dir / json.loads(pointer.read_text())["path"]
    return path if path.is_dir() else None


def load(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load this worker's part of checkpoint ``path`` in place; return its extra state."""
    state: dict[str, Any] = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(module, optimizer, options=OPTIONS)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(module, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state["optim"], options=OPTIONS)
    extra_file = path / f"rank{_rank()}.pt"
    if not extra_file.exists():
        raise FileNotFoundError(
            f"{extra_file} is missing: the checkpoint was written by fewer workers "
            f"than this run has"
        )
    return dict(torch.load(extra_file, weights_only=False))
