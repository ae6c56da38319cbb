"""``auto``: a schedule synthesized for the user's own stage costs under a memory cap.

The built-in schedules are patterns derived for equal stages. ``auto`` starts from the
costs a pipeline actually has (``Pipeline.calibrate``: each stage's F, B or I and W, and
the hand-off) and searches for the order with the shortest simulated step in which no
worker ever holds more activation memory than the cap, as
:meth:`Timeline.peak_activation_memory` measures it (a whole 1F1B stage's activations for
one micro-batch weigh 1; a stage of a v-stage placement 1/v unless sizes are given).

How it searches, and why:

1. **Shape.** The costs' stage count fixes the stages per worker (v = stages / workers).
   With v > 1 both placements (looped and V) are tried unless one is asked for, since
   which is better depends on the costs. The backward is split into I and W when that
   costs nothing (I + W <= B on every stage), else both ways are tried: a split W waits
   for nobody and can fill idle time, as in zero-bubble schedules.
2. **Seeds.** Every registered schedule that runs this placement is scored if it keeps
   its streams in order and fits the cap, so ``auto`` is never slower than the best of
   them; and one micro-batch at a time, which meets any cap that can be met.
3. **List scheduling** (``auto_greedy``) plays the step forward in time; a free worker
   takes the next action by priority rules: an F while fewer micro-batches than a warm-up
   *window* are out and its memory stays under the cap, an I/B with the most backward
   work still behind it first (the critical path), a W to fill what is left. The window
   generalises 1F1B's ``p - w`` to uneven costs: enough micro-batches to keep a worker busy
   until its first gradient is back (round trip / the busiest worker's period). The rule
   switches (F or I/B first, W at once or as filler or not before an imminent input, which
   stage first, how much room to keep for admitted micro-batches) and window depths are
   searched by coordinate descent, then, budget permitting, exhaustively, nearest the best
   rule first. List scheduling fits pipelines because each worker's choice is small and
   local, and a good rule adapts at once to any costs; its weakness, a myopic choice, is
   what step 4 repairs.
4. **Local search** (``auto_search``) from the best candidate: it moves actions on the
   critical path (job-shop moves on runs of worker-bound actions, weight gradients moved
   back into idle gaps), then actions that waited for their own worker, then any two
   neighbours, keeping a move when the step gets shorter (or as short, the workers ending
   earlier in total), the cap holds and every stream stays in order.

Guarantees: the result passes :func:`validate`; no worker ever holds more than the cap
(checked on every candidate; sums of sizes get a 1e-9 relative slack for rounding); every
stage sends its activations and gradients in micro-batch order
(``stream_order_problems(schedule) == []``, so it runs on NCCL too, at no cost to speak
of: the rules never need another order); and it is never slower in simulation than a seed.
The work is counted in simulated actions (:class:`auto_search.Budget`), about a second
for p = 16, m = 64; ``time_limit_s`` also stops the search on a slow machine, which makes
the result depend on the machine, so the registry entry below runs without it (every
worker of a pipeline must build the same schedule). A cap below what one micro-batch
needs on one worker cannot be met: :func:`synthesize` raises ValueError naming the
smallest feasible cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

# The classic schedules register first, so that the registry lists them before auto.
import layerwise.schedules.generators
import layerwise.schedules.zero_bubble  # noqa: F401
from layerwise.schedules import registry
from layerwise.schedules.auto_greedy import tried_rules
from layerwise.schedules.auto_problem import (
    MEMORY_SLACK,
    F,
    G,
    Problem,
    W,
    finish_times,
    from_schedule,
    peak_memory,
    problem_of,
    to_schedule,
)
from layerwise.schedules.auto_search import Budget, improve, score
from layerwise.schedules.ir import Schedule
from layerwise.schedules.registry import PLACEMENTS, Placement, ScheduleSpec, register
from layerwise.schedules.validate import stream_order_problems, validate

if TYPE_CHECKING:  # simulate imports this package, so only for the type
    from layerwise.simulate import Costs

NAME = "auto"
# Simulated actions the search may spend: under a second for p=16, m=64 on one core.
DEFAULT_WORK = 800_000
GREEDY_COST = 6  # a list-scheduling run costs about this many evaluations per action
SEED_COST = 4  # building, checking and evaluating a registered schedule, per action
RULES_SHARE = 0.7  # the rules may spend this share of the work; local search the rest
# The registry entry's equal stages need less search, and every tool that lists the
# schedules (simulate --compare, the tests) builds it for many sizes.
REGISTRY_WORK = 200_000

Lists = list[list[int]]
Scored = tuple[tuple[float, float], Lists]


@dataclass(frozen=True)
class Synthesis:
    """What :func:`search` found, and the work it took."""

    schedule: Schedule
    step: float  # simulated step with the given costs
    peak_memory: tuple[float, ...]  # per worker, units of the cap
    simulations: int  # candidates simulated (list-scheduled or evaluated)
    work: int  # simulated actions spent, <= work_limit
    work_limit: int


def synthesize(
    costs: Costs,
    num_workers: int,
    num_microbatches: int,
    memory_cap: float,
    placement: Placement | None = None,
    chunks: int | None = None,
    stage_sizes: Sequence[float] | None = None,
    time_limit_s: float | None = 2.0,
    split_backward: bool | None = None,
) -> Schedule:
    """Return the schedule of ``costs``' stages on ``num_workers`` workers with the
    shortest simulated step found whose peak activation memory stays under ``memory_cap``
    on every worker; see :func:`search`."""
    return search(
        costs, num_workers, num_microbatches, memory_cap, placement, chunks, stage_sizes,
        time_limit_s, split_backward,
    ).schedule  # fmt: skip


def search(
    costs: Costs,
    num_workers: int,
    num_microbatches: int,
    memory_cap: float,
    placement: Placement | None = None,
    chunks: int | None = None,
    stage_sizes: Sequence[float] | None = None,
    time_limit_s: float | None = 2.0,
    split_backward: bool | None = None,
    work: int = DEFAULT_WORK,
    seed_builtins: bool = True,
) -> Synthesis:
    """Search as the module docstring says and return the best schedule with its figures.

    ``stage_sizes``: activation memory of each stage per micro-batch (default
    ``num_workers / num_stages``); ``split_backward`` None splits when I + W <= B on every
    stage; ``work`` bounds the simulated actions; ``seed_builtins`` False leaves out the
    registered schedules (to measure the rules and the local search alone). Raises
    ValueError for sizes that do not fit ``costs``, or a cap no schedule can meet.
    """
    p, m = num_workers, num_microbatches
    v = _chunks(costs.num_stages, p, m, chunks)
    sizes = _sizes(stage_sizes, costs.num_stages, p)
    shapes = _feasible_placements(placement, p, v, sizes, memory_cap)
    splits = _splits(costs, split_backward)
    problems = [
        problem_of(costs, registry.stage_worker(pl, p, v), m, split, sizes, memory_cap)
        for pl in shapes
        for split in splits
    ]
    budget = Budget(work, time_limit_s)
    found = [(i, _naive(prob)) for i, prob in enumerate(problems)]  # always fits
    if seed_builtins:
        found += _seeds(problems, budget)
    runs = [0]

    def afford(prob: Problem) -> bool:  # the first rule runs whatever the budget
        runs[0] += 1
        return budget.take(GREEDY_COST * prob.num_actions, RULES_SHARE) or runs[0] == 1

    found.extend(tried_rules(problems, afford))
    scored = [(got, i) for i, lists in found if (got := _scored(problems[i], lists))]
    (_, lists), i = min(scored, key=lambda x: (x[0][0], x[1]))
    prob = problems[i]
    lists, best = improve(prob, lists, budget)
    schedule = to_schedule(prob, lists, NAME)
    validate(schedule)
    assert not stream_order_problems(schedule), "auto keeps every stream in order"
    peaks = tuple(peak_memory(prob, acts) for acts in lists)
    assert max(peaks) <= prob.limit, "auto never exceeds the cap"
    return Synthesis(schedule, best[0], peaks, budget.simulations, budget.used, budget.units)


def smallest_cap(
    num_workers: int, chunks: int, placement: Placement, stage_sizes: Sequence[float]
) -> float:
    """Return the smallest cap any schedule can meet on this placement.

    Before a micro-batch's forward reaches a worker's last stage, its earlier stages on that
    worker have run their forwards and wait for their backwards: one micro-batch fills every
    stage of the worker at once. Running one micro-batch at a time holds exactly that, so
    the answer is the heaviest worker's sum of stage sizes (1 by default).
    """
    held = [0.0] * num_workers
    for s, w in enumerate(registry.stage_worker(placement, num_workers, chunks)):
        held[w] += stage_sizes[s]
    return max(held)


def _chunks(num_stages: int, p: int, m: int, chunks: int | None) -> int:
    if p < 1 or m < 1:
        raise ValueError(f"need at least one worker and one micro-batch, got p={p}, m={m}")
    if num_stages % p:
        raise ValueError(
            f"the costs describe {num_stages} stages, which {p} workers cannot share "
            f"equally; give a multiple of {p} stages"
        )
    if chunks is not None and chunks * p != num_stages:
        raise ValueError(
            f"chunks={chunks} stages per worker on {p} workers is {chunks * p} stages, "
            f"but the costs describe {num_stages}"
        )
    return num_stages // p


def _sizes(stage_sizes: Sequence[float] | None, n: int, p: int) -> tuple[float, ...]:
    if stage_sizes is None:
        return (p / n,) * n
    sizes = tuple(float(x) for x in stage_sizes)
    if len(sizes) != n or not all(math.isfinite(x) and x >= 0 for x in sizes):
        raise ValueError(f"stage_sizes needs {n} finite sizes >= 0 (one per stage), got {sizes}")
    return sizes


def _feasible_placements(
    placement: Placement | None, p: int, v: int, sizes: tuple[float, ...], cap: float
) -> list[Placement]:
    """Return the placements to try, those where ``cap`` can be met; raise if none."""
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS} or None, not {placement!r}")
    # with one stage per worker both placements are the same one
    tried: list[Placement] = [placement] if placement else ["looped"] if v == 1 else ["looped", "v"]
    need = {pl: smallest_cap(p, v, pl, sizes) for pl in tried}
    fits = [pl for pl in tried if need[pl] <= cap + MEMORY_SLACK * max(1.0, abs(cap))]
    if not fits:
        best = min(need, key=lambda pl: need[pl])
        where = f" with the {best} placement" if v > 1 else ""
        raise ValueError(
            f"memory cap {cap:g} is below what any schedule can meet: one micro-batch fills "
            f"every stage of a worker at once, so the smallest feasible cap{where} is "
            f"{need[best]:g}"
        )
    return fits


def _splits(costs: Costs, split_backward: bool | None) -> list[bool]:
    if split_backward is not None:
        return [split_backward]
    cheap = all(
        i + w <= b * (1 + 1e-9) + 1e-12
        for i, w, b in zip(costs.input_grad, costs.weight_grad, costs.backward, strict=True)
    )
    return [True] if cheap else [False, True]


def _scored(prob: Problem, lists: Lists) -> Scored | None:
    """Return (score, lists), or None if ``lists`` deadlock or break the cap."""
    if any(peak_memory(prob, acts) > prob.limit for acts in lists):
        return None
    finish = finish_times(prob, lists)
    return None if finish is None else (score(finish, lists), lists)


def _naive(prob: Problem) -> Lists:
    """One micro-batch at a time: meets any feasible cap, the search's fallback."""
    lists: Lists = [[] for _ in range(prob.num_workers)]
    order = range(prob.num_stages)
    for k in range(prob.num_microbatches):
        for s in order:
            lists[prob.stage_worker[s]].append(prob.code(F, s, k))
        for s in reversed(order):
            lists[prob.stage_worker[s]].append(prob.code(G, s, k))
            if prob.split:  # W at once, so the memory is free before the next micro-batch
                lists[prob.stage_worker[s]].append(prob.code(W, s, k))
    return lists


