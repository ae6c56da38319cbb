"""Why a layout wins, why the others lose, and what would fit when nothing does."""

from __future__ import annotations

from dataclasses import replace

from layerwise.planner.evaluate import Evaluation
from layerwise.planner.memory import Memory, memory
from layerwise.planner.search import Fixed, PlanResult, enumerate_layouts, plan
from layerwise.planner.specs import (
    GPU_PRESETS,
    RECOMPUTE,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
)


def components(ev: Evaluation) -> dict[str, float]:
    """Returns the seconds per step each cost accounts for (on the slowest stage)."""
    c, m = ev.costs, ev.num_microbatches
    return {
        "compute": m * (c.matmul + c.elementwise),
        "recomputation": m * c.recompute,
        "tensor-parallel all-reduces": m * c.tensor_comm,
        "pipeline sends": m * c.pipeline_comm,
        "pipeline bubble": ev.pipeline_s * ev.bubble_fraction,
        "exposed data-parallel reduction": ev.dp_exposed_s,
        "optimizer step": ev.optimizer_s,
    }


def loss_reason(alt: Evaluation, win: Evaluation, cluster: ClusterSpec) -> str:
    """Returns one phrase saying why ``alt`` is slower than ``win``."""
    slower = alt.step_time_s / win.step_time_s - 1
    lay = alt.layout
    a, w = components(alt), components(win)
    part = max(a, key=lambda k: a[k] - w[k])
    delta = a[part] - w[part]
    if part == "tensor-parallel all-reduces" and lay.tp > cluster.gpus_per_node:
        why = f"tensor parallel across nodes (tp={lay.tp} > {cluster.gpus_per_node} per node)"
    elif part == "pipeline bubble":
        why = f"bubble of {alt.bubble_fraction:.0%} (winner {win.bubble_fraction:.0%})"
    elif part == "recomputation":
        why = f"{lay.recompute} recomputation adds {delta:.2f} s of repeated forward"
    elif part == "compute":
        why = f"+{delta:.2f} s of compute on its slowest stage (output layer, smaller matmuls)"
    else:
        why = f"{part} +{delta:.2f} s"
    return f"{slower:+.0%} step time: {why}"


def memory_reason(mem: Memory, limit: float) -> str:
    """Returns 'over memory by N GiB' with the largest part named."""
    parts = {"weights+grads+optimizer": mem.weights + mem.gradients + mem.optimizer}
    parts["activations"] = mem.activations
    biggest = max(parts, key=lambda k: parts[k])
    return (
        f"over memory by {mem.total - limit:.1f} GiB "
        f"({mem.total:.1f} of {limit:.0f}; {biggest} {parts[biggest]:.1f})"
    )


def why_winner(
    result: PlanResult, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec
) -> list[str]:
    """Returns short sentences explaining the winner against the alternatives."""
    if not result.ranked:
        return []
    win = result.ranked[0]
    lay, lines = win.layout, []
    node = cluster.gpus_per_node
    if lay.tp > 1:
        where = "inside a node on NVLink" if lay.tp <= node else "across nodes (no other fit)"
        lines.append(f"tp={lay.tp} splits each layer {lay.tp} ways; its all-reduces stay {where}.")
    if lay.pp > 1:
        chunk = f" x {lay.vpp} chunks" if lay.vpp > 1 else ""
        lines.append(
            f"pp={lay.pp}{chunk} with {win.num_microbatches} micro-batches of {lay.micro_batch}:"
            f" the simulated bubble is {win.bubble_fraction:.1%} of the step."
        )
    else:
        lines.append("no pipeline: the model fits without one, so there is no bubble.")
    for lighter in RECOMPUTE[: RECOMPUTE.index(lay.recompute)]:
        mem = memory(model, train, replace(lay, recompute=lighter))
        if mem.total > cluster.gpu.memory_gib:
            why = f"with recompute={lighter} this layout needs {mem.total:.1f} GiB"
        else:
            why = f"recompute={lighter} fits but its best layout is slower"
        lines.append(f"recompute={lay.recompute}: {why}.")
    if lay.dp > 1:
        lines.append(
            f"dp={lay.dp}: gradient reduction {win.dp_comm_s:.2f} s per step, "
            f"{win.dp_exposed_s:.2f} s of it not hidden behind the backward."
        )
    if len(result.ranked) > 1:
        gap = result.ranked[1].step_time_s / win.step_time_s - 1
        lines.append(f"The runner-up ({result.ranked[1].layout.describe()}) is {gap:.1%} slower.")
    return lines


def rejected_for_memory(result: PlanResult, limit: float, count: int = 4) -> list[str]:
    """Returns lines for the closest misses among (tp, pp) pairs that never fit."""
    fit_pairs = {(ev.layout.tp, ev.layout.pp) for ev in result.ranked + result.alternatives}
    lines, seen = [], set()
    for lay, mem in result.over_memory:  # most-fitting first
        pair = (lay.tp, lay.pp)
        if pair in fit_pairs or pair in seen:
            continue
        seen.add(pair)
        lines.append(f"{lay.describe():36s} {memory_reason(mem, limit)}")
        if len(lines) == count:
            break
    return lines


def _least_memory(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> tuple[Layout, Memory] | None:
    best: tuple[Layout, Memory] | None = None
    for lay in enumerate_layouts(model, cluster, train, fixed):
        mem = memory(model, train, lay)
        if best is None or mem.total < best[1].total:
            best = (lay, mem)
    return best


def suggestions(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> list[str]:
    """Returns what would make something fit: more GPUs, recomputation, ZeRO-3, a shorter
    sequence or a larger GPU, each with the layout that would then fit."""
    out: list[str] = []
    limit = cluster.gpu.memory_gib

    def found(text: str, m: ModelSpec, c: ClusterSpec, f: Fixed) -> bool:
        try:
            ranked = plan(m, c, train, f, top=1).ranked
        except PlanError:
            return False
        if ranked:
            ev = ranked[0]
            out.append(
                f"{text}: {ev.layout.describe()} needs {ev.memory.total:.1f} GiB, "
                f"{ev.step_time_s:.2f} s/step"
            )
        return bool(ranked)

    least = _least_memory(model, cluster, train, fixed)
    if least:
        out.append(f"least memory here: {least[0].describe()}, {memory_reason(least[1], limit)}")
    if fixed.recompute not in (None, "full"):
        found("with full recomputation", model, cluster, replace(fixed, recompute="full"))
    if fixed.zero not in (None, 3):
        found("with ZeRO-3 (no pipeline)", model, cluster, replace(fixed, zero=3, pp=1))
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = replace(cluster, nodes=cluster.nodes * factor)
        if cluster.nodes == 1 and cluster.gpus_per_node * factor <= 8:
            bigger = replace(cluster, gpus_per_node=cluster.gpus_per_node * factor)
        if found(f"with {bigger.gpus} GPUs", model, bigger, replace(fixed, dp=None)):
            break
    seq = model.seq // 2
    while seq >= 256:
        if found(f"with sequence length {seq}", replace(model, seq=seq), cluster, fixed):
            break
        seq //= 2
    for gpu in sorted(GPU_PRESETS.values(), key=lambda g: g.memory_gib):
        if gpu.memory_gib > limit and found(
            f"on {gpu.name}", model, replace(cluster, gpu=gpu), fixed
        ):
            break
    return out
