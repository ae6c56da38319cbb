"""``layerwise plan --local``: measure this CPU's per-layer costs, predict local layouts.

A small GPT-like block (pre-norm attention + GeLU MLP) is timed forward and backward with
torch on CPU, with the threads each worker process would get. The per-layer times feed the
same core simulator as the GPU planner, so the prediction can later be compared with a
measured ``layerwise train`` run on this machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.planner.bubble import pipeline_time

# Documented defaults for gloo over loopback between processes (not fitted).
LOCAL_LATENCY_S = 100e-6
LOCAL_GBPS = 2.0


class _Block(nn.Module):
    """A GPT block: x + attn(ln(x)), then x + mlp(ln(x)); shapes (b, s, h)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, nh, s, hs)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@dataclass(frozen=True)
class LayerCost:
    """Measured seconds of one block for one micro-batch."""

    forward: float
    backward: float
    params: int


def measure_layer(
    hidden: int, heads: int, seq: int, micro_batch: int, threads: int, repeats: int = 5
) -> LayerCost:
    """Returns the median forward and backward seconds of one block on this CPU."""
    before = torch.get_num_threads()
    try:
        return _measure(hidden, heads, seq, micro_batch, threads, repeats)
    finally:
        torch.set_num_threads(before)


def _measure(hidden: int, heads: int, seq: int, micro_batch: int, threads: int,
             repeats: int) -> LayerCost:  # fmt: skip
    torch.set_num_threads(max(1, threads))
    block = _Block(hidden, heads)
    x = torch.randn(micro_batch, seq, hidden, requires_grad=True)
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # the first run warms up the allocator and kernels
        t0 = time.perf_counter()
        y = block(x)
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    params = sum(p.numel() for p in block.parameters())
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
