"""A short probe of this machine under the load of a whole local job.

When a job starts more worker processes than the machine has cores, each one's layers run
slower than when timed alone, by more than workers / cores: the processes switch, share
caches, and a tensor-parallel all-reduce waits until every member of its group is running
at once, which on oversubscribed cores takes the scheduler's time slices, not the wire's.
Neither is a constant worth guessing, so the probe measures them: it starts as many
processes as the job would, and all of them at once run what a worker runs (the model's
embedding, a block sharded over each tensor-parallel size the layouts use, the output layer
with the loss, and an AdamW step), each timed from a common start. What one process then
takes is what a worker of a fully busy job takes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

REPEATS = 5


@dataclass(frozen=True)
class LoadedCosts:
    """Seconds per micro-batch (forward and backward) with ``workers`` processes busy at once;
    ``block`` by tensor-parallel size; ``optimizer_per_param``: one AdamW step, per
    parameter."""

    workers: int
    block: dict[int, float]
    embedding: float
    head: float
    optimizer_per_param: float


def probe_loaded(
    workers: int, tps: Sequence[int], hidden: int, heads: int, seq: int, micro_batch: int,
    repeats: int = REPEATS,
) -> LoadedCosts:  # fmt: skip
    """Start ``workers`` processes and measure, with all of them busy, a GPT of these sizes:
    its parts per micro-batch and a block over every tensor-parallel size in ``tps``."""
    from layerwise.job.launcher import run_workers

    args = (tuple(tps), hidden, heads, seq, micro_batch, repeats)
    results = run_workers(_probe, workers, *args, timeout_s=600)

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r) for r in results)

    def block(tp: int) -> float:
        return statistics.median(float(r["block"][tp]) for r in results)

    return LoadedCosts(
        workers=workers,
        block={tp: block(tp) for tp in tps},
        embedding=med(lambda r: float(r["embedding"])),
        head=med(lambda r: float(r["head"])),
        optimizer_per_param=med(lambda r: float(r["optimizer_per_param"])),
    )


def _timed(step: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``step`` after one warm-up, every process starting together."""
    import torch.distributed as dist

    step()
    dist.barrier()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _probe(
    rank: int, world: int, tps: tuple[int, ...], hidden: int, heads: int, seq: int,
    micro_batch: int, repeats: int,
) -> dict[str, Any]:  # fmt: skip
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from layerwise.models.gpt import GPTConfig, GPTFamily, loss_fn

    cfg = GPTConfig(seq_len=seq, d_model=hidden, n_heads=heads, n_layers=1)
    family = GPTFamily(cfg)
    embed, block, head = (factory() for factory in family.layers())
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq))
    x = torch.randn(micro_batch, seq, hidden, requires_grad=True)
    out: dict[str, Any] = {"block": {}}
    out["embedding"] = _timed(lambda: embed(ids).sum().backward(), repeats)
    out["head"] = _timed(lambda: loss_fn(head(x), ids).backward(), repeats)
    for tp in tps:
        layer = block
        if tp > 1:
            mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
            layer = family.parallelize(1, family.layers()[1](), mesh["tp"])

        def step(module: torch.nn.Module = layer) -> None:
            module(x).sum().backward()

        out["block"][tp] = _timed(step, repeats)
    params = [p for p in block.parameters()]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    out["optimizer_per_param"] = _timed(opt.step, repeats) / sum(p.numel() for p in params)
    return out
