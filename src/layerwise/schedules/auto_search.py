"""Local search for :mod:`auto`: reorder one worker's actions at a time while the step gets
shorter, the memory stays under the cap and every stream stays in micro-batch order.

The step ends when its last action does; following back from it, each action was held up
either by an input (another action and its hand-off) or by its own worker being busy. Only
the second kind can be shortened by reordering one worker's list, so the first moves are
those of job-shop local search on the critical path's runs of worker-bound actions
("blocks"): swap two neighbours, move the last action of a block to its front or the first
to its end, and move a weight gradient on the path back into an earlier idle gap of its
worker (weight gradients wait for nobody, which makes them good fillers). Next come the
actions anywhere that waited for their own worker, longest wait first, moved to when their
inputs arrived; last, any two neighbours. A move is kept when it shortens the step, or
keeps it and ends the workers earlier in total (so the search crosses plateaus where
several paths are equally long); the search stops at a local optimum or when its
:class:`Budget` is spent.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence

from layerwise.schedules.auto_problem import NONE, Problem, W, finish_times, peak_memory

_EPS = 1e-9


class Budget:
    """Work the search may still do, counted in simulated actions, and a wall-clock limit.

    Every candidate costs its number of actions (a list-scheduling run a few times more),
    so a problem's budget bounds its number of simulations whatever the machine's speed;
    the deadline only guards against a slow or loaded machine.
    """

    def __init__(self, units: int, seconds: float | None) -> None:
        self.units = units
        self.used = 0
        self.simulations = 0
        # stop a little early: building and validating the result takes time too
        self.deadline = None if seconds is None else time.perf_counter() + 0.8 * seconds

    def take(self, units: int, share: float = 1.0) -> bool:
        """Spend ``units`` if that keeps the work within ``share`` of the budget (and the
        clock within the limit); return whether it did."""
        if self.used + units > share * self.units:
            return False
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return False
        self.used += units
        self.simulations += 1
        return True


def score(finish: list[float], lists: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Return (step, sum of the workers' end times): lower is better, the step first."""
    ends = [finish[acts[-1]] if acts else 0.0 for acts in lists]
    return max(ends), sum(ends)


def improve(
    prob: Problem, lists: list[list[int]], budget: Budget
) -> tuple[list[list[int]], tuple[float, float]]:
    """Return ``lists`` after local search, and their score."""
    finish = finish_times(prob, lists)
    assert finish is not None, "local search starts from a schedule that runs"
    best = score(finish, lists)
    improved = True
    while improved:
        improved = False
        for w, new in _moves(prob, lists, finish):
            if peak_memory(prob, new) > prob.limit:
                continue
            if not budget.take(prob.num_actions):
                return lists, best
            trial = [new if v == w else acts for v, acts in enumerate(lists)]
            got = finish_times(prob, trial)
            if got is None:
                continue  # deadlocks through another worker
            new_score = score(got, trial)
            if new_score[0] < best[0] - _EPS or (
                new_score[0] <= best[0] + _EPS and new_score[1] < best[1] - _EPS
            ):
                lists, finish, best, improved = trial, got, new_score, True
                break
    return lists, best


def _critical_blocks(
    prob: Problem, lists: Sequence[Sequence[int]], finish: list[float]
) -> list[tuple[int, int, int]]:
    """Return the critical path's runs of worker-bound actions as (worker, first, last)
    positions, latest first."""
    tables = prob.tables
    where = {a: (w, i) for w, acts in enumerate(lists) for i, a in enumerate(acts)}
    a = max(where, key=lambda x: finish[x])
    blocks: list[tuple[int, int, int]] = []
    while True:
        w, i = where[a]
        start = finish[a] - tables.duration[a]
        d1, lag1, d2, lag2 = tables.dep[a]
        by_input = next(
            (
                d
                for d, lag in ((d1, lag1), (d2, lag2))
                if d != NONE and finish[d] + lag >= start - _EPS
            ),
            None,
        )
        by_worker = i > 0 and finish[lists[w][i - 1]] >= start - _EPS
        if by_worker and by_input is None:
            if blocks and blocks[-1][0] == w and blocks[-1][1] == i:
                blocks[-1] = (w, i - 1, blocks[-1][2])
            else:
                blocks.append((w, i - 1, i))
            a = lists[w][i - 1]
        elif by_input is not None:
            a = by_input
        else:
            return blocks


