"""Worker functions for the multi-process tests of test_new_schedules.py (module level, so
spawn can import them). They reuse the model, the reference and the comparison of
``_workers``."""

from __future__ import annotations

import torch

import layerwise as lw
from _workers import D, compare, mlp_layers, mse, reference

NEW_SCHEDULES = ("looped-bfs", "zb-h2", "interleaved-zb")
RECOMPUTE = ("never", "always", "except_last")
TRANSPORTS = ("tags", "channels")


def case_name(schedule: str, m: int, recompute: str, p2p: str) -> str:
    return f"{schedule} m={m} {recompute} {p2p}"


def new_schedule_cases(rank: int, world: int) -> dict[str, list[str]]:
    """Every new schedule x m in (p, 2p, 4p) x recompute mode x transport on this world
    size, each one training step of 8 MLP layers (two stages per worker with two chunks).
    Returns case -> what differs from single-process training (empty when it matches)."""
    torch.manual_seed(1)
    x, y = torch.randn(16, D), torch.randn(16, D)
    ref_loss, ref_grads = reference(mlp_layers(), x, y, mse)
    results: dict[str, list[str]] = {}
    for schedule in NEW_SCHEDULES:
        for m in (world, 2 * world, 4 * world):
            for recompute in RECOMPUTE:
                for p2p in TRANSPORTS:
                    with lw.Pipeline(
                        mlp_layers(),
                        schedule=schedule,
                        microbatches=m,
                        loss_fn=mse,
                        recompute=recompute,
                        p2p=p2p,
                    ) as pipe:
                        first, last = pipe.is_first, pipe.is_last
                        loss = pipe.train_step(x if first else None, y if last else None)
                        errors = compare(pipe, loss, ref_loss, ref_grads)
                    results[case_name(schedule, m, recompute, p2p)] = errors
    return results
