"""Worker functions for the pipeline's life cycle: dropped and closed pipelines, and ranks
that built different pipelines (module level, so spawn can import them)."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch import nn

import layerwise as lw

D = 8


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def _layers(world: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(D, D) for _ in range(2 * world)]


def _one_step(world: int, schedule: str) -> float:
    """Build a pipeline, run one step and return: the pipeline is dropped on return."""
    pipe = lw.Pipeline(_layers(world), schedule=schedule, microbatches=4, loss_fn=mse, timeout=20)
    torch.manual_seed(1)
    x, y = torch.randn(8, D), torch.randn(8, D)
    return pipe.train_step(x, y)


def dropped_and_closed(rank: int, world: int) -> dict[str, Any]:
    """Pipelines dropped right after a step, then closed ones: every step's loss arrives."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for schedule in ("gpipe", "1f1b"):
        losses = []
        for _ in range(2):
            losses.append(_one_step(world, schedule))
            gc.collect()  # whatever the dropped pipeline held is freed now, on every rank
        out[f"{schedule} dropped"] = losses
    for schedule in ("gpipe", "1f1b"):
        losses = []
        for _ in range(2):
            with lw.Pipeline(_layers(world), schedule=schedule, microbatches=4, loss_fn=mse,
                             timeout=20) as pipe:  # fmt: skip
                torch.manual_seed(1)
                losses.append(pipe.train_step(torch.randn(8, D), torch.randn(8, D)))
        out[f"{schedule} closed"] = losses
    out["seconds"] = time.perf_counter() - t0
    return out


MISMATCHES: dict[str, Any] = {
    # case -> what rank 0 builds differently from the others
    "schedule": {"schedule": "gpipe"},
    "micro-batches": {"microbatches": 2},
    "partition": "balance",
    "interleaved": {"schedule": "interleaved-1f1b"},
}


def disagreeing_ranks(rank: int, world: int) -> dict[str, str]:
    """Rank 0 builds a different pipeline from the others: every rank fails at once."""
    out: dict[str, str] = {}
    for case, change in MISMATCHES.items():
        options: dict[str, Any] = {"schedule": "1f1b", "microbatches": 4}
        if rank == 0 and isinstance(change, dict):
            options.update(change)
        if change == "balance":
            sizes = [1] * (world - 1) + [world + 1] if rank == 0 else [2] * world
            options["balance"] = sizes
        t0 = time.perf_counter()
        try:
            lw.Pipeline(_layers(world), loss_fn=mse, timeout=20, **options)
            out[case] = "built"
        except ValueError as err:
            out[case] = f"{time.perf_counter() - t0:.1f}s {err}"
    # the group is still usable afterwards
    out["after"] = str(_one_step(world, "1f1b"))
    # a rank that never builds: the others give up after the pipeline's timeout, not the
    # group's (which is long), naming the rank that is missing
    t0 = time.perf_counter()
    if rank == world - 1:
        time.sleep(4)
        out["absent"] = "slept"
    else:
        try:
            lw.Pipeline(_layers(world), loss_fn=mse, timeout=1)
            out["absent"] = "built"
        except RuntimeError as err:
            out["absent"] = f"{time.perf_counter() - t0:.1f}s {err}"
    return out
