"""The problem :mod:`auto` solves, encoded in integers, and a fast evaluator of candidates.

The search in ``auto`` builds and compares hundreds of candidate orders, so candidates are
kept as per-worker lists of integer action codes rather than :class:`Action` objects, and
timed by :func:`finish_times`, which applies exactly the rules of :func:`simulate`: each
worker runs its list in order, an action starts when its worker is free and its
dependencies have arrived (finish, plus the hand-off when they ran on another worker).
Memory depends on the order alone (a worker runs one action at a time), so
:func:`peak_memory` reads it off a list without timing anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from layerwise.schedules.ir import Action, Schedule

if TYPE_CHECKING:  # simulate imports this package, so only for the type
    from layerwise.simulate import Costs

F, G, W = 0, 1, 2  # forward; input gradient (B, or I when split); weight gradient (W)
NONE = -1
# Memory sums are compared with a relative slack, so that rounding in sums of sizes such as
# 1/3 never rejects a fit that is exact on paper (the timeline sums in the same order).
MEMORY_SLACK = 1e-9


@dataclass(frozen=True)
class Tables:
    """Per action code: duration, up to two dependencies with their hand-off delays, the
    worker, the change in held memory, and the actions it feeds."""

    duration: list[float]
    dep: list[tuple[int, float, int, float]]  # (dep1, lag1, dep2, lag2), NONE if absent
    worker: list[int]
    memory: list[float]  # +size for F, -size for the action that releases, else 0
    feeds: list[tuple[tuple[int, float], ...]]  # (action that waits for it, delay)
    kind: list[int]  # F, G or W
    stage: list[int]


@dataclass(frozen=True)
class Problem:
    """A placement, per-stage costs and sizes, and the memory cap of every worker."""

    num_workers: int
    num_microbatches: int
    stage_worker: tuple[int, ...]
    split: bool  # backward as I then W
    forward: tuple[float, ...]
    grad: tuple[float, ...]  # B, or I when split
    weight: tuple[float, ...]  # W when split
    hop: tuple[float, ...]  # hand-off across boundary s | s+1, 0 on one worker
    size: tuple[float, ...]
    cap: float
    num_stages: int = field(init=False)
    limit: float = field(init=False)  # the cap with the rounding slack: never exceeded
    tables: Tables = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_stages", len(self.stage_worker))
        object.__setattr__(self, "limit", self.cap + MEMORY_SLACK * max(1.0, abs(self.cap)))
        object.__setattr__(self, "tables", _tables(self))

    @property
    def num_actions(self) -> int:
        return self.num_stages * self.num_microbatches * (3 if self.split else 2)

    def stages_of(self, worker: int) -> list[int]:
        return [s for s, w in enumerate(self.stage_worker) if w == worker]

    def code(self, kind: int, stage: int, microbatch: int) -> int:
        return (kind * self.num_stages + stage) * self.num_microbatches + microbatch

    def decode(self, code: int) -> tuple[int, int, int]:
        """Return (kind, stage, micro-batch) of ``code``."""
        rest, mb = divmod(code, self.num_microbatches)
        kind, stage = divmod(rest, self.num_stages)
        return kind, stage, mb


def problem_of(
    costs: Costs,
    stage_worker: tuple[int, ...],
    num_microbatches: int,
    split: bool,
    sizes: Sequence[float],
    cap: float,
) -> Problem:
    """Return the problem of running ``costs``' stages on ``stage_worker`` under ``cap``."""
    n = len(stage_worker)
    hop = tuple(
        0.0 if stage_worker[s] == stage_worker[s + 1] else costs.transfer(s, s + 1)
        for s in range(n - 1)
    )
    return Problem(
        num_workers=max(stage_worker) + 1,
        num_microbatches=num_microbatches,
        stage_worker=stage_worker,
        split=split,
        forward=costs.forward,
        grad=costs.input_grad if split else costs.backward,
        weight=costs.weight_grad if split else (0.0,) * n,
        hop=hop,
        size=tuple(float(x) for x in sizes),
        cap=cap,
    )


