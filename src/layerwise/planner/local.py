"""``layerwise plan --local``: measure this CPU's per-layer costs, predict local layouts.

A layer built by the model family (a GPT block unless told otherwise) is timed forward and
backward with torch on CPU, with the threads each worker process would get. The per-layer
times feed the same core simulator as the GPU planner, so the prediction can later be
compared with a measured ``layerwise train`` run on this machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from layerwise.models.family import ModelFamily
from layerwise.models.gpt import GPTConfig, GPTFamily
from layerwise.planner.bubble import pipeline_time

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
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, threads))
        layer, x = family.sample_layer(micro_batch)
        return _time_layer(layer, x, repeats)
    finally:
        torch.set_num_threads(before)


def _time_layer(layer: nn.Module, x: Tensor, repeats: int) -> LayerCost:
    """Returns the median of ``repeats`` forward and backward passes of ``layer`` on ``x``."""
    # a floating-point input gets its gradient too, as it does on every stage but the first
    x = x.detach().requires_grad_(x.is_floating_point())
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # the first run warms up the allocator and kernels
        t0 = time.perf_counter()
        y = layer(x)
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    params = sum(p.numel() for p in layer.parameters())
    return LayerCost(sorted(fwd[1:])[repeats // 2], sorted(bwd[1:])[repeats // 2], params)


def predict_local(
    layers: int, hidden: int, heads: int, seq: int, micro_batch: int, global_batch: int,
    workers: int, cost: LayerCost | None = None, schedule: str = "1f1b",
    cores: int | None = None,
) -> list[dict[str, float | int | str]]:  # fmt: skip
    """Returns predicted step seconds for each (dp, tp, pp) split of ``workers`` CPU
    processes, fastest first. ``cost`` is measured when not given. Tensor parallelism divides
    a block's compute by tp and adds its all-reduces (two per pass, one activation each).

    With more workers than ``cores`` the workers share them: a step then takes at least the
    whole job's compute divided by the cores, however the schedule overlaps it."""
    cores = cores or os.cpu_count() or 1
    if cost is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        cost = measure_layer(hidden, heads, seq, micro_batch, threads)
    out: list[dict[str, float | int | str]] = []
    act_bytes = 4.0 * seq * micro_batch * hidden  # one fp32 activation between blocks
    send = LOCAL_LATENCY_S + act_bytes / (LOCAL_GBPS * 1e9)
    for tp in (t for t in range(1, workers + 1) if workers % t == 0 and heads % t == 0):
        # a ring all-reduce of one activation; a block does two in forward, two in backward
        ring = 2 * (tp - 1) * (LOCAL_LATENCY_S + act_bytes / tp / (LOCAL_GBPS * 1e9))
        for pp in (p for p in range(1, workers // tp + 1)
                   if (workers // tp) % p == 0 and layers % p == 0):  # fmt: skip
            dp = workers // (tp * pp)
            if global_batch % (dp * micro_batch):
                continue
            m = global_batch // (dp * micro_batch)
            per_stage = layers / pp
            f = per_stage * (cost.forward / tp + 2 * ring) + (send if pp > 1 else 0.0)
            b = per_stage * (cost.backward / tp + 2 * ring) + (send if pp > 1 else 0.0)
            pipe, bubble = pipeline_time(schedule, pp, m, 1, f, b, 0.0)
            if workers > cores:  # time-sliced: the busy time of all workers shares the cores
                pipe = max(pipe, dp * tp * pp * m * (f + b) / cores)
            grads = 4.0 * cost.params * layers / (pp * tp)  # fp32 gradients, ring all-reduce
            allreduce = 2 * (dp - 1) / dp * grads / (LOCAL_GBPS * 1e9) if dp > 1 else 0.0
            out.append({"layout": f"dp{dp} tp{tp} pp{pp} mb{micro_batch}", "dp": dp, "tp": tp,
                        "pp": pp, "num_microbatches": m, "step_time_s": pipe + allreduce,
                        "bubble_fraction": bubble, "layer_forward_s": cost.forward,
                        "layer_backward_s": cost.backward})  # fmt: skip
    return sorted(out, key=lambda r: float(r["step_time_s"]))
