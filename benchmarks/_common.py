"""Shared pieces of the benchmarks: fixed-cost layers, step timing, table and JSON output.

Imported by the ``bench_*.py`` scripts next to it (run them as ``python benchmarks/x.py``,
which puts this folder on ``sys.path``, also in the spawned worker processes).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.schedules import names, problems

_OVERSHOOT = [2e-4]  # running estimate of how late time.sleep wakes up, in seconds


def sleep_until(deadline: float) -> None:
    """Wait until ``time.perf_counter()`` reaches ``deadline``, using almost no CPU.

    ``time.sleep`` wakes up 0.1-0.4 ms late on this kind of machine (timer slack and
    scheduling), which would add 1-4% to a 10 ms layer. So sleep until the deadline minus
    the lateness seen so far, then spin for the rest (typically well under 0.1 ms).
    """
    left = deadline - time.perf_counter()
    if left > _OVERSHOOT[0]:
        target = left - _OVERSHOOT[0]
        t0 = time.perf_counter()
        time.sleep(target)
        late = time.perf_counter() - t0 - target
        _OVERSHOOT[0] = min(2e-3, max(0.0, 0.8 * _OVERSHOOT[0] + 0.2 * (late + 2e-5)))
    while time.perf_counter() < deadline:
        pass


class _Sleep(torch.autograd.Function):
    """Identity whose forward ends at ``deadline`` and whose backward takes ``bwd_s`` seconds.

    It hands back its input, marked as changed in place: no copy, so that the layer's only
    real work is the add before it, and not a view either (torch's pipelining detaches a
    stage's outputs in place, which a view refuses). No parameter reaches this node
    directly (see ``SleepLayer``)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, deadline: float, bwd_s: float) -> Any:
        ctx.bwd_s = bwd_s
        ctx.mark_dirty(z)
        sleep_until(deadline)
        return z

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        sleep_until(t0 + ctx.bwd_s)
        return grad, None, None


class _WeightSleep(torch.autograd.Function):
    """Identity on a parameter whose backward takes ``bwd_s`` seconds."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, bwd_s: float) -> Any:
        ctx.bwd_s = bwd_s
        return w.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        sleep_until(t0 + ctx.bwd_s)
        return grad, None


class _SleepWeight(nn.Module):
    """Owns the layer's one-element parameter; its output is what the runtime captures for W."""

    def __init__(self, bwd_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.bwd_s = bwd_s

    def forward(self) -> torch.Tensor:
        return _WeightSleep.apply(self.weight, self.bwd_s)


class SleepLayer(nn.Module):
    """A layer with a fixed cost: forward ``fwd_ms``, backward ``bwd_ms``, using no CPU.

    ``y = x + w`` with a one-element parameter ``w``, as three autograd nodes:
    ``_Sleep(x + _WeightSleep(w))``. The backward is split where a zero-bubble runtime
    splits it: the input gradient (I, what the previous stage waits for) costs
    ``bwd_ms * (1 - w_share)`` and sits in ``_Sleep.backward``, above the add; the weight
    gradient (W) costs ``bwd_ms * w_share`` and sits in ``_WeightSleep.backward``, the only
    node between the parameter and the output of ``_SleepWeight``, the sub-module that owns
    it. A full backward (B) runs both nodes, ``bwd_ms`` in all. The forward's fixed time
    includes the add; the backward's does not include the add's backward (passing the
    gradient on, and summing it for ``w``: one pass over the activation).

    Why three nodes: layerwise's W starts from the output of the parameter's module, while
    torch.distributed.pipelining's W starts from the first node where the weight's path
    meets the input's (here the add) and runs that node's backward again. Were the I sleep
    in that node, torch's W would sleep I + W.
    """

    def __init__(self, fwd_ms: float, bwd_ms: float, w_share: float = 0.5) -> None:
        super().__init__()
        self.fwd_s = fwd_ms / 1000
        self.i_s = bwd_ms * (1 - w_share) / 1000
        self.bias = _SleepWeight(bwd_ms * w_share / 1000)

    @classmethod
    def with_split(cls, fwd_ms: float, input_ms: float, weight_ms: float) -> SleepLayer:
        """Return a layer whose backward is I = ``input_ms`` then W = ``weight_ms``
        (a full backward: their sum), e.g. W shorter than I as in most real layers."""
        if input_ms < 0 or weight_ms < 0 or input_ms + weight_ms <= 0:
            raise ValueError(
                f"need input_ms >= 0 and weight_ms >= 0, not both 0; "
                f"got input_ms={input_ms}, weight_ms={weight_ms}"
            )
        return cls(fwd_ms, input_ms + weight_ms, w_share=weight_ms / (input_ms + weight_ms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deadline = time.perf_counter() + self.fwd_s
        return _Sleep.apply(x + self.bias(), deadline, self.i_s)


def sleep_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss whose cost is one reduction over the output (no extra copy of a large output)."""
    return (out.mean() - target.mean()) ** 2


# -- which schedules -------------------------------------------------------------------------

# The schedules added with the V placement and the split-backward generators; "new" on the
# command line picks these (those registered: auto may be missing from a checkout).
NEW_SCHEDULES = (
    "looped-bfs", "interleaved-zb", "zb-h2", "zb-v", "v-half", "v-min", "dualpipe-v", "auto",
)  # fmt: skip
SCHEDULE_GROUPS = ("all", "new")


def pick_schedules(chosen: Sequence[str]) -> list[str]:
    """Expand ``--schedules`` (registered names, "all", "new") into registered names, in
    registry order, each once."""
    registered = names()
    wanted: set[str] = set()
    for name in chosen:
        if name == "all":
            wanted.update(registered)
        elif name == "new":
            wanted.update(n for n in NEW_SCHEDULES if n in registered)
        else:
            wanted.add(name)
    return [n for n in registered if n in wanted]


def size_problem(schedule: str, p: int, m: int, chunks: int | None = None) -> str | None:
    """Return the registry's own message for why ``schedule`` cannot run p workers with m
    micro-batches (e.g. interleaved's m % p == 0), or None if it can."""
    found = problems(schedule, p, m, chunks)
    return "; ".join(found) if found else None


# -- timing -----------------------------------------------------------------------------------


def timed_steps(
    step: Callable[[], Any], warmup: int, steps: int, after: Callable[[], Any] | None = None
) -> list[float]:
    """Run ``step`` ``warmup + steps`` times on every rank; return the measured steps' times.

    Each step starts after a barrier; its time runs from the earliest rank's start to the
    latest rank's end (``perf_counter`` is CLOCK_MONOTONIC, shared by the processes of one
    machine). ``after`` runs after each step (outside the timing), e.g. to zero gradients.
    """
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        ends: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ends, (t0, t1))
        if after is not None:
            after()
        if i >= warmup:
            times.append(max(e for _, e in ends) - min(s for s, _ in ends))
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


_LOAD_AT_START = os.getloadavg()[0]


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": _cores(),
        "loadavg_1min_start": _LOAD_AT_START,
        "loadavg_1min_end": os.getloadavg()[0],
    }


def machine_line() -> str:
    """One line naming the machine and how busy it was (other jobs share its cores)."""
    info = machine()
    return (
        f"machine: {info['cores']} cores ({info['cpu']}), CPU only, gloo, torch {info['torch']}; "
        f"1-min load average {info['loadavg_1min_start']:.2f} at start, "
        f"{info['loadavg_1min_end']:.2f} at end"
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- output -----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a markdown table; floats get 3 significant decimals unless pre-formatted."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    print("\n" + machine_line())
    if path:
        payload = {"machine": machine(), **payload}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {path}")