def _seeds(problems: list[Problem], budget: Budget) -> list[tuple[int, Lists]]:
    """Return the registered schedules that can run each problem's placement, as lists.

    Each is built as its generator gives it and checked here rather than by
    :func:`validate` (a few times slower than building): it must hold every action once,
    keep its streams in order, and run (:func:`_scored` checks the last, and the cap)."""
    found: list[tuple[int, Lists]] = []
    for i, prob in enumerate(problems):
        p, m = prob.num_workers, prob.num_microbatches
        v = prob.num_stages // p
        expected = list(range(prob.num_actions))  # the codes of F, G (and W) are 0..N-1
        for spec in registry.specs():
            if spec.name == NAME or spec.problems(p, m, v):
                continue
            if spec.stage_worker(p, v) != prob.stage_worker:
                continue
            if not budget.take(SEED_COST * prob.num_actions):
                return found
            try:
                schedule = spec.build(p, m, v)
            except Exception:  # a generator that fails on these sizes is simply no seed
                continue
            if schedule.stage_worker != prob.stage_worker or stream_order_problems(schedule):
                continue
            lists = from_schedule(prob, schedule)
            if lists is not None and sorted(a for acts in lists for a in acts) == expected:
                found.append((i, lists))
    return found


# -- the registry entry: unit costs under 1F1B's memory -----------------------------------------


