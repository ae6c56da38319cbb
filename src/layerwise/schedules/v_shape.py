"""V-shape schedules (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory",
NeurIPS 2024): two stages per worker placed in a V, and the backward split into I and W.

Worker w holds stage w (its first chunk) and stage 2p-1-w (its second)::

    stage    0  1  2  3  4  5  6  7        p = 4, eight stages
    worker   0  1  2  3  3  2  1  0

A micro-batch goes down the workers through the first chunks and back up through the second
ones, so it starts and ends on worker 0, and every worker keeps an activation for about the
same time: the first chunk of worker w is held for a round trip of 4p - 2w stages, its second
chunk for 2w + 2, so each worker's sum is about 4p. That balance is what lets a memory limit
per worker decide the whole schedule's memory.

The paper builds its schedules from repeating building blocks. Here v-min is built that way
(:mod:`v_blocks`); zb-v and v-half come from one list scheduler, on unit costs (F = I = W = 1
per chunk) and a limit on the (stage, micro-batch) activations a worker holds, counted from
the start of F to the end of W as ``Timeline.peak_inflight`` counts them. A chunk is half a
1F1B stage, so 1F1B's first worker, holding p whole-stage activations, holds 2p chunk
activations.

=========  ======================  ==============================================
schedule   limit (chunks)          the paper's figure (whole-stage micro-batches)
=========  ======================  ==============================================
zb-v       2p                      p, as 1F1B
v-half     min(p + 2, 2p)          (p + 2) // 2, about half of 1F1B
v-min      2 * ((p + 4) // 3)      (p + 4) // 3, about a third of 1F1B
=========  ======================  ==============================================

A list-scheduled worker's peak is ``min(limit, 2m)``: the scheduler fills the limit whenever
there are micro-batches enough; v-min's block stays within its limit and its peak per worker
is whatever its order gives. With F = I = W, zb-v has no idle time but the start-up (worker w
cannot start before w forwards have passed), so a step takes 6m + p - 1 units; v-half and
v-min idle a fixed time more in the warm-up and cool-down, whatever m. v-half is built both
ways, by the list scheduler and from a block with a unit of slack per worker on the way up
(within the same limit), and the one with the shorter step on unit costs is kept: the list
scheduler's idle time grows with p (7.7 % of the step at p = 4, 18.1 % at p = 16, m = 4p),
the block's much less (9.4 %, 11.9 %), so the block wins from p = 8 on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import lru_cache

# imported for their registry entries: the one-stage schedules come first in every listing
from layerwise.schedules import generators, zero_bubble  # noqa: F401
from layerwise.schedules.ir import Action, Schedule, ScheduleError, check_sizes
from layerwise.schedules.registry import ScheduleSpec, register, stage_worker
from layerwise.schedules.v_blocks import block_lists, order_peak, tight_block, tight_block_peaks

CHUNKS = 2  # stages per worker in a V


def zb_v_limit(num_workers: int) -> int:
    """Return zb-v's limit in chunk activations: 1F1B's peak, p whole stages."""
    return 2 * num_workers


def v_half_limit(num_workers: int) -> int:
    """Return v-half's limit in chunk activations: half of 1F1B's 2p, plus two (but never
    more than zb-v's 2p, which one worker would otherwise pass).

    The paper gives (p + 2) // 2 whole stages; counted in chunks rather than rounded down to
    whole stages, odd p keeps its last chunk, without which the bubble grows with m."""
    return min(num_workers + 2, zb_v_limit(num_workers))


def v_min_limit(num_workers: int) -> int:
    """Return v-min's limit in chunk activations: (p + 4) // 3 whole stages."""
    return 2 * ((num_workers + 4) // 3)


class _ListScheduler:
    """Greedy list scheduling of a V on unit costs, one time unit at a time.

    A free worker runs, in this order of preference: a ready forward that fits under the
    memory limit (its second chunk before its first: that forward turns a micro-batch back
    towards the loss and frees memory soonest); else a ready input gradient I, the oldest
    micro-batch first; else its oldest pending weight gradient W. Each stage runs its F and
    its I in micro-batch order, as the order-matched transports need.
    """

    def __init__(self, num_workers: int, num_microbatches: int, limit: int, fill: bool) -> None:
        self.p, self.m, self.limit, self.fill = num_workers, num_microbatches, limit, fill
        self.num_stages = CHUNKS * num_workers
        self.finish: dict[Action, int] = {}
        self.lists: list[list[Action]] = [[] for _ in range(num_workers)]
        self.next_f = [0] * self.num_stages
        self.next_i = [0] * self.num_stages
        self.pending_w: list[deque[Action]] = [deque() for _ in range(num_workers)]
        self.held = [0] * num_workers  # chunk activations: F started, W not yet done
        self.free_at = [0] * num_workers
        self.remaining = 3 * self.num_stages * num_microbatches

    def second(self, worker: int) -> int:
        return self.num_stages - 1 - worker

    def done_by(self, action: Action, t: int) -> bool:
        return self.finish.get(action, t + 1) <= t

    def room(self, worker: int, stage: int) -> bool:
        """Whether ``worker`` may start a forward of ``stage`` without passing the limit.

        A forward of the first chunk admits a new micro-batch, which will want a slot for its
        second chunk too; with no slot left for that, the worker could only wait for a W. So it
        takes the last slot only where ``fill`` allows and a W is sure to come: one is
        pending, or a micro-batch past its second chunk still owes this worker its first
        chunk's backward. With a tight limit that wait would hold the micro-batches coming
        back up the V, so v-half and v-min always leave the slot free; zb-v, with 1F1B's
        memory, needs it for its steady F I W F I W."""
        held = self.held[worker]
        if held >= self.limit:
            return False
        if stage != worker or held + 1 < self.limit:
            return True
        owed = self.next_f[self.second(worker)] > self.next_i[worker]
        return self.fill and (bool(self.pending_w[worker]) or owed)

    def forward(self, worker: int, t: int) -> Action | None:
        for stage in (self.second(worker), worker):
            j = self.next_f[stage]
            if j >= self.m or not self.room(worker, stage):
                continue
            if stage == 0 or self.done_by(Action(stage - 1, "F", j), t):
                return Action(stage, "F", j)
        return None

    def input_grad(self, worker: int, t: int) -> Action | None:
        ready = []
        for stage in (worker, self.second(worker)):
            j = self.next_i[stage]
            if j >= self.next_f[stage] or not self.done_by(Action(stage, "F", j), t):
                continue
            last = stage == self.num_stages - 1
            if last or self.done_by(Action(stage + 1, "I", j), t):
                ready.append(Action(stage, "I", j))
        return min(ready, key=lambda a: a.microbatch, default=None)

    def pick(self, worker: int, t: int) -> Action | None:
        found = self.forward(worker, t) or self.input_grad(worker, t)
        if found is None and self.pending_w[worker]:
            found = self.pending_w[worker][0]
        return found

    def commit(self, worker: int, action: Action, t: int) -> None:
        if action.kind == "F":
            self.next_f[action.stage] += 1
            self.held[worker] += 1
        elif action.kind == "I":
            self.next_i[action.stage] += 1
            self.pending_w[worker].append(Action(action.stage, "W", action.microbatch))
        else:
            self.pending_w[worker].popleft()
            self.held[worker] -= 1
        self.lists[worker].append(action)
        self.finish[action] = t + 1
        self.free_at[worker] = t + 1
        self.remaining -= 1

    def step(self, t: int) -> None:
        """Start what each free worker can at time ``t``; raise ScheduleError if no worker
        is busy and none can start, since nothing would change after that."""
        started = False
        for w in range(self.p):
            if self.free_at[w] > t:
                continue
            action = self.pick(w, t)
            if action is not None:
                self.commit(w, action, t)
                started = True
        if not started and all(f <= t for f in self.free_at):
            raise ScheduleError(
                f"V list scheduling stalls at time {t} with p={self.p}, m={self.m} and a limit "
                f"of {self.limit} activations per worker (held: {self.held}); raise the limit"
            )

    def run(self) -> list[list[Action]]:
        t = 0
        while self.remaining:
            self.step(t)
            t += 1
        return self.lists


def v_list_schedule(
    name: str, num_workers: int, num_microbatches: int, limit: int, fill_last_slot: bool
) -> Schedule:
    """Return the V-placed schedule that list scheduling builds under ``limit`` chunk
    activations per worker (see :class:`_ListScheduler`)."""
    check_sizes(num_workers, num_microbatches, CHUNKS)
    if limit < 2:
        raise ValueError(f"{name}: a V needs a limit of at least 2 activations, got {limit}")
    lists = _ListScheduler(num_workers, num_microbatches, limit, fill_last_slot).run()
    return Schedule(
        name=name,
        num_microbatches=num_microbatches,
        stage_worker=stage_worker("v", num_workers, CHUNKS),
        actions=tuple(tuple(a) for a in lists),
    )


def check_v_chunks(name: str, chunks: int) -> None:
    """Raise ValueError unless ``chunks`` is the two stages per worker that a V holds."""
    if chunks != CHUNKS:
        raise ValueError(
            f"{name} runs two stages per worker in a V; chunks must be 2, got {chunks}"
        )


def zb_v(num_workers: int, num_microbatches: int, chunks: int = CHUNKS) -> Schedule:
    """ZB-V (Qi et al. 2024, V-ZB; PyTorch ships it as ``ScheduleZBVZeroBubble``, a fixed
    order): the V at 1F1B's activation memory, 2p chunk activations per worker, with no
    bubble but the start-up when F = I = W. Built here by list scheduling, so its warm-up is
    PyTorch's but its steady state interleaves the chunks as they become ready. On unit
    costs, p = 4, m = 8 (F1/F2: forward of the first/second chunk)::

        w0  F1 F1 F1 F1 F1 F1 F1 F2 I2 W2 F2 I2 W2 F2 I2 W2 F2 I1 I2 W1 F1 I1 W2 ...
        w3  .. .. .. F1 F2 F1 F2 F1 F2 F1 F2 I2 I1 W2 F1 I2 I1 W1 F2 I2 I1 W2 ...

    Worker w runs 2(p - w) - 1 first-chunk forwards before micro-batch 0 comes back, then
    keeps busy with F, I and W of both chunks: a step takes 6m + p - 1 units, the p - 1 being
    the start-up that no schedule avoids."""
    check_v_chunks("zb-v", chunks)
    return v_list_schedule(
        "zb-v", num_workers, num_microbatches, zb_v_limit(num_workers), fill_last_slot=True
    )


def v_half(num_workers: int, num_microbatches: int, chunks: int = CHUNKS) -> Schedule:
    """V-Half (Qi et al. 2024): the V under p + 2 chunk activations per worker, about half of
    1F1B's. On unit costs its idle time is a fixed amount in the warm-up and cool-down,
    whatever m, and below 1F1B's (at p = 4, m = 8: 14% of the step against 1F1B's 27%)."""
    check_v_chunks("v-half", chunks)
    return _v_half(num_workers, num_microbatches)


@lru_cache(maxsize=128)
def _v_half(num_workers: int, num_microbatches: int) -> Schedule:
    """The better on unit costs of the listed v-half and the block-built one (see above)."""
    from layerwise.simulate import Costs, simulate  # the simulator imports the schedules

    listed = v_list_schedule(
        "v-half", num_workers, num_microbatches, v_half_limit(num_workers), fill_last_slot=False
    )
    lists = block_lists(num_workers, num_microbatches, tight_block(num_workers, up_slack=1))
    if any(order_peak(acts) > v_half_limit(num_workers) for acts in lists):
        return listed
    built = Schedule(
        name="v-half",
        num_microbatches=num_microbatches,
        stage_worker=stage_worker("v", num_workers, CHUNKS),
        actions=tuple(tuple(acts) for acts in lists),
    )
    unit = Costs.uniform(CHUNKS * num_workers, forward=1.0, backward=2.0)  # F = I = W = 1
    shorter = simulate(built, unit).makespan() < simulate(listed, unit).makespan() - 1e-9
    return built if shorter else listed


def v_half_peaks(num_workers: int, num_microbatches: int) -> tuple[int, ...]:
    """Each worker's peak activations (chunks) in v-half: what its order holds."""
    return tuple(order_peak(list(acts)) for acts in _v_half(num_workers, num_microbatches).actions)


def v_min(num_workers: int, num_microbatches: int, chunks: int = CHUNKS) -> Schedule:
    """V-Min (Qi et al. 2024): the V at about a third of 1F1B's activation memory, built as
    the paper builds it, from a repeating building block (:mod:`v_blocks`) rather than by
    list scheduling: the tightest block, each action a unit after its input, repeated every
    six units, so a worker holds its two lifespans (about 4p units) over six, about 2p/3
    chunk activations, and never more than 2 * ((p + 4) // 3). Its idle time is the block's
    ramp at the start and end, about 2p/3 of a micro-batch's work per worker whatever m, so
    the bubble shrinks as m grows (at m = 4p: 10% of the step at p = 4, 13% at p = 16,
    against 1F1B's 16% and 19%)."""
    check_v_chunks("v-min", chunks)
    check_sizes(num_workers, num_microbatches, CHUNKS)
    lists = block_lists(num_workers, num_microbatches, tight_block(num_workers))
    return Schedule(
        name="v-min",
        num_microbatches=num_microbatches,
        stage_worker=stage_worker("v", num_workers, CHUNKS),
        actions=tuple(tuple(acts) for acts in lists),
    )


def _peak(limit: Callable[[int], int]) -> Callable[[int, int, int, int], int]:
    # Every worker fills its limit when there are micro-batches enough; before that, each
    # micro-batch holds both of its chunks at once.
    return lambda p, m, v, w: min(limit(p), CHUNKS * m)


register(
    ScheduleSpec(
        name="zb-v",
        generator=zb_v,
        description="two stages per worker in a V, the backward split into I and W: no bubble "
        "but the start-up when F = I = W, at 1F1B's activation memory (2p chunks per worker)",
        peak_inflight=_peak(zb_v_limit),
        aliases=("zbv",),
        chunks_default=CHUNKS,
        chunks_allowed=(CHUNKS, CHUNKS),
        placement="v",
        split_backward=True,
    )
)
register(
    ScheduleSpec(
        name="v-half",
        generator=v_half,
        description="the V of zb-v under about half of 1F1B's activation memory (p + 2 chunks "
        "per worker): idle only in warm-up and cool-down, less than 1F1B",
        # the list scheduler fills the limit, the block holds what its order gives
        peak_inflight=lambda p, m, v, w: v_half_peaks(p, m)[w],
        aliases=("vhalf",),
        chunks_default=CHUNKS,
        chunks_allowed=(CHUNKS, CHUNKS),
        placement="v",
        split_backward=True,
    )
)
register(
    ScheduleSpec(
        name="v-min",
        generator=v_min,
        description="the V of zb-v from a repeating building block, at about a third of "
        "1F1B's activation memory (at most 2 * ((p + 4) // 3) chunks per worker): idle only "
        "in the block's ramp at start and end, less than 1F1B",
        # the block fixes each worker's order, and the order its memory (see v_blocks)
        peak_inflight=lambda p, m, v, w: tight_block_peaks(p, m)[w],
        aliases=("vmin",),
        chunks_default=CHUNKS,
        chunks_allowed=(CHUNKS, CHUNKS),
        placement="v",
        split_backward=True,
    )
)
