"""Why a layout wins and why the others lose; what would fit when nothing does is
planner/fallback.py (re-exported here)."""

from __future__ import annotations

from dataclasses import replace

from layerwise.planner.evaluate import Evaluation
from layerwise.planner.fallback import memory_reason, suggestions
from layerwise.planner.memory import memory
from layerwise.planner.search import PlanResult
from layerwise.planner.specs import RECOMPUTE, ClusterSpec, ModelSpec, TrainSpec, compact_split
from layerwise.planner.stages import item_costs

__all__ = ["components", "loss_reason", "memory_reason", "rejected_for_memory", "suggestions",
           "why_winner"]  # fmt: skip


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
        cause = "output layer, smaller matmuls"
        if len(set(alt.stage_layers)) > 1:
            cause = f"uneven stages of {compact_split(alt.stage_layers)} layers"
        why = f"+{delta:.2f} s of compute on its slowest stage ({cause})"
    else:
        why = f"{part} +{delta:.2f} s"
    return f"{slower:+.0%} step time: {why}"


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
    if len(set(win.stage_layers)) > 1:
        lines.append(
            f"stages hold {compact_split(win.stage_layers)} transformer layers: the exact "
            f"min-max split, the embedding and the output layer counted as "
            f"{' and '.join(f'{c:.2f}' for c in _ends(model))} layers."
        )
    if lay.offload or lay.optimizer_bits != 32:
        saver = "8-bit optimizer states" if lay.optimizer_bits != 32 else "optimizer states"
        where = f" in host memory ({win.host_gib:.0f} GiB per node)" if lay.offload else ""
        lines.append(f"{saver}{where}: the optimizer step takes {win.optimizer_s:.2f} s.")
    for lighter in RECOMPUTE[: RECOMPUTE.index(lay.recompute)]:
        mem = memory(model, train, replace(lay, recompute=lighter))
        if mem.total > cluster.gpu.memory_gib:
            why = f"with recompute={lighter} this layout needs {mem.total:.1f} GiB"
        else:
            why = f"recompute={lighter} fits but its best layout is slower"
        lines.append(f"recompute={lay.recompute}: {why}.")
    if lay.dp > 1 and win.dp_comm_s > 0:
        lines.append(
            f"dp={lay.dp}: gradient reduction {win.dp_comm_s:.2f} s per step, "
            f"{win.dp_exposed_s:.2f} s of it not hidden behind the backward."
        )
    if len(result.ranked) > 1:
        gap = result.ranked[1].step_time_s / win.step_time_s - 1
        lines.append(f"The runner-up ({result.ranked[1].layout.describe()}) is {gap:.1%} slower.")
    return lines


def _ends(model: ModelSpec) -> tuple[float, float]:
    """Returns the embedding's and the output layer's cost in layer-equivalents."""
    costs = item_costs(model)
    return costs[0], costs[-1]


def rejected_for_memory(result: PlanResult, limit: float, count: int = 4) -> list[str]:
    """Returns lines for the closest misses among (tp, pp) pairs that never fit."""
    fit_pairs = result.fit_pairs
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
