"""DualPipe-V: DeepSeek's DualPipe (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report",
Sec. 3.2.1) cut in half onto a V (Sea AI Lab's "cut-in-half"), as in DeepSeek's
``DualPipeV`` and PyTorch's ``ScheduleDualPipeV``.

DualPipe feeds micro-batches into both ends of the pipeline at once; its V form keeps one
direction and folds it, so worker w holds stages w and 2p-1-w (see ``v_shape.py``) and every
micro-batch starts and ends on worker 0. In the steady state a worker pairs the forward of
one chunk with the backward of the other, which DeepSeek overlaps on the GPU (the
all-to-all of one hiding behind the compute of the other). Here each pair is two actions in
order, forward first: on CPU there is nothing to overlap them with, and the order is the one
the original runs when it does not overlap.

DeepSeek's figures, with PP = 2p stages, F a chunk's forward, B its full backward, W its
weight gradient and F&B an overlapped pair: a bubble of (PP/2 - 1)(F&B + B - 3W) and PP + 1
chunk activations per worker. Our simulator gives the memory exactly (2p + 1 on every
worker) and, with F = I = W and the pairs run in turn, a step of 6m + p - 1 units: idle only
in the start-up, like zb-v, at one chunk activation more.
"""

from __future__ import annotations

from collections import deque

from layerwise.schedules.ir import Action, Schedule, check_sizes
from layerwise.schedules.registry import Constraint, ScheduleSpec, register, stage_worker
from layerwise.schedules.v_shape import CHUNKS, check_v_chunks

NAME = "dualpipe-v"


def _too_few(p: int, m: int, v: int) -> str:
    return (
        f"{NAME} needs at least two micro-batches per worker, one per stage (m >= 2p = {2 * p}), "
        f"to fill its warm-up; got m={m} with p={p}; try m={2 * p}"
    )


# Worker r's steady state runs m - 2p + r + 1 rounds, at least one on every worker when
# m >= 2p; DeepSeek's and PyTorch's implementations refuse fewer micro-batches, and so do we.
AT_LEAST_TWO_PER_WORKER = Constraint("m >= 2p", lambda p, m, v: m >= 2 * p, _too_few)


class _Order:
    """One worker's action list, built phase by phase: each stage's forwards and backwards
    take the next micro-batch in order, and deferred weight gradients wait in one queue."""

    def __init__(self, first: int, second: int) -> None:
        self.first, self.second = first, second
        self.actions: list[Action] = []
        self.next_f = {first: 0, second: 0}
        self.next_b = {first: 0, second: 0}
        self.deferred: deque[Action] = deque()

    def forward(self, stage: int) -> None:
        self.actions.append(Action(stage, "F", self.next_f[stage]))
        self.next_f[stage] += 1

    def backward(self, stage: int, defer_w: bool = False) -> None:
        """The next backward of ``stage``: I, then its W at once, or later if ``defer_w``."""
        j = self.next_b[stage]
        self.next_b[stage] += 1
        self.actions.append(Action(stage, "I", j))
        if defer_w:
            self.deferred.append(Action(stage, "W", j))
        else:
            self.actions.append(Action(stage, "W", j))

    def weight(self) -> None:
        """The oldest deferred weight gradient."""
        self.actions.append(self.deferred.popleft())

    def pair(self, forward_stage: int, backward_stage: int) -> None:
        """An overlapped forward-and-backward pair, run as two actions in order."""
        self.forward(forward_stage)
        self.backward(backward_stage)


def _worker_order(worker: int, num_workers: int, num_microbatches: int) -> list[Action]:
    """Return worker ``worker``'s actions in DualPipe-V's eight phases."""
    p, m, r = num_workers, num_microbatches, worker
    o = _Order(r, 2 * p - 1 - r)
    first, second = o.first, o.second
    for _ in range(2 * (p - r - 1)):  # 1: first-chunk forwards, deeper for early workers
        o.forward(first)
    for _ in range(r + 1):  # 2: both chunks, until micro-batch 0 has turned
        o.forward(first)
        o.forward(second)
    for _ in range(p - r - 1):  # 3: second-chunk backward with its W, then a forward
        o.backward(second, defer_w=True)
        o.weight()
        o.forward(second)
    for _ in range(m - 2 * p + r + 1):  # 4: the steady state, two pairs per round
        o.pair(first, second)
        o.pair(second, first)
    for _ in range(p - r - 1):  # 5: no first-chunk forwards left
        o.backward(second)
        o.pair(second, first)
    # 6: backwards of both chunks; from the middle of this phase on the W are deferred
    # (after the second chunk's on odd workers, before it on even ones), to fill phase 7
    rounds, defer = r + 1, False
    for i in range(rounds):
        defer = defer or (i == rounds // 2 and r % 2 == 1)
        o.backward(second, defer_w=defer)
        defer = defer or (i == rounds // 2 and r % 2 == 0)
        o.backward(first, defer_w=defer)
    for _ in range(p - r - 1):  # 7: a deferred W while the gradient comes back
        o.weight()
        o.backward(first, defer_w=True)
    while o.deferred:  # 8: the rest of the deferred W
        o.weight()
    return o.actions


def dualpipe_v(num_workers: int, num_microbatches: int, chunks: int = CHUNKS) -> Schedule:
    """DualPipe-V: DeepSeek's bidirectional DualPipe folded onto a V of 2p stages.

    Phases of worker r (F1/F2: forward of its first/second chunk, B: backward with its W,
    I: backward whose W is deferred, W: the oldest deferred W)::

        1  F1 x 2(p-r-1)          5  (B2, F2 B1) x (p-r-1)
        2  (F1 F2) x (r+1)        6  (B2 B1) x (r+1), W deferred from the middle on
        3  (I2 W F2) x (p-r-1)    7  (W I1) x (p-r-1)
        4  (F1 B2, F2 B1) x (m-2p+r+1)   8  W until none is left

    Needs m >= 2p. With F = I = W a step takes 6m + p - 1 units: no bubble but the start-up.
    """
    check_sizes(num_workers, num_microbatches, chunks)
    check_v_chunks(NAME, chunks)
    AT_LEAST_TWO_PER_WORKER.check(num_workers, num_microbatches, chunks)
    p, m = num_workers, num_microbatches
    return Schedule(
        name=NAME,
        num_microbatches=m,
        stage_worker=stage_worker("v", p, CHUNKS),
        actions=tuple(tuple(_worker_order(w, p, m)) for w in range(p)),
    )


register(
    ScheduleSpec(
        name=NAME,
        generator=dualpipe_v,
        description="DeepSeek's DualPipe folded onto a V (two stages per worker): each "
        "overlapped forward-and-backward pair runs as two actions in order (on CPU there is "
        "nothing to overlap them with); 2p + 1 chunk activations per worker, needs m >= 2p",
        # every worker reaches 2p + 1 in phase 4 (as DeepSeek's PP + 1 with PP = 2p stages)
        peak_inflight=lambda p, m, v, w: 2 * p + 1,
        aliases=("dualpipev",),
        chunks_default=CHUNKS,
        chunks_allowed=(CHUNKS, CHUNKS),
        placement="v",
        constraints=(AT_LEAST_TWO_PER_WORKER,),
        split_backward=True,
    )
)
