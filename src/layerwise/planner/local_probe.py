"""A short probe of this machine under the load of a whole local job.

When a job starts more worker processes than the machine has cores, each one's layers run
slower than when timed alone, by more than workers / cores: the processes switch and share
caches, and a collective (a tensor-parallel all-reduce, the gradients' all-reduce) or a
message waits until its peers are scheduled, which on oversubscribed cores takes the
scheduler's time slices, not the wire's. None of this is a constant worth guessing, so the
probe measures it: it starts as many processes as the job would, and all of them at once run
what a worker runs:

- the model's embedding, a block and the output layer with the loss, forward and backward
  apart, and the update after the pipeline (the gradient's norm, clipping, AdamW, packing the
  gradients for their all-reduce), each in a loop over the same wall-clock window, so that every
  process stays busy for the whole of every window;
- a block sharded over each tensor-parallel size the layouts use, and its update; and the same
  sharded blocks with only some of the groups running them, the others waiting, as a
  pipeline's stages wait in its bubbles;
- a block's forward followed by a message to a partner process and one back, as two
  neighbouring pipeline stages exchange an activation and its gradient;
- an all-reduce over groups of each size the layouts use, of a small and of a large buffer.

Blocks are timed as a short chain (``chain`` of them, forward then backward), as a stage runs
them, and the cost per block is the chain's divided by its length. A single sharded block
timed on its own costs 1.3-1.6x more per block than the same block in a chain of 2, 4 or 8
(measured with 8 processes on 2 cores, for tensor-parallel sizes 2, 4 and 8; chains of 2 to 8
agree with each other within the runs' noise, and an unsharded block shows no difference),
so a lone block would over-state every tensor-parallel stage.

The costs it returns are seconds *with every process busy*, the unit
:func:`layerwise.simulate_shared.simulate_shared` takes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

WINDOW_S = 0.5  # per piece; every process is busy with it about this long
CHAIN = 4  # blocks timed in a row, as a stage runs them
# A sharded chain takes longer than the window (0.3-0.5 s with 8 processes on 2 cores): it
# runs at least this often. With 3 runs, the tensor-parallel layouts' predictions moved by up
# to 15 % between planner runs.
SHARDED_RUNS = 6
# Runs of a piece before it is timed: a fresh process's first runs also fault in the memory
# its tensors will reuse.
WARM_UP = 2


@dataclass(frozen=True)
class LoadedCosts:
    """Seconds per micro-batch with ``workers`` processes busy at once: ``(forward,
    backward)`` of the embedding, a block by tensor-parallel size, and the output layer with
    the loss; ``message``: one activation-sized message between two processes;
    ``optimizer_per_param``: the gradient's norm, clipping and an AdamW step, per parameter;
    ``pack_per_param``: packing gradients for their all-reduce and back, per parameter;
    ``allreduce``: group size -> (seconds of a tiny all-reduce, per further byte), for every
    size of a data-, tensor- or pipeline-parallel group;
    ``sharded_update_per_param``: tensor-parallel size -> the update's seconds per parameter a
    rank holds of blocks sharded that many ways (their parameters are DTensors, whose every
    optimizer operation pays a dispatch that plain tensors do not);
    ``sharded_speed``: tensor-parallel size -> {processes running sharded blocks while the
    others wait: how much faster they run than with all busy}."""

    workers: int
    embedding: tuple[float, float]
    block: dict[int, tuple[float, float]]
    head: tuple[float, float]
    message: float
    optimizer_per_param: float
    allreduce: dict[int, tuple[float, float]]
    pack_per_param: float = 0.0
    sharded_update_per_param: dict[int, float] = field(default_factory=dict)
    sharded_speed: dict[int, dict[int, float]] = field(default_factory=dict)

    def step_collectives_s(self, dp: int, tp: int, pp: int) -> float:
        """Seconds of the small collectives a training step makes outside its blocks, each a
        point where the group's processes meet: the loss's mean over the replicas (dp), the
        gradient norm's sum over the tensor-parallel ranks (tp), and over the pipeline's
        workers (pp) the micro-batches' shapes, the loss handed back, the norm's sum and the
        step's idle fraction; each at the cost of a tiny all-reduce over a group that size."""
        meets = {dp: 0, tp: 0, pp: 0}
        meets[dp] += 1
        meets[tp] += 1
        meets[pp] += 4
        return sum(n * self.allreduce[g][0] for g, n in meets.items() if g > 1)

    def allreduce_s(self, dp: int, nbytes: float) -> float:
        """Seconds of an all-reduce of ``nbytes`` over ``dp`` processes, all groups at once."""
        if dp <= 1:
            return 0.0
        fixed, per_byte = self.allreduce[dp]
        return fixed + per_byte * nbytes


