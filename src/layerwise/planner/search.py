"""Enumerate the layouts that divide evenly, drop those that do not fit, rank the rest.

Exact step times need a pipeline simulation, which costs up to a second for p=64, m=512.
The search therefore orders fitting layouts by a lower bound (the step without its bubble)
and simulates only while the bound can still beat the current top-k (branch and bound);
the ranking is the same as simulating every layout.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from layerwise.planner.evaluate import Evaluation, check_layout, evaluate
from layerwise.planner.memory import Memory, memory
from layerwise.planner.specs import (
    DEFAULT_SCHEDULE,
    RECOMPUTE,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    interleavable,
)
from layerwise.planner.timing import (
    DEFAULT_CALIBRATION,
    Calibration,
    data_parallel_s,
    optimizer_s,
    stage_costs,
)

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_VPP = 8


@dataclass(frozen=True)
class Fixed:
    """Degrees and choices the user pinned; None lets the search choose."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    micro_batch: int | None = None
    recompute: str | None = None
    zero: int | None = None
    sequence_parallel: bool | None = None
    schedules: tuple[str, ...] = (DEFAULT_SCHEDULE,)

    def __post_init__(self) -> None:
        """Raises PlanError for a pinned degree below 1 or an unknown ZeRO stage."""
        pinned = {k: getattr(self, k) for k in ("dp", "tp", "pp", "vpp", "micro_batch")}
        for name, value in pinned.items():
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise PlanError(
                    f"{flag} must be at least 1, got {value}; give 1 or more, or leave it out "
                    f"for the search to choose"
                )
        if self.zero not in (None, 0, 1, 2, 3):
            raise PlanError(
                f"--zero must be 0, 1, 2 or 3, got {self.zero}; leave it out for the search "
                f"to choose"
            )


@dataclass
class PlanResult:
    """The ranked fitting layouts, the best alternative per kind, and the rejected ones."""

    ranked: list[Evaluation]
    alternatives: list[Evaluation]  # best of each other (tp, pp), recompute and ZeRO choice
    over_memory: list[tuple[Layout, Memory]] = field(default_factory=list)  # most-fitting first
    considered: int = 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


T = TypeVar("T")


def _pick(value: T | None, options: list[T]) -> list[T]:
    return options if value is None else [value]


def enumerate_layouts(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> Iterator[Layout]:
    """Yields every layout that divides evenly and respects ``fixed``."""
    n = cluster.gpus
    for tp in _pick(fixed.tp, _divisors(n)):
        for pp in _pick(fixed.pp, _divisors(n // tp) if n % tp == 0 else []):
            dp = n // (tp * pp)
            if fixed.dp not in (None, dp) or n % (tp * pp):
                continue
            yield from _complete(model, cluster, train, fixed, dp, tp, pp)


def _complete(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed, dp: int, tp: int,
    pp: int,
) -> Iterator[Layout]:  # fmt: skip
    """Yields the valid completions of (dp, tp, pp): micro-batch, chunks, memory savers."""
    sps = _pick(fixed.sequence_parallel, [tp > 1])  # SP costs no extra bytes (Korthikanti)
    vpps = _pick(fixed.vpp, [v for v in range(1, MAX_VPP + 1) if pp > 1 or v == 1])
    zeros = _pick(fixed.zero, [z for z in range(4) if (dp > 1 or z == 0) and (pp == 1 or z < 2)])
    for mb in _pick(fixed.micro_batch, list(MICRO_BATCHES)):
        for v in vpps:
            for schedule in fixed.schedules if v == 1 else interleavable():
                for rec in _pick(fixed.recompute, list(RECOMPUTE)):
                    for zero in zeros:
                        for sp in sps:
                            lay = Layout(dp, tp, pp, mb, v, rec, sp, zero, schedule)
                            try:
                                check_layout(model, cluster, train, lay)
                            except PlanError:
                                continue
                            yield lay


def lower_bound_s(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, lay: Layout, cal: Calibration
) -> float:
    """Returns the step time without the pipeline bubble: a bound on ``evaluate``'s."""
    c = stage_costs(model, cluster, lay, cal)
    m = train.global_batch // (lay.dp * lay.micro_batch)
    # The last worker alone runs every micro-batch's stage and the output layer.
    work = m * (c.forward + c.backward + 3 * c.head_forward)
    exposed = data_parallel_s(model, cluster, train, lay, c, cal)[1]
    return work + exposed + optimizer_s(model, cluster, lay, cal)


def _group(lay: Layout) -> list[tuple[str, object]]:
    """Returns the kinds of alternative a layout belongs to."""
    return [("degrees", (lay.tp, lay.pp)), ("recompute", lay.recompute), ("zero", lay.zero)]


def plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    fixed: Fixed | None = None,
    top: int = 5,
    cal: Calibration = DEFAULT_CALIBRATION,
) -> PlanResult:
    """Returns the fitting layouts ranked by predicted step time, best first, with the best
    alternative of each kind and the layouts rejected for memory."""
    fixed = fixed or Fixed()
    fitting: list[tuple[float, int, Layout]] = []
    over: list[tuple[Layout, Memory]] = []
    count = 0
    for lay in enumerate_layouts(model, cluster, train, fixed):
        count += 1
        mem = memory(model, train, lay)
        if mem.total > cluster.gpu.memory_gib:
            over.append((lay, mem))
            continue
        fitting.append((lower_bound_s(model, cluster, train, lay, cal), count, lay))
    if count == 0:
        raise PlanError(_no_layout_message(model, cluster, train, fixed))
    fitting.sort(key=lambda x: (x[0], x[1]))
    over.sort(key=lambda x: x[1].total)
    ranked: list[Evaluation] = []  # a max-heap of the best ``top`` by step time
    heap: list[tuple[float, int, Evaluation]] = []
    group_best: dict[tuple[str, object], Evaluation] = {}
    for bound, order, lay in fitting:
        groups = _group(lay)
        worst_top = -heap[0][0] if len(heap) >= top else float("inf")
        needed = bound < worst_top or any(
            g not in group_best or bound < group_best[g].step_time_s for g in groups
        )
        if not needed:
            continue
        ev = evaluate(model, cluster, train, lay, cal)
        if ev.step_time_s < worst_top:
            heapq.heappush(heap, (-ev.step_time_s, order, ev))
            if len(heap) > top:
                heapq.heappop(heap)
        for g in groups:
            if g not in group_best or ev.step_time_s < group_best[g].step_time_s:
                group_best[g] = ev
    ranked = [ev for _, _, ev in sorted(heap, key=lambda x: (-x[0], x[1]))]
    winner = ranked[0].layout if ranked else None
    alts = {id(ev): ev for ev in group_best.values() if ev.layout != winner}
    alternatives = sorted(alts.values(), key=lambda ev: ev.step_time_s)
    return PlanResult(ranked, alternatives, over, count)


def _no_layout_message(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> str:
    """Returns why no layout divides evenly, naming the first constraint that fails."""
    tp = fixed.tp or 1
    pp = fixed.pp or 1
    dp = fixed.dp or max(1, cluster.gpus // (tp * pp))
    lay = Layout(dp, tp, pp, fixed.micro_batch or 1, fixed.vpp or 1)
    try:
        check_layout(model, cluster, train, lay)
    except PlanError as err:
        return f"no layout divides evenly: {err}"
    return "no layout divides evenly with the fixed options given"
