"""``layerwise plan --local``: measure this CPU's per-layer costs, predict local layouts.

A layer built by the model family (a GPT block unless told otherwise) is timed forward and
backward with torch on CPU, with the threads each worker process would get. The per-layer
times feed the same core simulator as the GPU planner, so the prediction can later be
compared with a measured ``layerwise train`` run on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from layerwise.models.family import ModelFamily
from layerwise.models.gpt import GPTConfig, GPTFamily, layer_parameter_counts, loss_fn
from layerwise.partition import partition
from layerwise.planner.local_probe import (
    CHAIN,
    LoadedCosts,
    probe_loaded,
    time_once,
    trainer_update,
)
from layerwise.schedules import generate
from layerwise.simulate import Costs, simulate
from layerwise.simulate_shared import simulate_shared

# Documented defaults for gloo over loopback between processes (not fitted).
LOCAL_LATENCY_S = 100e-6
LOCAL_GBPS = 2.0


@dataclass(frozen=True)
class LayerCost:
    """Measured seconds of one layer for one micro-batch, and its number of parameters."""

    forward: float
    backward: float
    params: int


def measure_layer(
    hidden: int, heads: int, seq: int, micro_batch: int, threads: int, repeats: int = 5
) -> LayerCost:
    """Returns the median forward and backward seconds of one GPT block on this CPU."""
    family = GPTFamily(GPTConfig(seq_len=seq, d_model=hidden, n_heads=heads, n_layers=1))
    return measure_family_layer(family, micro_batch, threads, repeats)


def measure_family_layer(
    family: ModelFamily, micro_batch: int, threads: int, repeats: int = 5
) -> LayerCost:
    """Returns the median forward and backward seconds of the layer ``family.sample_layer``
    builds, run on this CPU with ``threads`` threads, and its number of parameters."""
    with _threads(threads):
        layer, x = family.sample_layer(micro_batch)
        return _time_layer(layer, x, repeats)


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """Run the block with torch on ``threads`` threads (at least 1), then restore the caller's."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, threads))
        yield
    finally:
        torch.set_num_threads(before)


def _time_layer(layer: nn.Module, x: Tensor, repeats: int) -> LayerCost:
    """Returns the median of ``repeats`` forward and backward passes of ``layer`` on ``x``."""
    # a floating-point input gets its gradient too, as it does on every stage but the first
    x = x.detach().requires_grad_(x.is_floating_point())
    fwd, bwd = _time_pass(lambda: layer(x), lambda y: y.sum().backward(), repeats)
    return LayerCost(fwd, bwd, sum(p.numel() for p in layer.parameters()))


@dataclass(frozen=True)
class Parts:
    """Measured seconds per micro-batch, forward and backward, of the embedding and of the
    output layer with the loss, and of the update (gradient norm, clipping, AdamW) per
    parameter: what a worker runs besides its blocks."""

    embedding: tuple[float, float] = (0.0, 0.0)
    head: tuple[float, float] = (0.0, 0.0)
    update_per_param: float = 0.0


def measure_parts(
    hidden: int, heads: int, seq: int, micro_batch: int, threads: int, repeats: int = 5
) -> Parts:
    """Times the embedding, the output layer with its loss and a block's update on this CPU
    with ``threads`` threads (medians of ``repeats``, after a warm-up)."""
    family = GPTFamily(GPTConfig(seq_len=seq, d_model=hidden, n_heads=heads, n_layers=1))
    embed, block, head = (factory() for factory in family.layers())
    ids = torch.randint(0, family.config.vocab_size, (micro_batch, seq))
    x = torch.randn(micro_batch, seq, hidden, requires_grad=True)
    update, held = trainer_update(block)
    with _threads(threads):
        first = _time_pass(lambda: embed(ids), lambda y: y.sum().backward(), repeats)
        last = _time_pass(lambda: loss_fn(head(x), ids), lambda y: y.backward(), repeats)
        step = _time_pass(update, lambda _: None, repeats)[0]
    return Parts(first, last, step / sum(g.numel() for g in held))


