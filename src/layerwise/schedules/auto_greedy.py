"""List scheduling for :mod:`auto`: play the step forward in time and, each time a worker
is free, let a :class:`Rule` pick its next action among those whose inputs have arrived.

Every stage runs its forwards and its input gradients in micro-batch order, which keeps
each stream of messages in order (NCCL matches messages by order) and leaves a worker only
a few choices: the next forward of one of its stages, the next input gradient of one of
them, or a pending weight gradient. A forward is taken only if the worker's held memory
stays under the cap, and only while fewer micro-batches than the rule's *window* wait on the
worker for their gradient (1F1B's warm-up depth, generalised to uneven costs by
:func:`windows`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from layerwise.schedules.auto_problem import NONE, F, G, Problem, W, finish_times

Reserve = Literal["full", "one"]
NEAR = 1.02  # a placement this much slower after coordinate descent gets no more rules


@dataclass(frozen=True)
class Rule:
    """How a free worker picks its next action."""

    window: tuple[int, ...]  # per worker: most micro-batches admitted but not back yet
    backward_first: bool = False  # a ready I/B before a ready F (else F while in window)
    deepest_forward: bool = True  # among ready F's, the latest stage (else a new micro-batch)
    eager_w: bool = False  # W right after its I (a full backward in two); else W fills gaps
    wait_for_input: bool = False  # leave a gap rather than start a W that delays an I or F
    # "full": admit a micro-batch only with room left for all the stages on this worker of
    # every admitted one, which cannot deadlock; "one": only with room for its own stages,
    # which holds more in flight and may deadlock (the search then drops the rule).
    reserve: Reserve = "full"


def windows(prob: Problem, with_weight: bool, extra: int) -> tuple[int, ...]:
    """Return per worker the warm-up depth that keeps it busy until its first gradient.

    The first micro-batch's gradient comes back to worker w after a round trip through
    the later stages (their F and I/B, and the hand-offs); meanwhile the pipeline admits one
    micro-batch per period, the busiest worker's work per micro-batch. So w needs
    1 + ceil(round trip / period) micro-batches in flight: ``p - w`` for 1F1B's costs.
    ``with_weight`` counts W in the period (else W is assumed to fill bubbles).
    """
    n, p = prob.num_stages, prob.num_workers
    work = [0.0] * p
    for s in range(n):
        extra_w = prob.weight[s] if with_weight and prob.split else 0.0
        work[prob.stage_worker[s]] += prob.forward[s] + prob.grad[s] + extra_w
    period = max(max(work), 1e-12)
    depth = []
    for w in range(p):
        first = prob.stages_of(w)[0]
        trip = sum(prob.forward[s] + prob.grad[s] for s in range(first + 1, n))
        trip += 2 * sum(prob.hop[first:])
        depth.append(1 + math.ceil(trip / period - 1e-9) + extra)
    return tuple(max(1, min(d, prob.num_microbatches)) for d in depth)


class _State:
    """What the play-forward knows at the current time."""

    def __init__(self, prob: Problem) -> None:
        n, p = prob.num_stages, prob.num_workers
        self.finish = [-1.0] * len(prob.tables.duration)
        self.next_f = [0] * n
        self.next_g = [0] * n
        self.pending_w: list[deque[int]] = [deque() for _ in range(p)]
        self.held = [0.0] * p
        self.admitted = [0] * p  # micro-batches whose first F here is done, first I/B not
        self.need = [0.0] * p  # sizes of the F's admitted micro-batches still owe here
        self.free = [0.0] * p
        self.lists: list[list[int]] = [[] for _ in range(p)]


def list_schedule(prob: Problem, rule: Rule) -> list[list[int]] | None:
    """Return per-worker action lists built by ``rule``, or None if it deadlocks."""
    st = _State(prob)
    stages = [prob.stages_of(w) for w in range(prob.num_workers)]
    footprint = [sum(prob.size[s] for s in ss) for ss in stages]
    tail = _tails(prob)
    heap = [(0.0, w) for w in range(prob.num_workers)]
    left = prob.num_actions
    while heap and left:
        now, w = heapq.heappop(heap)
        if st.free[w] > now:
            continue  # busy: its own finish is queued
        pick = _choose(prob, rule, st, w, now, stages[w], footprint[w], tail)
        if pick is None:
            continue  # an arrival will wake it
        if isinstance(pick, float):
            heapq.heappush(heap, (pick, w))  # it chose to wait for an input
            continue
        end = now + prob.tables.duration[pick]
        _commit(prob, st, w, pick, end, stages[w][0], footprint[w])
        left -= 1
        heapq.heappush(heap, (end, w))
        for action, lag in prob.tables.feeds[pick]:
            owner = prob.tables.worker[action]
            if owner != w:
                heapq.heappush(heap, (end + lag, owner))
    return st.lists if left == 0 else None


def _tails(prob: Problem) -> list[float]:
    """Per stage: the backward work from its I/B down to stage 0's, the critical tail."""
    tail, acc = [0.0] * prob.num_stages, 0.0
    for s in range(prob.num_stages):
        acc += prob.grad[s] + (prob.hop[s - 1] if s > 0 else 0.0)
        tail[s] = acc
    return tail