@lru_cache(maxsize=128)
def unit_schedule(num_workers: int, num_microbatches: int, chunks: int = 1) -> Schedule:
    """``auto`` for equal stages (a worker's F = 1, I = W = 1, shared by its v stages)
    under 1F1B's memory, min(p, m); cached, so that every caller in a process, and every
    worker of a pipeline (no time limit), gets the same schedule."""
    from layerwise.simulate import Costs  # it imports this package

    p, m, v = num_workers, num_microbatches, chunks
    costs = Costs.uniform(p * v, 1.0 / v, 2.0 / v, weight_grad=1.0 / v)
    return search(
        costs, p, m, float(min(p, m)), "looped", v, time_limit_s=None, split_backward=True,
        work=REGISTRY_WORK,
    ).schedule  # fmt: skip


@lru_cache(maxsize=128)
def _unit_peaks(num_workers: int, num_microbatches: int, chunks: int) -> tuple[int, ...]:
    """Per worker, the activations :func:`unit_schedule` holds at peak, as the simulator
    counts them (a synthesized order has no closed form to declare)."""
    from layerwise.simulate import Costs, simulate  # they import this package

    schedule = unit_schedule(num_workers, num_microbatches, chunks)
    timeline = simulate(schedule, Costs.uniform(schedule.num_stages))
    return tuple(timeline.peak_inflight(w) for w in range(num_workers))


register(
    ScheduleSpec(
        name=NAME,
        generator=unit_schedule,
        description="searched for the stages' own costs under a memory cap (synthesize); "
        "by name: equal stages, split backward, 1F1B's peak memory",
        # The order is searched, not a pattern: the entry declares what simulating it gives.
        peak_inflight=lambda p, m, v, w: _unit_peaks(p, m, v)[w],
        chunks_allowed=(1, None),
        split_backward=True,
    )
)
