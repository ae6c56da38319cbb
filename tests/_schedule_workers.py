"""Worker functions for the multi-process tests of test_new_schedules.py (module level, so
spawn can import them). They reuse the model, the reference and the comparison of
``_workers``."""

from __future__ import annotations

from typing import Any

import torch

import layerwise as lw
from _workers import D, compare, mlp_layers, mse, reference

NEW_SCHEDULES = ("looped-bfs", "zb-h2", "interleaved-zb")
RECOMPUTE = ("never", "always", "except_last")
TRANSPORTS = ("tags", "channels")


def cases(world: int) -> list[tuple[str, int, str, str]]:
    """(schedule, m, recompute, transport): every new schedule at m in (p, 2p, 4p), with and
    without recomputation, on the tag transport; and on the order-matched one at m = p
    (what it adds, matching by order, does not depend on m or recomputation)."""
    out = [(s, m, r, "tags") for s in NEW_SCHEDULES for m in (world, 2 * world, 4 * world)
           for r in ("never", "except_last")]  # fmt: skip
    out += [(s, world, r, "channels") for s in NEW_SCHEDULES for r in ("never", "always")]
    return out


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
    for schedule, m, recompute, p2p in cases(world):
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
    results.update(auto_cases(world, x, y, ref_loss, ref_grads))
    return results


def auto_case_names(world: int) -> list[str]:
    """The auto cases: by name, and searched for uneven costs (looped and V placement)."""
    return [
        f"auto {kind} m={m} {recompute}"
        for kind in ("by name", "looped", "v")
        for m in (world, 4 * world)
        for recompute in ("never", "except_last")
    ]


def auto_cases(
    world: int, x: torch.Tensor, y: torch.Tensor, ref_loss: float, ref_grads: list[torch.Tensor]
) -> dict[str, list[str]]:
    """Schedules searched by ``auto`` train exactly like single-process training: the
    registry's, and ones searched for a heavy stage under a tight cap, in both placements."""
    from layerwise.schedules import synthesize
    from layerwise.simulate import Costs

    results: dict[str, list[str]] = {}
    for kind in ("by name", "looped", "v"):
        for m in (world, 4 * world):
            schedule: Any = "auto"
            if kind != "by name":
                stages = 2 * world  # two stages per worker
                fwd = [1.0 + (s == 1) for s in range(stages)]
                costs = Costs.per_stage(fwd, [2 * f for f in fwd])
                # one search, on the first rank (the others would repeat it on the same cores)
                box: list[Any] = [None]
                if torch.distributed.get_rank() == 0:
                    box[0] = synthesize(costs, world, m, 1.5, placement=kind, chunks=2,
                                        time_limit_s=None)  # fmt: skip
                torch.distributed.broadcast_object_list(box, src=0)
                schedule = box[0]
            for recompute in ("never", "except_last"):
                with lw.Pipeline(mlp_layers(), schedule=schedule, microbatches=m, loss_fn=mse,
                                 recompute=recompute, p2p="channels") as pipe:  # fmt: skip
                    loss = pipe.train_step(x if pipe.is_first else None,
                                           y if pipe.is_last else None)  # fmt: skip
                    results[f"auto {kind} m={m} {recompute}"] = compare(
                        pipe, loss, ref_loss, ref_grads
                    )
    return results
