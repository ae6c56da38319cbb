"""The one place the planner calls the core simulator, to time the pipeline of a layout.

The bubble is not re-derived with a closed formula: the schedule is generated and simulated
exactly as ``layerwise simulate`` would. Results are cached on the shape of the problem in
units of one chunk's forward time, because the search asks for the same few shapes
thousands of times and a p=64, m=512 simulation takes about a second.

Even splits of full training keep the cache of one chunk shape (backward/forward ratio,
output-layer share); other splits and modes (:func:`pipeline_time_split`) are cached on the
layers of every stage and the same kind of rounded ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

from layerwise.schedules import Schedule, forward_only, generate, interleaved_form
from layerwise.simulate import Costs, simulate


def schedule_name(schedule: str, vpp: int) -> str:
    """Returns the registered schedule a layout runs: its own with one chunk per worker, or
    with vpp > 1 the one that interleaves it (unchanged if none does: generating it then
    fails with the schedule's own message)."""
    if vpp == 1:
        return schedule
    return interleaved_form(schedule) or schedule


# Steps with more than this many micro-batches per worker are extrapolated (see below).
EXTRAPOLATE_ABOVE = 2
# Uneven stages: steps of up to this many (stage, micro-batch) pairs are simulated in full.
FULL_STAGE_STEPS = 2000


@lru_cache(maxsize=1024)
def _schedule(schedule: str, p: int, m: int, v: int) -> Schedule:
    """Returns the generated (and validated) schedule; many cost ratios share one."""
    return generate(schedule_name(schedule, v), num_workers=p, num_microbatches=m, chunks=v)


@lru_cache(maxsize=4096)
def _simulate_units(
    schedule: str, p: int, m: int, v: int, backward_ratio: float, head_units: float
) -> tuple[float, float]:
    """Returns (makespan in chunk-forward units, bubble fraction) of one simulated step.

    Every chunk costs forward 1 and backward ``backward_ratio``; the last chunk (on the
    last worker) also runs the output layer, ``head_units`` forward and twice that backward.
    """
    # Busy time summed over workers: every stage runs every micro-batch once.
    busy = m * (p * v * (1 + backward_ratio) + 3 * head_units)
    if m > EXTRAPOLATE_ABOVE * p:
        # Past the warm-up the schedule repeats every p micro-batches, so the makespan grows
        # linearly in m: take the slope from two simulated steps (p and 2p micro-batches).
        # tests/test_planner_search.py checks this against full simulations.
        short, longer = (_simulate_units(schedule, p, k * p, v, backward_ratio, head_units)
                         for k in (1, 2))  # fmt: skip
        makespan = longer[0] + (m - 2 * p) * (longer[0] - short[0]) / p
        return makespan, 1.0 - busy / (p * makespan)
    sched = _schedule(schedule, p, m, v)
    n = sched.num_stages
    forward = [1.0] * n
    backward = [backward_ratio] * n
    forward[-1] += head_units
    backward[-1] += 2 * head_units
    timeline = simulate(sched, Costs.per_stage(forward, backward))
    return timeline.makespan(), timeline.bubble_fraction()


def pipeline_time(
    schedule: str, p: int, m: int, v: int, chunk_forward: float, chunk_backward: float, head: float
) -> tuple[float, float]:
    """Returns (seconds, bubble fraction) of the pipeline part of a step.

    ``chunk_forward``/``chunk_backward`` are one micro-batch through one chunk (a worker's
    stage divided by ``v``); ``head`` is the extra forward of the output layer.
    """
    if p == 1:
        # No pipeline: micro-batches run back to back (gradient accumulation), no bubble.
        return m * (v * (chunk_forward + chunk_backward) + 3 * head), 0.0
    # Rounding the ratios (5 % steps for backward/forward, 10 % for the output layer, which
    # only the last worker runs) keeps the cache small; rescaling by the exact work per
    # micro-batch removes most of the rounding error.
    ratio = _round(chunk_backward / chunk_forward, 0.05)
    head_units = _round(head / chunk_forward, 0.1)
    units, bubble = _simulate_units(schedule, p, m, v, ratio, head_units)
    exact = 1 + chunk_backward / chunk_forward + 3 * head / chunk_forward / v
    rounded = 1 + ratio + 3 * head_units / v
    return units * chunk_forward * exact / rounded, bubble


def _round(x: float, step: float) -> float:
    """Returns ``x`` on a logarithmic grid of relative ``step`` (0 below ``step`` itself)."""
    if x < step:
        return 0.0
    return round(math.exp(round(math.log(x) / math.log1p(step)) * math.log1p(step)), 4)


@lru_cache(maxsize=4096)
def _simulate_stages(
    schedule: str,
    p: int,
    m: int,
    v: int,
    forward: tuple[float, ...],
    backward: tuple[float, ...],
    only_forward: bool,
) -> tuple[float, float]:
    """Returns (makespan, bubble fraction) of one step with these per-stage costs.

    Uneven stages can take more than one period of p micro-batches to settle, so a step is
    simulated in full up to FULL_STAGE_STEPS (stage, micro-batch) pairs. Longer ones are
    extrapolated linearly from k p and (k+1) p micro-batches for the first k after which the
    makespan grows by the same amount over more periods (checked by simulation): two more
    with one stage per worker, three more when interleaved, whose warm-up is longer.
    """
    busy = m * (sum(forward) + (0.0 if only_forward else sum(backward)))
    periods = 3 if v == 1 else 4
    k = 1
    while p * v * m > FULL_STAGE_STEPS and m > (k + periods - 1) * p:
        spans = [_simulate_stages(schedule, p, j * p, v, forward, backward, only_forward)[0]
                 for j in range(k, k + periods)]  # fmt: skip
        slopes = [b - a for a, b in pairwise(spans)]
        if all(math.isclose(x, slopes[0], rel_tol=1e-9) for x in slopes):
            makespan = spans[1] + (m - (k + 1) * p) * slopes[0] / p
            return makespan, 1.0 - busy / (p * makespan)
        k += 1
    sched = _schedule(schedule, p, m, v)
    if only_forward:
        sched = forward_only(sched)
    makespan = simulate(sched, Costs.per_stage(forward, backward)).makespan()
    # every stage runs every micro-batch once: the busy time needs no pass over the events
    return makespan, 1.0 - busy / (p * makespan)


@dataclass(frozen=True)
class SplitCosts:
    """Seconds per micro-batch of a pipeline whose stages hold ``split`` layers each: every
    stage costs its layers plus one send each way; the last also runs the output layer."""

    split: tuple[int, ...]  # transformer layers of each stage, in model order
    layer_forward: float
    layer_backward: float
    send_forward: float
    send_backward: float
    head_forward: float
    head_backward: float

    def stages(self) -> tuple[list[float], list[float]]:
        """Returns the forward and backward seconds of every stage."""
        fwd = [n * self.layer_forward + self.send_forward for n in self.split]
        bwd = [n * self.layer_backward + self.send_backward for n in self.split]
        fwd[-1] += self.head_forward
        bwd[-1] += self.head_backward
        return fwd, bwd


def pipeline_time_split(
    schedule: str, p: int, m: int, v: int, costs: SplitCosts, only_forward: bool = False
) -> tuple[float, float]:
    """Returns (seconds, bubble fraction) of the pipeline part of a step with per-stage
    costs; ``only_forward`` runs the schedule's forwards alone (inference).

    As in :func:`pipeline_time`, the costs are simulated in units of one layer's forward,
    the ratios rounded (5 % for the backward, 10 % for sends and the output layer) so that
    layouts of one shape share a simulation, and the result is rescaled by the exact work.
    """
    fwd, bwd = costs.stages()
    work = sum(fwd) + (0.0 if only_forward else sum(bwd))
    if p == 1:
        return m * work, 0.0
    unit = costs.layer_forward
    units = SplitCosts(
        costs.split, 1.0, _round(costs.layer_backward / unit, 0.05),
        _round(costs.send_forward / unit, 0.1), _round(costs.send_backward / unit, 0.1),
        _round(costs.head_forward / unit, 0.1), _round(costs.head_backward / unit, 0.1),
    )  # fmt: skip
    ufwd, ubwd = units.stages()
    makespan, bubble = _simulate_stages(schedule, p, m, v, tuple(ufwd), tuple(ubwd), only_forward)
    rounded = sum(ufwd) + (0.0 if only_forward else sum(ubwd))
    return makespan * work / rounded, bubble
