"""The classic schedules, each a pure generator with its registry entry next to it, and the
one-micro-batch ``sequential`` schedule that calibration runs.

Generators build a :class:`Schedule` and nothing else; :func:`registry.generate` checks the
sizes against the entry's constraints, builds, and validates. The simulator and the runtime
read the result only, so a generated schedule runs exactly like a hand-written one.
"""

from __future__ import annotations

from layerwise.schedules.ir import Action, Schedule, check_sizes
from layerwise.schedules.registry import Constraint, ScheduleSpec, register
from layerwise.schedules.validate import validate


def plain(name: str, num_microbatches: int, lists: list[list[Action]]) -> Schedule:
    """Return the schedule of ``lists`` (worker w's actions) with stage w on worker w."""
    return Schedule(
        name=name,
        num_microbatches=num_microbatches,
        stage_worker=tuple(range(len(lists))),
        actions=tuple(tuple(a) for a in lists),
    )


def naive(num_workers: int, num_microbatches: int = 1) -> Schedule:
    """The plain layer-wise flow: each micro-batch goes forward through every worker and back
    before the next one starts, so only one worker computes at any moment::

        w0  F0 .. .. .. .. .. B0 F1 ...
        w1  .. F0 .. .. .. B0 .. ..
        w2  .. .. F0 .. B0 .. .. ..
        w3  .. .. .. F0B0 .. .. ..
    """
    check_sizes(num_workers, num_microbatches)
    lists = [
        [Action(w, k, m) for m in range(num_microbatches) for k in ("F", "B")]
        for w in range(num_workers)
    ]
    return plain("naive", num_microbatches, lists)


def gpipe(num_workers: int, num_microbatches: int) -> Schedule:
    """GPipe (Huang et al. 2019): all forwards, then all backwards. Holds m activations::

    w0  F0 F1 F2 F3 .. .. .. .. .. .. B0 B1 B2 B3
    w1  .. F0 F1 F2 F3 .. .. .. .. B0 B1 B2 B3 ..
    """
    check_sizes(num_workers, num_microbatches)
    lists = [
        [Action(w, "F", m) for m in range(num_microbatches)]
        + [Action(w, "B", m) for m in range(num_microbatches)]
        for w in range(num_workers)
    ]
    return plain("gpipe", num_microbatches, lists)