def _arrival(prob: Problem, st: _State, action: int) -> float | None:
    """Return when ``action``'s inputs are all there, None if one is not yet scheduled."""
    d1, lag1, d2, lag2 = prob.tables.dep[action]
    t = 0.0
    for d, lag in ((d1, lag1), (d2, lag2)):
        if d != NONE:
            if st.finish[d] < 0:
                return None
            t = max(t, st.finish[d] + lag)
    return t


def _choose(
    prob: Problem,
    rule: Rule,
    st: _State,
    w: int,
    now: float,
    stages: list[int],
    footprint: float,
    tail: list[float],
) -> int | float | None:
    """Return the action code ``w`` runs now, a time to wake up at, or None to sleep."""
    m = prob.num_microbatches
    if rule.eager_w and st.pending_w[w]:
        return st.pending_w[w][0]
    grads, forwards, soon = [], [], math.inf
    g_base = prob.num_stages * m  # codes: (kind * n + stage) * m + micro-batch
    for s in stages:
        k = st.next_g[s]
        if k < st.next_f[s]:
            g = g_base + s * m + k
            t = _arrival(prob, st, g)
            if t is not None and t <= now:
                grads.append((-tail[s], k, g))
            elif t is not None:
                soon = min(soon, t)
        k = st.next_f[s]
        if k < m and _fits(prob, rule, st, w, s, stages[0], footprint):
            f = s * m + k
            t = _arrival(prob, st, f)
            if t is not None and t <= now:
                forwards.append((-s if rule.deepest_forward else s, f))
            elif t is not None:
                soon = min(soon, t)
    if grads and (rule.backward_first or not forwards):
        return min(grads)[2]
    if forwards:
        return min(forwards)[1]
    if st.pending_w[w]:
        first = st.pending_w[w][0]
        if rule.wait_for_input and soon < now + prob.tables.duration[first]:
            return soon
        return first
    return None


def _fits(
    prob: Problem, rule: Rule, st: _State, w: int, s: int, entry: int, footprint: float
) -> bool:
    """Whether the next F of stage ``s`` may start on ``w``: window and memory."""
    if s != entry:  # an admitted micro-batch going on
        return rule.reserve == "full" or st.held[w] + prob.size[s] <= prob.limit
    if st.admitted[w] >= rule.window[w]:
        return False
    if rule.reserve == "full":  # room for the rest of every admitted micro-batch, and this
        return st.held[w] + st.need[w] + footprint <= prob.limit
    return st.held[w] + footprint <= prob.limit  # room for this one micro-batch's stages


