"""Worker function for the V-placed schedules' runtime test (module level, so spawn can
import it): every V schedule, number of micro-batches, recomputation and transport in one
process group, each compared with single-process training of the same model."""

from __future__ import annotations

from typing import Any

import torch

import layerwise as lw
from _workers import D, compare, mlp_layers, mse, reference
from layerwise.runtime.executor import RECOMPUTE_MODES, Run

V_SCHEDULES = ("zb-v", "v-half", "v-min", "dualpipe-v")
TRANSPORTS = ("tags", "channels")


def v_sizes(world: int) -> list[tuple[str, int]]:
    """Return the (schedule, micro-batches) cases this world size can run: m in p, 2p, 4p
    where the schedule takes it (dualpipe-v needs m >= 2p)."""
    return [
        (name, m)
        for name in V_SCHEDULES
        for m in (world, 2 * world, 4 * world)
        if not lw.schedules.problems(name, world, m)
    ]


def transports(name: str, m: int, world: int) -> tuple[str, ...]:
    """Tags for every size; order-matched channels at the schedule's smallest m only (what
    they add, matching by order, does not depend on the number of micro-batches)."""
    smallest = min(k for n, k in v_sizes(world) if n == name)
    return TRANSPORTS if m == smallest else ("tags",)


def v_equivalence_cases(rank: int, world: int) -> dict[str, Any]:
    """Return case -> list of differences from single-process training (empty: equal).

    One pipeline per schedule, m and transport runs a step for each recomputation mode; the
    gradients are zeroed in between. Eight layers make 2p stages of one or two layers."""
    torch.set_num_threads(1)  # the workers share the machine's few cores
    torch.manual_seed(1)
    x, y = torch.randn(16, D), torch.randn(16, D)
    ref_loss, ref_grads = reference(mlp_layers(), x, y, mse)
    results: dict[str, Any] = {}
    for name, m in v_sizes(world):
        for p2p in transports(name, m, world):
            with lw.Pipeline(
                mlp_layers(), schedule=name, microbatches=m, loss_fn=mse, p2p=p2p
            ) as pipe:
                inputs = x if pipe.is_first else None
                targets = y if pipe.is_last else None
                for recompute in RECOMPUTE_MODES:
                    pipe.zero_grad()
                    run = Run(pipe.schedule, mse, recompute)
                    loss = float(pipe.executor.run(run, inputs, targets))
                    case = f"{name} m={m} {p2p} {recompute}"
                    results[case] = compare(pipe, loss, ref_loss, ref_grads)
                results[f"{name} m={m} {p2p} ends"] = (pipe.is_first, pipe.is_last)
                computes = [e for e in pipe.timeline().events if e.kind in ("F", "I", "W")]
                results[f"{name} m={m} {p2p} computes"] = len(computes)
    return results
