"""What fits when nothing does: each change that could make the run fit, with the memory and
speed of its best layout, the cheapest change first.

Changes are ordered by what they give up (docs/planner.md, "When nothing fits"):

0. nothing of the result: the same training on the same GPUs with 8-bit optimizer states,
   the states in host memory, both, or a memory saver the user had pinned off (full
   recomputation, ZeRO-3); the fastest of these first;
1. part of the training: LoRA adapters instead of every weight, or a shorter sequence;
2. the training itself: inference only;
3. nothing but money: more GPUs, then a larger GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from layerwise.planner import modes
from layerwise.planner.evaluate import Evaluation
from layerwise.planner.memory import Memory, memory
from layerwise.planner.search import Fixed, enumerate_layouts, plan
from layerwise.planner.specs import (
    GPU_PRESETS,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
)

MODE_NAMES = {"full": "full training", "lora": "LoRA", "frozen": "frozen-weight training",
              "inference": "inference"}  # fmt: skip


@dataclass(frozen=True)
class Change:
    """One change to the run, and what it gives."""

    label: str  # in words, e.g. "8-bit optimizer states"
    flag: str  # the command-line change, e.g. "--optimizer-bits 8"
    tier: int  # what it gives up (see the module docstring)
    best: Evaluation | None  # its fastest fitting layout; None: it does not fit either
    least: Memory | None = None  # when it does not fit: the least memory it needs
    host_known: bool = True  # whether the host memory was given (offload changes)


def memory_reason(mem: Memory, limit: float) -> str:
    """Returns 'over memory by N GiB' with the largest part named."""
    parts = {"weights+grads+optimizer": mem.weights + mem.gradients + mem.optimizer}
    parts["activations"] = mem.activations
    biggest = max(parts, key=lambda k: parts[k])
    return (
        f"over memory by {mem.total - limit:.1f} GiB "
        f"({mem.total:.1f} of {limit:.0f}; {biggest} {parts[biggest]:.1f})"
    )


def least_memory(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> tuple[Layout, Memory] | None:
    """Returns the layout that needs the least GPU memory, and its memory."""
    best: tuple[Layout, Memory] | None = None
    for lay in enumerate_layouts(model, cluster, train, fixed):
        mem = memory(model, train, lay)
        if best is None or mem.total < best[1].total:
            best = (lay, mem)
    return best


def _try(
    label: str, flag: str, tier: int, model: ModelSpec, cluster: ClusterSpec,
    train: TrainSpec, fixed: Fixed, least: bool = True,
) -> Change:  # fmt: skip
    """Returns the change with its best layout, or (if ``least``) with the least memory it
    would need."""
    fixed = replace(fixed, allow=())
    host_known = cluster.host_memory_gib is not None
    if fixed.offload and not host_known:
        cluster = replace(cluster, host_memory_gib=math.inf)  # report what the host needs
    try:
        ranked = plan(model, cluster, train, fixed, top=1).ranked
    except PlanError:
        return Change(label, flag, tier, None)
    if ranked:
        return Change(label, flag, tier, ranked[0], host_known=host_known)
    missed = least_memory(model, cluster, train, fixed) if least else None
    return Change(label, flag, tier, None, missed[1] if missed else None, host_known)


def changes(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed) -> list[Change]:
    """Returns every change tried, cheapest first (by tier, then by step time in tier 0)."""
    out: list[Change] = []

    def add(label: str, flag: str, tier: int, m: ModelSpec = model, c: ClusterSpec = cluster,
            t: TrainSpec = train, f: Fixed = fixed, keep: bool = True) -> bool:  # fmt: skip
        """Tries one change; keeps it if it fits or ``keep``; returns whether it fits."""
        change = _try(label, flag, tier, m, c, t, f, least=keep)
        if change.best is not None or keep:
            out.append(change)
        return change.best is not None

    if modes.trains_weights(train.mode):
        add("8-bit optimizer states", "--optimizer-bits 8", 0, f=replace(fixed, optimizer_bits=8))
        add("optimizer states in host memory", "--offload optimizer", 0,
            f=replace(fixed, offload=True))  # fmt: skip
        add("8-bit optimizer states in host memory", "--optimizer-bits 8 --offload optimizer",
            0, f=replace(fixed, offload=True, optimizer_bits=8))  # fmt: skip
    if fixed.recompute not in (None, "full"):
        add("with full recomputation", "--recompute full", 0, f=replace(fixed, recompute="full"))
    if fixed.zero not in (None, 3):
        add("with ZeRO-3 (no pipeline)", "--zero 3 --pp 1", 0, f=replace(fixed, zero=3, pp=1))
    if train.mode == "full":
        add(f"LoRA rank {train.lora_rank} instead of training every weight", "--mode lora", 1,
            t=replace(train, mode="lora"))  # fmt: skip
    seq = model.seq // 2
    while seq >= 256 and not add(f"with sequence length {seq}", f"--seq {seq}", 1,
                                 m=replace(model, seq=seq), keep=False):  # fmt: skip
        seq //= 2
    if train.mode != "inference":
        add(
            "inference only",
            "--mode inference",
            2,
            t=replace(train, mode="inference"),
            f=replace(fixed, recompute=None, zero=None, offload=None, optimizer_bits=None),
        )
    _more_hardware(add, cluster, fixed)
    return sorted(out, key=lambda c: (c.tier, c.best.step_time_s if c.tier == 0 and c.best
                                      else 0.0))  # fmt: skip


def _more_hardware(add: Callable[..., bool], cluster: ClusterSpec, fixed: Fixed) -> None:
    """Adds the smallest multiple of the GPU count that fits, and the smallest GPU with at
    least a tenth more memory that fits."""
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = replace(cluster, nodes=cluster.nodes * factor)
        if cluster.nodes == 1 and cluster.gpus_per_node * factor <= 8:
            bigger = replace(cluster, gpus_per_node=cluster.gpus_per_node * factor)
        if add(f"with {bigger.gpus} GPUs", f"--gpus {bigger.gpus}", 3, c=bigger,
               f=replace(fixed, dp=None), keep=False):  # fmt: skip
            break
    limit = cluster.gpu.memory_gib
    for gpu in sorted(GPU_PRESETS.values(), key=lambda g: g.memory_gib):
        if gpu.memory_gib > 1.1 * limit and add(
            f"on {gpu.name}", f"--gpu {gpu.name}", 3, c=replace(cluster, gpu=gpu), keep=False
        ):
            break


def describe_change(change: Change, seq: int, global_batch: int) -> str:
    """Returns one line: the change, its flag, its best layout's memory and speed."""
    ev = change.best
    assert ev is not None
    host = ""
    if ev.layout.offload:
        host = f" + {ev.host_gib:.0f} GiB of host memory per node"
        if not change.host_known:
            host += " (give --host-memory-gib to check the host has it)"
    tokens = global_batch * seq / ev.step_time_s
    return (
        f"{change.label} ({change.flag}): {ev.layout.describe()} needs {ev.memory.total:.1f} "
        f"GiB per GPU{host}; {ev.step_time_s:.2f} s/step, {tokens:,.0f} tokens/s, "
        f"MFU {ev.mfu:.0%}"
    )


def suggestions(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> list[str]:
    """Returns lines saying what would make something fit, cheapest change first: the least
    memory any layout needs here, each change that fits with its memory and speed, the
    changes that are not enough alone, and the cheapest one."""
    out: list[str] = []
    limit = cluster.gpu.memory_gib
    least = least_memory(model, cluster, train, fixed)
    if least:
        out.append(f"least memory here: {least[0].describe()}, {memory_reason(least[1], limit)}")
    tried = changes(model, cluster, train, fixed)
    fitting = [c for c in tried if c.best is not None]
    for change in fitting:
        seq = model.seq if not change.flag.startswith("--seq") else int(change.flag.split()[1])
        out.append(describe_change(change, seq, train.global_batch))
    short = [c for c in tried if c.best is None and c.least is not None]
    if short:
        out.append("not enough alone: " + ", ".join(
            f"{c.flag} (needs {c.least.total:.1f} GiB)" for c in short if c.least))  # fmt: skip
    if fitting:
        out.append(f"cheapest change that fits: {fitting[0].label} ({fitting[0].flag})")
    return out
