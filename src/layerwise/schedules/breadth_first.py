"""Breadth-first pipeline parallelism (Lamy-Poirier 2023, "Breadth-First Pipeline
Parallelism"; PyTorch's ``ScheduleLoopedBFS``): looped stages, each worker running every
micro-batch through one of its stages before it starts the next."""

from __future__ import annotations

# The classic schedules register first, so that the registry lists them before this one.
from layerwise.schedules import generators  # noqa: F401
from layerwise.schedules.ir import Action, Schedule, check_sizes
from layerwise.schedules.registry import ScheduleSpec, register, stage_worker


def looped_bfs(num_workers: int, num_microbatches: int, chunks: int = 2) -> Schedule:
    """Looped breadth-first: worker w holds stages w, w + p, ... (looped placement); it runs
    the forwards of all m micro-batches through its first stage, then through its next, and
    so on, then the backwards stage by stage in reverse, each stage in micro-batch order
    (p = 2, m = 4, v = 2: stages 0, 2 on w0 and 1, 3 on w1; drawn with F = B = 1)::

        w0  0F0 0F1 0F2 0F3 2F0 2F1 2F2 2F3 ... ... 2B0 2B1 2B2 2B3 0B0 0B1 0B2 0B3
        w1  ... 1F0 1F1 1F2 1F3 3F0 3F1 3F2 3F3 3B0 3B1 3B2 3B3 1B0 1B1 1B2 1B3 ...

    It is GPipe run v times around the ring of workers: with m >= p each worker's next
    stage finds its inputs waiting, so the pipeline fills and drains once per step rather
    than once per stage, and the bubble is that of interleaved 1F1B, (p - 1)(F + B) / v.
    Every worker holds all m micro-batches' activations of all v stages at its peak (the
    memory of GPipe); the paper pairs the schedule with sharded data parallelism, where
    running each stage's micro-batches together lets the weights be gathered once per
    stage. Any m works; with m < p a worker waits for its first micro-batch to come round.
    """
    check_sizes(num_workers, num_microbatches, chunks)
    p, m, v = num_workers, num_microbatches, chunks
    lists: list[list[Action]] = []
    for w in range(p):
        stages = [c * p + w for c in range(v)]
        acts = [Action(s, "F", i) for s in stages for i in range(m)]
        acts += [Action(s, "B", i) for s in reversed(stages) for i in range(m)]
        lists.append(acts)
    return Schedule("looped-bfs", m, stage_worker("looped", p, v), tuple(map(tuple, lists)))


register(
    ScheduleSpec(
        name="looped-bfs",
        generator=looped_bfs,
        description="breadth-first: every micro-batch through a worker's first stage, then "
        "its next: interleaved 1F1B's bubble at GPipe's memory",
        # all forwards of all v stages run before the first backward
        peak_inflight=lambda p, m, v, w: m * v,
        aliases=("bfs", "breadth-first"),
        chunks_default=2,
        chunks_allowed=(1, None),
        interleaves="gpipe",
    )
)