def _tables(prob: Problem) -> Tables:
    n, m = prob.num_stages, prob.num_microbatches
    total = 3 * n * m
    duration, worker, memory = [0.0] * total, [0] * total, [0.0] * total
    dep = [(NONE, 0.0, NONE, 0.0)] * total
    feeds: list[list[tuple[int, float]]] = [[] for _ in range(total)]
    for s in range(n):
        for k in range(m):
            f, g, w = prob.code(F, s, k), prob.code(G, s, k), prob.code(W, s, k)
            duration[f], duration[g], duration[w] = prob.forward[s], prob.grad[s], prob.weight[s]
            worker[f] = worker[g] = worker[w] = prob.stage_worker[s]
            memory[f] = prob.size[s]
            memory[w if prob.split else g] = -prob.size[s]
            if s > 0:
                dep[f] = (prob.code(F, s - 1, k), prob.hop[s - 1], NONE, 0.0)
                feeds[prob.code(F, s - 1, k)].append((f, prob.hop[s - 1]))
            if s + 1 < n:
                dep[g] = (f, 0.0, prob.code(G, s + 1, k), prob.hop[s])
                feeds[prob.code(G, s + 1, k)].append((g, prob.hop[s]))
            else:
                dep[g] = (f, 0.0, NONE, 0.0)
            feeds[f].append((g, 0.0))
            dep[w] = (g, 0.0, NONE, 0.0)
            feeds[g].append((w, 0.0))
    kind = [code // (n * m) for code in range(total)]
    stage = [code // m % n for code in range(total)]
    return Tables(duration, dep, worker, memory, [tuple(x) for x in feeds], kind, stage)


def finish_times(prob: Problem, lists: Sequence[Sequence[int]]) -> list[float] | None:
    """Return each action's finish time (by code; -1 where absent), as :func:`simulate`
    would time these lists, or None if they deadlock."""
    tables = prob.tables
    duration, dep = tables.duration, tables.dep
    finish = [-1.0] * len(duration)
    pos = [0] * len(lists)
    free = [0.0] * len(lists)
    moved = True
    while moved:  # sweep the workers until none can advance
        moved = False
        for w, acts in enumerate(lists):
            i, now = pos[w], free[w]
            while i < len(acts):
                a = acts[i]
                d1, lag1, d2, lag2 = dep[a]
                start = now
                if d1 != NONE:
                    if finish[d1] < 0:
                        break
                    start = max(start, finish[d1] + lag1)
                if d2 != NONE:
                    if finish[d2] < 0:
                        break
                    start = max(start, finish[d2] + lag2)
                now = start + duration[a]
                finish[a] = now
                i += 1
            if i != pos[w]:
                pos[w], free[w], moved = i, now, True
    if any(pos[w] < len(acts) for w, acts in enumerate(lists)):
        return None
    return finish


def makespan(prob: Problem, lists: Sequence[Sequence[int]]) -> float | None:
    """Return the simulated step of ``lists``, or None if they deadlock."""
    finish = finish_times(prob, lists)
    return None if finish is None else max(finish)


def peak_memory(prob: Problem, acts: Sequence[int]) -> float:
    """Return the most activation memory a worker running ``acts`` in order holds."""
    memory = prob.tables.memory
    held = peak = 0.0
    for a in acts:
        held += memory[a]
        peak = max(peak, held)
    return peak


def to_schedule(prob: Problem, lists: Sequence[Sequence[int]], name: str) -> Schedule:
    """Return the :class:`Schedule` of integer ``lists``."""
    grad_kind = "I" if prob.split else "B"

    def action(code: int) -> Action:
        kind, stage, mb = prob.decode(code)
        letter = "F" if kind == F else grad_kind if kind == G else "W"
        return Action(stage, letter, mb)  # type: ignore[arg-type]

    actions = tuple(tuple(action(a) for a in acts) for acts in lists)
    return Schedule(name, prob.num_microbatches, prob.stage_worker, actions)


def from_schedule(prob: Problem, schedule: Schedule) -> list[list[int]] | None:
    """Return ``schedule`` as integer lists for ``prob``, a full backward written as I then
    W where ``prob`` splits it; None if it splits a backward that ``prob`` does not."""
    kinds = {"F": (F,), "B": (G, W) if prob.split else (G,), "I": (G,), "W": (W,)}
    if schedule.split_stages and not prob.split:
        return None
    return [
        [prob.code(k, a.stage, a.microbatch) for a in acts for k in kinds[a.kind]]
        for acts in schedule.actions
    ]
