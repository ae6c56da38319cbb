"""Checkpoints of a pipeline run, free of its layout, never half-written, checked when read.

Model and optimizer state go through ``torch.distributed.checkpoint`` (DCP), named by global
layer index and parameter name ('3.mlp.fc_in.weight'); DCP keeps tensor-parallel shards as
DTensors and ZeRO-1's optimizer shards under their parameters' names. So a checkpoint does not
depend on who held what, and a run resumes on any (dp, pp, tp), schedule, balance or number of
workers: each worker asks for the names it now holds.

Everything is written to ``step_N.tmp``; each rank hashes the files it wrote, rank 0 writes the
manifest (``job.ckpt_files``) and only then renames the folder to ``step_N`` and points
``latest.json`` at it. A crash at any moment leaves the previous checkpoint as it was; a full
disk fails the save on every rank alike, with one line, and leaves the last good one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from layerwise.job.ckpt_files import (
    Choice,
    describe_files,
    newest_good,
    read_manifest,
    step_dirs,
    write_manifest,
)

# flattened keys ('state.3.mlp.fc_in.weight.exp_avg') are unique per parameter, so workers
# holding different layers never collide in the checkpoint's global namespace
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
KEEP = 2  # complete checkpoints kept: the newest may be damaged later, the one before is used
JOB_STATE = "job.pt"


class SaveError(RuntimeError):
    """A checkpoint could not be written (on some rank); the previous one is untouched."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(value: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _why(err: BaseException) -> str:
    """One line for a failed write; a full disk is named as such."""
    causes = [err]
    if isinstance(err, CheckpointException):
        causes += [e for e, _ in err.failures.values()]
    for cause in causes:
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                return "no space left on device"
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def save(
    ckpt_dir: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    job_state: dict[str, Any],
    rank_state: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Save step ``step`` (collective): this worker's layers and optimizer state, its
    ``rank_state`` (RNG), rank 0's ``job_state`` (step, guard) and, in the manifest, ``info``
    (layout, architecture). Return the final directory; raise SaveError on every rank if any
    rank failed, after removing the partial folder."""
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f"step_{step:07d}.tmp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    outcome: Any
    try:
        state = {
            "model": get_model_state_dict(module),
            "optim": get_optimizer_state_dict(module, optimizer, options=OPTIONS),
        }
        dcp.save(state, checkpoint_id=str(tmp))
        mine = [f"rank{rank}.pt"] + [JOB_STATE] * (rank == 0)
        torch.save(rank_state, tmp / mine[0])
        if rank == 0:
            torch.save(job_state, tmp / JOB_STATE)
        # DCP names each rank's data file after the rank; rank 0 also owns .metadata
        mine += [n for n in os.listdir(tmp) if n.startswith(f"__{rank}_")]
        if rank == 0:
            mine += [n for n in os.listdir(tmp) if n == ".metadata"]
        outcome = describe_files(tmp, mine)
    except (OSError, CheckpointException, RuntimeError) as err:
        outcome = f"rank {rank}: {_why(err)}"
    outcomes = _gather(outcome)
    failures = [o for o in outcomes if isinstance(o, str)]
    if failures:
        _barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"checkpoint of step {step} not saved ({failures[0]}); kept the last one")
    if rank == 0:
        files = {name: meta for o in outcomes for name, meta in o.items()}
        write_manifest(tmp, files, {**info, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_dir / "latest.json.tmp"
        pointer.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(pointer, ckpt_dir / "latest.json")
        for _, old in step_dirs(ckpt_dir)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_fits(path: Path, module: nn.Module) -> None:
    """Raise ValueError when the saved model's tensors differ from this model's: a resumed
    run may change its layout, never its architecture."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    ours = get_model_state_dict(module)
    wrong = []
    for name, tensor in ours.items():
        meta = saved.get(f"model.{name}")
        if meta is None:
            wrong.append(f"{name} is not in the checkpoint")
        elif tuple(getattr(meta, "size", ())) != tuple(tensor.shape):
            wrong.append(
                f"{name} is {list(getattr(meta, 'size', []))} there and {list(tensor.shape)} here"
            )
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(
            f"checkpoint {path} does not fit this model: {wrong[0]}{more}. A resumed run may "
            f"change its layout but not the model's architecture (layers, width, heads)"
        )


def load(
    path: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load this worker's layers (and optimizer state) from ``path`` in place; return the
    job's state and this rank's own state (None when the saving run had no such rank)."""
    check_fits(path, module)
    state: dict[str, Any] = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(module, optimizer, options=OPTIONS)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(module, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state["optim"], options=OPTIONS)
    job = dict(torch.load(path / JOB_STATE, weights_only=False))
    own = path / f"rank{_rank()}.pt"
    return job, (dict(torch.load(own, weights_only=False)) if own.exists() else None)


def saved_info(path: Path) -> dict[str, Any]:
    """What the manifest says about the run that wrote ``path`` (layout, architecture)."""
    return read_manifest(path)


def agreed_checkpoint(ckpt_dir: Path) -> Choice:
    """The newest whole checkpoint, checked once by rank 0 and told to every rank
    (collective); the checkpoints passed over are listed in ``rejected``."""
    box: list[Any] = [newest_good(ckpt_dir) if _rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]