def _moves(
    prob: Problem, lists: Sequence[Sequence[int]], finish: list[float]
) -> Iterator[tuple[int, list[int]]]:
    """Yield (worker, its new list) for each move, most promising first: the critical
    path's blocks, then actions that waited for their own worker (longest wait first),
    then every swap of two neighbours."""
    tried: set[tuple[int, int, int]] = set()

    def move(w: int, src: int, dst: int) -> list[int] | None:
        if src == dst or (w, src, dst) in tried:
            return None
        tried.add((w, src, dst))
        return _moved(prob, lists[w], src, dst)

    for w, first, last in _critical_blocks(prob, lists, finish):
        acts = lists[w]
        pairs = [(last, first), (first, last)] + [(i, i - 1) for i in range(last, first, -1)]
        pairs += [
            (i, gap)
            for i in range(last, first - 1, -1)
            if prob.decode(acts[i])[0] == W
            for gap in _idle_gaps(prob, acts, finish, i)
        ]
        for src, dst in pairs:
            if (new := move(w, src, dst)) is not None:
                yield w, new
    for _, w, src, dst in _waits(prob, lists, finish):
        for target in (dst, src - 1):
            if (new := move(w, src, target)) is not None:
                yield w, new
    # Last, any two neighbours: affordable on small problems, where the budget allows
    # many passes, and cut short by the budget on large ones.
    for w, acts in enumerate(lists):
        for i in range(len(acts) - 1, 0, -1):
            if (new := move(w, i, i - 1)) is not None:
                yield w, new


def _waits(
    prob: Problem, lists: Sequence[Sequence[int]], finish: list[float]
) -> list[tuple[float, int, int, int]]:
    """Return (wait, worker, position, target) for each action that started later than its
    inputs arrived because its worker was busy, longest wait first: the target is just
    after the action its worker was running when the inputs arrived."""
    tables = prob.tables
    found = []
    for w, acts in enumerate(lists):
        ends = [finish[a] for a in acts]
        for i, a in enumerate(acts):
            d1, lag1, d2, lag2 = tables.dep[a]
            ready = max(
                finish[d1] + lag1 if d1 != NONE else 0.0, finish[d2] + lag2 if d2 != NONE else 0.0
            )
            wait = finish[a] - tables.duration[a] - ready
            if wait > _EPS and i > 0:  # so acts[i - 1] ended after ``ready``
                running = bisect.bisect_right(ends, ready + _EPS, 0, i)
                found.append((wait, w, i, min(running + 1, i - 1)))
    found.sort(key=lambda x: -x[0])
    return found


def _idle_gaps(prob: Problem, acts: Sequence[int], finish: list[float], i: int) -> list[int]:
    """Positions before ``i``, latest first, where the worker idled before the action there
    (after ``acts[i]``'s own input gradient): places a weight gradient could fill."""
    dur = prob.tables.duration
    own = prob.tables.dep[acts[i]][0]
    gaps = []
    for j in range(i - 1, 0, -1):
        if finish[acts[j]] - dur[acts[j]] > finish[acts[j - 1]] + _EPS:
            gaps.append(j)
            if len(gaps) == 3:
                break
        if acts[j - 1] == own:  # no earlier: W needs its I
            break
    return gaps


def _moved(prob: Problem, acts: Sequence[int], src: int, dst: int) -> list[int] | None:
    """Return ``acts`` with the action at ``src`` moved to position ``dst``, or None if that
    would put an action before one it needs, or two of one stream out of order."""
    a = acts[src]
    earlier = dst < src
    passed = acts[dst:src] if earlier else acts[src + 1 : dst + 1]
    deps = prob.tables.dep
    kind, stage, _ = prob.decode(a)
    for b in passed:
        b_kind, b_stage, _ = prob.decode(b)
        if b_stage == stage and b_kind == kind and kind != W:
            return None  # one stream (F, or I/B, of one stage) keeps micro-batch order
        needs, needed = (a, b) if earlier else (b, a)  # ``needs`` will come first
        d1, _, d2, _ = deps[needs]
        if needed in (d1, d2):
            return None
    new = list(acts)
    del new[src]
    new.insert(dst, a)
    return new