def _time_pass(
    forward: Callable[[], Any], backward: Callable[[Any], None], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``forward`` and of ``backward`` of its output, after a warm-up."""
    runs = [time_once(forward, backward) for _ in range(repeats + 1)][1:]  # after a warm-up
    fwd, bwd = sorted(f for f, _ in runs), sorted(b for _, b in runs)
    return fwd[repeats // 2], bwd[repeats // 2]


def predict_local(
    layers: int, hidden: int, heads: int, seq: int, micro_batch: int, global_batch: int,
    workers: int, cost: LayerCost | None = None, schedule: str = "1f1b",
    cores: int | None = None, loaded: LoadedCosts | None = None,
    say: Callable[[str], None] | None = None, parts: Parts | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Returns predicted step seconds for each (dp, tp, pp) split of ``workers`` CPU
    processes, fastest first, for any pp up to the layers plus the embedding and the head
    (split by parameters, as ``layerwise train`` does). ``cost`` (one block, timed alone) is
    measured when not given.

    With fewer workers than ``cores``, each worker has cores to itself: the schedule is
    simulated with the block's cost (tensor parallelism divides it by tp and adds its
    all-reduces), the first stage's embedding and the last one's output layer and loss, and
    the slowest worker's update follows (``parts``: measured with ``cost`` when neither is
    given, none when only ``cost`` is).
    With as many or more, the workers fill or share the cores, and what each part of a
    worker's work takes with the whole job busy is measured
    (:mod:`layerwise.planner.local_probe`, unless ``loaded`` gives it). The schedule is then
    simulated with the cores shared among the processes that can run
    (:func:`layerwise.simulate_shared.simulate_shared`: a worker waiting in a bubble leaves its
    share to the others; tensor-parallel groups run at the speed the probe measured with that
    many processes busy), and the update (gradient norm, clipping, AdamW; with
    replicas, packing the gradients and their all-reduce) follows, at its loaded costs, with
    the step's small collectives (:meth:`LoadedCosts.step_collectives_s`).
    ``say`` is told, before the probe starts, that it runs and for about how long."""
    cores = cores or os.cpu_count() or 1
    # with every core taken, a block costs what it costs with all of them busy: two processes
    # on 2 cores each ran a block 1.2x slower than one process alone (two runs here)
    probed = workers >= cores
    if cost is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        cost = measure_layer(hidden, heads, seq, micro_batch, threads)
        if parts is None and not probed:
            parts = measure_parts(hidden, heads, seq, micro_batch, threads)
    parts = parts or Parts()
    tps = [t for t in range(1, workers + 1) if workers % t == 0 and heads % t == 0]
    counts = layer_parameter_counts(
        GPTConfig(seq_len=seq, d_model=hidden, n_heads=heads, n_layers=layers)
    )
    grid = _grid(workers, tps, layers)
    if probed and loaded is None:
        if say is not None:
            how = "share" if workers > cores else "fill the"
            say(f"{workers} workers {how} {cores} cores: probing this machine with "
                f"{workers} busy processes (about a minute)...")  # fmt: skip
        sizes = sorted({size for layout in grid for size in layout})  # every group's size
        loaded = probe_loaded(workers, tps, sizes, hidden, heads, seq, micro_batch,
                              grad_bytes=4 * sum(counts), chain=min(CHAIN, layers))  # fmt: skip
    out: list[dict[str, Any]] = []
    act_bytes = 4.0 * seq * micro_batch * hidden  # one fp32 activation between blocks
    send = LOCAL_LATENCY_S + act_bytes / (LOCAL_GBPS * 1e9)
    for dp, tp, pp in grid:
        # a ring all-reduce of one activation; a block does two in forward, two in backward
        ring = 2 * (tp - 1) * (LOCAL_LATENCY_S + act_bytes / tp / (LOCAL_GBPS * 1e9))
        if global_batch % (dp * micro_batch):
            continue
        m = global_batch // (dp * micro_batch)
        split = partition(counts, pp).sizes
        held = _held(split, counts, layers, tp)
        most = max(sum(h) for h in held)  # parameters of the worker that holds the most
        grads = 4.0 * most  # fp32 bytes
        if loaded is None:
            blocks = [_blocks_in(split, s, layers) for s in range(pp)]
            hop = send if pp > 1 else 0.0
            f = [n * (cost.forward / tp + 2 * ring) + hop for n in blocks]
            b = [n * (cost.backward / tp + 2 * ring) + hop for n in blocks]
            for i, (pf, pb) in ((0, parts.embedding), (pp - 1, parts.head)):
                f[i], b[i] = f[i] + pf, b[i] + pb  # not sharded: every tp rank runs them
            timeline = simulate(generate(schedule, pp, m), Costs.per_stage(f, b))
            # the slowest worker's update, then the ring all-reduce of the gradients over
            # the replicas
            after = parts.update_per_param * most
            after += 2 * (dp - 1) / dp * grads / (LOCAL_GBPS * 1e9) if dp > 1 else 0.0
        else:
            f, b = _loaded_stages(loaded, split, layers, tp)
            # sharded blocks gain less than their share of the cores in a bubble: measured
            speeds = loaded.sharded_speed.get(tp)
            timeline = simulate_shared(generate(schedule, pp, m), Costs.per_stage(f, b), cores,
                                       copies=dp * tp, speeds=speeds)  # fmt: skip
            after = (_update_s(loaded, held, tp, dp) + loaded.allreduce_s(dp, grads)
                     + loaded.step_collectives_s(dp, tp, pp))  # fmt: skip
        out.append({"layout": f"dp{dp} tp{tp} pp{pp} mb{micro_batch}", "dp": dp, "tp": tp,
                    "pp": pp, "num_microbatches": m,
                    "step_time_s": timeline.makespan() + after,
                    "pipeline_s": timeline.makespan(), "after_pipeline_s": after,
                    "bubble_fraction": timeline.bubble_fraction(),
                    "stage_layers": list(split),
                    "layer_forward_s": cost.forward, "layer_backward_s": cost.backward,
                    "oversubscribed": loaded is not None})  # fmt: skip
    return sorted(out, key=lambda r: float(r["step_time_s"]))


def _grid(workers: int, tps: Sequence[int], layers: int) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) split of ``workers`` with tp in ``tps`` and at most one stage per
    layer (the blocks, the embedding and the head)."""
    return [(workers // (tp * pp), tp, pp) for tp in tps
            for pp in range(1, min(workers // tp, layers + 2) + 1)
            if (workers // tp) % pp == 0]  # fmt: skip


def _loaded_stages(
    loaded: LoadedCosts, split: Sequence[int], layers: int, tp: int
) -> tuple[list[float], list[float]]:
    """Per-stage (forward, backward) seconds with the whole job busy: the stage's layers at
    their probed costs, and a message on each side of a stage that has a neighbour there."""
    fwd, bwd, first = [], [], 0
    for stage, n in enumerate(split):
        parts = [loaded.embedding if i == 0 else loaded.head if i == layers + 1
                 else loaded.block[tp] for i in range(first, first + n)]  # fmt: skip
        hops = (stage > 0) + (stage < len(split) - 1)
        fwd.append(sum(f for f, _ in parts) + hops * loaded.message)
        bwd.append(sum(b for _, b in parts) + hops * loaded.message)
        first += n
    return fwd, bwd


def _update_s(loaded: LoadedCosts, held: Sequence[tuple[float, float]], tp: int, dp: int) -> float:
    """Seconds of the slowest worker's update after its pipeline, with the whole job busy:
    the gradient norm, clipping and AdamW of the parameters it holds (``held``, from
    :func:`_held`; sharded blocks at the sharded cost), and with replicas, packing its
    gradients for their all-reduce."""
    plain = loaded.optimizer_per_param
    sharded = loaded.sharded_update_per_param.get(tp, plain)  # tp 1 is not sharded: plain
    pack = loaded.pack_per_param if dp > 1 else 0.0
    return max(blocks * (sharded + pack) + whole * (plain + pack) for blocks, whole in held)


def _blocks_in(split: Sequence[int], stage: int, layers: int) -> int:
    """Transformer blocks in ``stage`` of a split of [embedding, blocks..., head]."""
    first = sum(split[:stage])
    return sum(1 for i in range(first, first + split[stage]) if 1 <= i <= layers)


def _held(
    split: Sequence[int], counts: Sequence[int], layers: int, tp: int
) -> list[tuple[float, float]]:
    """Parameters each worker holds, as (of blocks, split over tp; of the embedding and head,
    whole)."""
    out: list[tuple[float, float]] = []
    first = 0
    for n in split:
        mine = range(first, first + n)
        out.append((sum(counts[i] / tp for i in mine if 1 <= i <= layers),
                    sum(counts[i] for i in mine if not 1 <= i <= layers)))  # fmt: skip
        first += n
    return out
