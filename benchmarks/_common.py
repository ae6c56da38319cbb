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
    """``x + b`` whose forward takes ``fwd_s`` seconds and whose backward ``bwd_s``.

    The backward returns the gradient of ``x`` and of ``b``. Whatever real work the op does
    (the add, the sum that reduces the gradient of ``b``) counts inside the fixed time.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b: torch.Tensor, fwd_s: float, bwd_s: float) -> Any:
        t0 = time.perf_counter()
        ctx.bwd_s = bwd_s
        out = x + b
        sleep_until(t0 + fwd_s)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        grad_b = grad.sum().reshape(1)
        sleep_until(t0 + ctx.bwd_s)
        return grad, grad_b, None, None


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
        return _WeightSleep.apply(self.weight, self.bwd_s)  # type: ignore[no-any-return]


class SleepLayer(nn.Module):
    """A layer with a fixed cost: forward ``fwd_ms``, backward ``bwd_ms``, using no CPU.

    ``y = x + w`` with a one-element parameter ``w``. The backward is split where a
    zero-bubble runtime splits it: the input gradient (I, what the previous stage waits for)
    costs ``bwd_ms * (1 - w_share)`` and sits in ``_Sleep.backward``; the weight gradient
    (W) costs ``bwd_ms * w_share`` and sits in ``_WeightSleep.backward``, the only node
    between the parameter and the output of ``_SleepWeight``, the sub-module that owns it.
    A full backward (B) runs both nodes, ``bwd_ms`` in all.
    """

    def __init__(self, fwd_ms: float, bwd_ms: float, w_share: float = 0.5) -> None:
        super().__init__()
        self.fwd_s = fwd_ms / 1000
        self.i_s = bwd_ms * (1 - w_share) / 1000
        self.bias = _SleepWeight(bwd_ms * w_share / 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.bias(), self.fwd_s, self.i_s)  # type: ignore[no-any-return]


def sleep_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss whose cost is one reduction over the output (no extra copy of a large output)."""
    return (out.mean() - target.mean()) ** 2


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