def _commit(
    prob: Problem, st: _State, w: int, a: int, end: float, entry: int, footprint: float
) -> None:
    """Record that ``w`` runs ``a`` until ``end``."""
    kind, s = prob.tables.kind[a], prob.tables.stage[a]
    st.finish[a], st.free[w] = end, end
    st.lists[w].append(a)
    st.held[w] += prob.tables.memory[a]
    if kind == F:
        st.next_f[s] += 1
        if s == entry:
            st.admitted[w] += 1
            st.need[w] += footprint - prob.size[s]
        else:
            st.need[w] -= prob.size[s]
    elif kind == G:
        st.next_g[s] += 1
        if s == entry:
            st.admitted[w] -= 1
        if prob.split:
            st.pending_w[w].append(prob.code(W, s, st.next_g[s] - 1))
    else:
        st.pending_w[w].remove(a)


# -- which rules to try ------------------------------------------------------------------------

Point = tuple[int, ...]  # an index into each dimension of the rule space
Dimension = list[dict[str, Any]]  # ways to set one part of a rule: fields of Rule


def rule_space(prob: Problem) -> list[Dimension]:
    """Return the dimensions of the rules worth trying, the usual best first in each.
    Switches that cannot matter for ``prob`` (W's place with an unsplit backward; which
    stage first, and how much room to keep, with one stage per worker) are left out, so
    that no rule is tried twice."""
    p, m = prob.num_workers, prob.num_microbatches
    depths = [
        windows(prob, with_weight, extra)
        for extra in (0, 1, 2, -1, 3, 4)
        for with_weight in ((False, True) if prob.split else (False,))
    ]
    depths.append((m,) * p)  # memory as the only limit
    dims: list[Dimension] = [
        [{"window": d} for d in dict.fromkeys(depths)],
        [{"backward_first": False}, {"backward_first": True}],
    ]
    if prob.split:
        dims.append([{}, {"eager_w": True}, {"wait_for_input": True}])
    if prob.num_stages > p:
        dims.append([{"deepest_forward": True}, {"deepest_forward": False}])
        dims.append([{"reserve": "full"}, {"reserve": "one"}])
    return dims


def _rule(dims: list[Dimension], point: Point) -> Rule:
    fields: dict[str, Any] = {}
    for dim, i in zip(dims, point, strict=True):
        fields.update(dim[i])
    return Rule(**fields)


def tried_rules(
    problems: Sequence[Problem], afford: Callable[[Problem], bool]
) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (problem index, lists) for every rule that ran to completion.

    Rules are searched on each problem, round by round: coordinate descent (the windows,
    then each other switch alone, from the best point so far, twice), then every other
    point of the space, nearest the best first (fewest switches changed), on the problems
    that came within :data:`NEAR` of the best. ``afford`` is asked before each run and
    ends the search when it says no."""
    spaces = [rule_space(prob) for prob in problems]
    best: list[tuple[float, Point]] = [(math.inf, (0,) * len(d)) for d in spaces]
    tried: list[set[Point]] = [set() for _ in problems]
    for round_ in (0, 1, 0, 1, 2):  # 0: the window; 1: the other switches; 2: the rest
        rounds = [_round(dims, best[i][1], round_) for i, dims in enumerate(spaces)]
        if round_ == 2:  # the rest only where coordinate descent came near the best
            lead = min(step for step, _ in best)
            rounds = [r if best[i][0] <= NEAR * lead else [] for i, r in enumerate(rounds)]
        # one point of each problem in turn, so that a short budget shares out evenly
        for points in itertools.zip_longest(*rounds):
            for i, point in enumerate(points):
                if point is None or point in tried[i]:
                    continue
                tried[i].add(point)
                if not afford(problems[i]):
                    return
                lists = list_schedule(problems[i], _rule(spaces[i], point))
                finish = None if lists is None else finish_times(problems[i], lists)
                if lists is None or finish is None:
                    continue
                if max(finish) < best[i][0]:
                    best[i] = (max(finish), point)
                yield i, lists


def _round(dims: list[Dimension], best: Point, round_: int) -> list[Point]:
    """Return the points of one round around ``best``."""
    if round_ < 2:
        axes = [0] if round_ == 0 else list(range(1, len(dims)))
        return [(*best[:a], i, *best[a + 1 :]) for a in axes for i in range(len(dims[a]))]
    everything = itertools.product(*(range(len(d)) for d in dims))
    return sorted(everything, key=lambda pt: sum(x != y for x, y in zip(pt, best, strict=True)))