def one_f_one_b(num_workers: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush, Narayanan et al. 2021), in three phases per worker w:

    - warm-up: ``p - w - 1`` forwards, so the last worker starts backward at once;
    - steady state: one forward, one backward, repeated;
    - cool-down: the remaining backwards.

    Worker w never holds more than ``min(p - w, m)`` activations. Any m >= 1 works: with
    m < p the warm-up is simply shorter.
    """
    check_sizes(num_workers, num_microbatches)
    p, m = num_workers, num_microbatches
    lists: list[list[Action]] = []
    for w in range(p):
        warmup = min(p - w - 1, m)
        acts = [Action(w, "F", i) for i in range(warmup)]
        for i in range(m - warmup):
            acts += [Action(w, "F", warmup + i), Action(w, "B", i)]
        acts += [Action(w, "B", i) for i in range(m - warmup, m)]
        lists.append(acts)
    return plain("1f1b", m, lists)


def multiple_of_workers(name: str) -> Constraint:
    """Return the constraint m % p == 0 of schedule ``name``, whose message names the two
    nearest numbers of micro-batches that would do."""

    def message(p: int, m: int, v: int) -> str:
        below, above = max(p, (m // p) * p), (m // p + 1) * p
        tries = f"m={below}" if below == above else f"m={below} or m={above}"
        return (
            f"{name} needs the number of micro-batches to be a multiple of the number "
            f"of workers (got m={m}, p={p}); try {tries}"
        )

    return Constraint("m % p == 0", lambda p, m, v: m % p == 0, message)


# Micro-batches go through a worker's chunks in groups of p.
MICROBATCHES_MULTIPLE_OF_WORKERS = multiple_of_workers("interleaved-1f1b")


def interleaved_unit(p: int, v: int, k: int, backward: bool) -> tuple[int, int]:
    """Return (chunk, micro-batch) of a worker's k-th forward (or backward) in interleaved
    order: p micro-batches through chunk 0, the same p through chunk 1, ..., then the next
    p; backwards take the chunks in reverse. Needs m to be a multiple of p."""
    chunk = (k // p) % v
    if backward:
        chunk = v - 1 - chunk
    return chunk, (k // (p * v)) * p + k % p


def interleaved_warmup(p: int, v: int, w: int) -> int:
    """Return how many forwards worker w runs before its first backward in interleaved 1F1B
    (Megatron's (v-1)p + 2(p-1-w)), before capping at the m*v it has in all."""
    return (v - 1) * p + 2 * (p - 1 - w)


def interleaved_1f1b(num_workers: int, num_microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Sec. 2.2): each worker holds ``chunks``
    stages placed round-robin (stage s on worker s mod p), which divides the bubble by
    ``chunks`` at the price of ``chunks`` times more point-to-point traffic.

    Micro-batches go through a worker's chunks in groups of p; m must be a multiple of p.
    """
    check_sizes(num_workers, num_microbatches, chunks)
    p, m, v = num_workers, num_microbatches, chunks
    MICROBATCHES_MULTIPLE_OF_WORKERS.check(p, m, v)
    total = m * v
    lists: list[list[Action]] = []
    for w in range(p):
        warmup = min(interleaved_warmup(p, v, w), total)
        fwd = [interleaved_unit(p, v, k, False) for k in range(total)]
        bwd = [interleaved_unit(p, v, k, True) for k in range(total)]
        acts = [Action(c * p + w, "F", mb) for c, mb in fwd[:warmup]]
        for k in range(total - warmup):
            c, mb = fwd[warmup + k]
            acts.append(Action(c * p + w, "F", mb))
            c, mb = bwd[k]
            acts.append(Action(c * p + w, "B", mb))
        acts += [Action(c * p + w, "B", mb) for c, mb in bwd[total - warmup :]]
        lists.append(acts)
    return Schedule(
        name="interleaved-1f1b",
        num_microbatches=m,
        stage_worker=tuple(s % p for s in range(p * v)),
        actions=tuple(tuple(a) for a in lists),
    )


def sequential(like: Schedule) -> Schedule:
    """One micro-batch through ``like``'s stages, on the same workers, one action at a time.

    Forwards in stage order, then backwards in reverse (I where ``like`` splits the
    backward), then the deferred weight gradients (W). Nothing overlaps and every hand-off
    happens while its receiver has nothing else to do, so a measured run of it shows each
    stage's own costs and the plain cost of a message (see ``Pipeline.calibrate``)."""
    split = like.split_stages
    rows: list[list[Action]] = [[] for _ in range(like.num_workers)]
    order = list(range(like.num_stages))
    for s in order:
        rows[like.stage_worker[s]].append(Action(s, "F", 0))
    for s in reversed(order):
        rows[like.stage_worker[s]].append(Action(s, "I" if s in split else "B", 0))
    for s in reversed(order):
        if s in split:
            rows[like.stage_worker[s]].append(Action(s, "W", 0))
    schedule = Schedule(
        "sequential", 1, like.stage_worker, tuple(tuple(r) for r in rows), like.skips
    )
    validate(schedule)
    return schedule


def forward_only(like: Schedule) -> Schedule:
    """``like``'s forwards alone, in the same order on the same workers: what inference and
    evaluation run (``Pipeline.forward``). Not a training schedule, so not validated as one:
    it has no backward by design."""
    actions = tuple(tuple(a for a in acts if a.kind == "F") for acts in like.actions)
    return Schedule(
        f"{like.name} forward", like.num_microbatches, like.stage_worker, actions, like.skips
    )


register(
    ScheduleSpec(
        name="naive",
        generator=naive,
        description="one micro-batch at a time through every worker and back: the "
        "unpipelined reference",
        peak_inflight=lambda p, m, v, w: 1,
        reference=True,
    )
)
register(
    ScheduleSpec(
        name="gpipe",
        generator=gpipe,
        description="all forwards, then all backwards: overlaps workers but holds every "
        "micro-batch's activations",
        peak_inflight=lambda p, m, v, w: m,
    )
)
register(
    ScheduleSpec(
        name="1f1b",
        generator=one_f_one_b,
        description="one forward, one backward once warmed up: overlaps workers and holds at "
        "most p micro-batches' activations",
        # p - w - 1 warm-up forwards, then one more before the first backward
        peak_inflight=lambda p, m, v, w: min(p - w, m),
    )
)
register(
    ScheduleSpec(
        name="interleaved-1f1b",
        generator=interleaved_1f1b,
        description="1F1B with v stages per worker, placed round-robin: the bubble shrinks "
        "v times at v times the point-to-point traffic",
        # the warm-up forwards of chunks (Megatron's (v-1)p + 2(p-1-w)), then one more
        peak_inflight=lambda p, m, v, w: min((v - 1) * p + 2 * (p - 1 - w) + 1, m * v),
        aliases=("interleaved",),
        chunks_default=2,
        chunks_allowed=(1, None),
        constraints=(MICROBATCHES_MULTIPLE_OF_WORKERS,),
        interleaves="1f1b",
    )
)