def probe_loaded(
    workers: int, tps: Sequence[int], sizes: Sequence[int], hidden: int, heads: int, seq: int,
    micro_batch: int, grad_bytes: int, window_s: float = WINDOW_S, chain: int = CHAIN,
) -> LoadedCosts:  # fmt: skip
    """Start ``workers`` processes and measure, with all of them busy, a GPT of these sizes:
    its parts per micro-batch, a block over every tensor-parallel size in ``tps`` (in a row
    of ``chain`` blocks), a message, and all-reduces over groups of every size in ``sizes``
    up to ``grad_bytes``."""
    from layerwise.job.launcher import run_workers

    if chain < 1:
        raise ValueError(f"chain must be at least 1 block, got {chain}")
    args = (tuple(tps), tuple(sizes), hidden, heads, seq, micro_batch, grad_bytes, window_s, chain)
    results = run_workers(_probe, workers, *args, timeout_s=600)

    def med(key: str, sub: Any = None) -> tuple[float, float]:
        pairs = [r[key] if sub is None else r[key][sub] for r in results]
        return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs))

    return LoadedCosts(
        workers=workers,
        embedding=med("embedding"),
        block={tp: med("block", tp) for tp in tps},
        head=med("head"),
        message=statistics.median(float(r["message"]) for r in results),
        optimizer_per_param=statistics.median(float(r["optimizer_per_param"]) for r in results),
        allreduce={g: med("allreduce", g) for g in sizes if g > 1},
        pack_per_param=statistics.median(float(r["pack_per_param"]) for r in results),
        sharded_update_per_param={
            tp: statistics.median(float(r["sharded_update"][tp]) for r in results)
            for tp in tps
            if tp > 1
        },
        sharded_speed={
            tp: _speeds([r["sharded_speed"][tp] for r in results]) for tp in tps if tp > 1
        },
    )


def _speeds(per_rank: Sequence[dict[int, float | None]]) -> dict[int, float]:
    """Number of busy processes -> the median speed the busy ones measured (idle ones: None)."""
    counts = {n for mine in per_rank for n in mine}
    return {n: statistics.median(v for mine in per_rank if (v := mine.get(n)) is not None)
            for n in sorted(counts)}  # fmt: skip


def _nothing(_: Any) -> None:
    """The backward of a piece that has none."""


def time_once(forward: Callable[[], Any], backward: Callable[[Any], None]) -> tuple[float, float]:
    """Seconds of one forward and of the backward of its output."""
    t0 = time.perf_counter()
    out = forward()
    t1 = time.perf_counter()
    backward(out)
    return t1 - t0, time.perf_counter() - t1


def _windowed(
    forward: Callable[[], Any], backward: Callable[[Any], None], window: float
) -> tuple[float, float]:
    """Mean (forward, backward) seconds over a window that every process loops through."""
    import torch.distributed as dist

    for _ in range(WARM_UP):
        backward(forward())
    dist.barrier()
    runs: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < window or not runs:
        runs.append(time_once(forward, backward))
    return _typical(runs)


def _collective(
    forward: Callable[[], Any], backward: Callable[[Any], None], window: float, least: int = 3
) -> tuple[float, float]:
    """Mean (forward, backward) seconds of a piece with collectives or messages, whose
    members must run it equally often: every process runs it as many times as the slowest
    one's first run fits in the window (at least ``least``), so all stay busy about as long."""
    import torch
    import torch.distributed as dist

    backward(forward())  # warm-up: the first run after a new process group is slower
    t0 = time.perf_counter()
    backward(forward())  # a first measure of how long one takes
    first = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    count = max(least, min(100, math.ceil(window / max(float(first), 1e-6))))
    dist.barrier()
    return _typical([time_once(forward, backward) for _ in range(count)])


def _typical(runs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The mean forward and the mean backward of ``runs``. Not the median: a piece shorter
    than the scheduler's time slice mostly runs uninterrupted and now and then waits a whole
    slice for its core, and the mean is what it costs with every process sharing the cores
    (a median of the embedding's runs was a fifth of their mean, the CPU time alone)."""
    return (statistics.fmean(f for f, _ in runs), statistics.fmean(b for _, b in runs))


def _probe(
    rank: int, world: int, tps: tuple[int, ...], sizes: tuple[int, ...], hidden: int, heads: int,
    seq: int, micro_batch: int, grad_bytes: int, window: float, chain: int,
) -> dict[str, Any]:  # fmt: skip
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from layerwise.models.gpt import GPTConfig, GPTFamily, loss_fn

    cfg = GPTConfig(seq_len=seq, d_model=hidden, n_heads=heads, n_layers=1)
    family = GPTFamily(cfg)
    embed, block, head = (factory() for factory in family.layers())
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq))
    x = torch.randn(micro_batch, seq, hidden, requires_grad=True)

    def sum_backward(y: Any) -> None:
        y.sum().backward()

    def piece(forward: Callable[[], Any], collective: bool = False) -> tuple[float, float]:
        if collective:
            return _collective(forward, sum_backward, window, SHARDED_RUNS)
        return _windowed(forward, sum_backward, window)

    def per_block(fwd_bwd: tuple[float, float]) -> tuple[float, float]:
        return fwd_bwd[0] / chain, fwd_bwd[1] / chain

    blocks = nn.Sequential(*(family.layers()[1]() for _ in range(chain)))
    out: dict[str, Any] = {"embedding": piece(lambda: embed(ids)),
                           "head": piece(lambda: loss_fn(head(x), ids)),
                           "block": {1: per_block(piece(partial(blocks, x)))}}  # fmt: skip
    out["sharded_update"], out["sharded_speed"] = {}, {}
    for tp in (t for t in tps if t > 1):  # every process builds every mesh, in one order
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        sharded = nn.Sequential(*(family.parallelize(1, family.layers()[1](), mesh["tp"])
                                  for _ in range(chain)))  # fmt: skip
        out["block"][tp] = per_block(piece(partial(sharded, x), collective=True))
        out["sharded_update"][tp] = _update(sharded, window)[0]
        chain_s = sum(out["block"][tp]) * chain  # forward + backward, all processes busy
        out["sharded_speed"][tp] = _fewer_busy(rank, world, tp, partial(sharded, x),
                                               sum_backward, chain_s)  # fmt: skip
    out["message"] = _message(rank, world, block, x, window)
    out["optimizer_per_param"], out["pack_per_param"] = _update(block, window)
    out["allreduce"] = {}
    for dp in (g for g in sizes if g > 1):
        groups = [dist.new_group(list(range(g, g + dp))) for g in range(0, world, dp)]
        mine = groups[rank // dp]
        small, large = torch.zeros(1), torch.zeros(max(1, grad_bytes // 4))
        tiny = _collective(partial(dist.all_reduce, small, group=mine), _nothing, window)[0]
        big = _collective(partial(dist.all_reduce, large, group=mine), _nothing, window)[0]
        out["allreduce"][dp] = (tiny, max(0.0, big - tiny) / max(1, 4 * large.numel() - 4))
    return out


def _fewer_busy(
    rank: int, world: int, tp: int, forward: Callable[[], Any], backward: Callable[[Any], None],
    all_busy: float,
) -> dict[int, float | None]:  # fmt: skip
    """Busy processes -> how much faster a sharded piece (``forward``, then ``backward`` of its
    output) runs with only the first that many processes running it, whole tensor-parallel
    groups, and the rest waiting; ``all_busy`` is its seconds with every process running it.
    None where this rank waited. Every rank calls it."""
    import torch.distributed as dist

    out: dict[int, float | None] = {}
    for busy in range(tp, world, tp):
        group = dist.new_group(list(range(busy)))  # every rank makes every group
        out[busy] = None
        if rank < busy:
            for _ in range(WARM_UP):
                backward(forward())
            dist.barrier(group=group)
            runs = [time_once(forward, backward) for _ in range(SHARDED_RUNS)]
            out[busy] = all_busy / sum(_typical(runs))
        dist.barrier()  # the waiting ranks wait here, as a stage in a bubble waits
    return out


def trainer_update(module: Any) -> tuple[Callable[[], None], list[Any]]:
    """An update of ``module``'s parameters as the trainer makes it after a step (the norm of
    the gradient's local parts, clipping, AdamW), on gradients set to ones; and the gradient
    tensors this rank holds (a DTensor's local shard)."""
    import torch

    from layerwise.parallel.data import local_tensor

    params = list(module.parameters())
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in params]
    local = [local_tensor(g) for g in grads]

    def update() -> None:
        norm = sum(float(g.double().pow(2).sum()) for g in local) ** 0.5
        for g in grads:
            g.mul_(1.0 / max(1.0, norm))
        opt.step()

    return update, local


def _update(module: Any, window: float) -> tuple[float, float]:
    """Seconds per parameter of what a worker does after its pipeline: the gradient's norm,
    clipping and an AdamW step; and, with replicas, packing the gradients into one buffer for
    their all-reduce and back."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    update, local = trainer_update(module)

    def pack() -> None:
        flat = _flatten_dense_tensors(local)
        for g, avg in zip(local, _unflatten_dense_tensors(flat, local), strict=True):
            g.copy_(avg)

    count = sum(g.numel() for g in local)
    update_s = _windowed(update, _nothing, window)[0]
    pack_s = _windowed(pack, _nothing, window)[0]
    return update_s / count, pack_s / count


def _message(rank: int, world: int, block: Any, x: Any, window: float) -> float:
    """Seconds of one activation-sized message between two busy processes: a block's forward
    then an exchange with a partner (the next rank), less the forward alone."""
    import torch
    import torch.distributed as dist

    partner = rank ^ 1
    buf = torch.empty_like(x)

    def forward() -> Any:
        with torch.no_grad():
            return block(x)

    def exchange(y: Any) -> None:
        if partner >= world:  # an odd process out computes only
            return
        if rank % 2 == 0:
            dist.send(y, partner)
            dist.recv(buf, partner)
        else:
            dist.recv(buf, partner)
            dist.send(y, partner)

    alone = _windowed(forward, _nothing, window)[0]
    both = _collective(forward, exchange, window)
    return max(0.0, (both[0] + both[1] - alone) / 2)
