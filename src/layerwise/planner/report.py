"""Text output of ``layerwise plan``: tables with memory and time breakdowns, and reasons."""

from __future__ import annotations

from layerwise.planner.evaluate import Evaluation
from layerwise.planner.explain import (
    components,
    loss_reason,
    rejected_for_memory,
    suggestions,
    why_winner,
)
from layerwise.planner.memory import total_params
from layerwise.planner.search import Fixed, PlanResult
from layerwise.planner.specs import ClusterSpec, ModelSpec, TrainSpec

MEMORY_COLUMNS = ("weights", "gradients", "optimizer", "activations", "buffers", "total")
TIME_SHORT = {
    "compute": "compute",
    "recomputation": "recomp",
    "tensor-parallel all-reduces": "tp-comm",
    "pipeline sends": "pp-comm",
    "pipeline bubble": "bubble",
    "exposed data-parallel reduction": "dp-comm",
    "optimizer step": "optim",
}


def header(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec) -> str:
    """Returns a three-line summary of the inputs."""
    gpu = cluster.gpu
    kv = f" (kv {model.kv})" if model.kv != model.heads else ""
    return (
        f"model   {model.name}: {total_params(model) / 1e9:.1f}B parameters, {model.layers} "
        f"layers, hidden {model.hidden}, {model.heads} heads{kv}, ffn {model.ffn_size}, "
        f"seq {model.seq}, vocab {model.vocab}\n"
        f"cluster {cluster.nodes} x {cluster.gpus_per_node} {gpu.name} ({gpu.peak_tflops:.0f} "
        f"TFLOP/s, {gpu.memory_gib:.0f} GiB, NVLink {gpu.nvlink_gbps:.0f} GB/s, network "
        f"{gpu.network_gbps:.0f} GB/s per GPU)\n"
        f"train   global batch {train.global_batch} x {model.seq} tokens, {train.precision}, "
        f"{train.optimizer}"
    )


def ranked_table(evs: list[Evaluation]) -> str:
    """Returns the ranking with throughput, memory (GiB) and time (s/step) breakdowns."""
    mem_cols = ("wts", "grads", "optim", "acts", "bufs", "total")
    lines = [
        f"{'#':>2} {'layout':36s} {'step s':>7s} {'MFU':>6s} {'hwTF':>5s} |"
        + "".join(f"{c:>7s}" for c in mem_cols)
        + " |"
        + "".join(f"{c:>8s}" for c in TIME_SHORT.values())
    ]
    for i, ev in enumerate(evs, 1):
        mem = ev.memory.as_dict()
        parts = components(ev)
        lines.append(
            f"{i:>2} {ev.layout.describe():36s} {ev.step_time_s:7.2f} {ev.mfu:6.1%} "
            f"{ev.hardware_tflops_per_gpu:5.0f} |"
            + "".join(f"{mem[c]:7.1f}" for c in MEMORY_COLUMNS)
            + " |"
            + "".join(f"{parts[k]:8.2f}" for k in TIME_SHORT)
        )
    lines.append(
        "(memory: GiB per GPU, most loaded stage; time: seconds per step on the slowest stage;"
        " hwTF: hardware TFLOP/s per GPU)"
    )
    return "\n".join(lines)


def render_plan(
    result: PlanResult, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> str:
    """Returns the full text report of a search."""
    out = [header(model, cluster, train), ""]
    limit = cluster.gpu.memory_gib
    n_fit = result.considered - len(result.over_memory)
    out.append(f"{result.considered} layouts divide evenly; {n_fit} fit in {limit:.0f} GiB.")
    if not result.ranked:
        out.append("Nothing fits. What would:")
        out += [f"  - {s}" for s in suggestions(model, cluster, train, fixed)]
        return "\n".join(out)
    win = result.ranked[0]
    out += ["", ranked_table(result.ranked), ""]
    out.append(
        f"Best: {win.layout.describe()}: {win.step_time_s:.2f} s/step, "
        f"{train.global_batch * model.seq / win.step_time_s:,.0f} tokens/s, "
        f"MFU {win.mfu:.1%}, {win.memory.total:.1f} of {limit:.0f} GiB."
    )
    out += [f"  - {line}" for line in why_winner(result, model, cluster, train)]
    if result.alternatives:
        out += ["", "Best alternatives of other kinds, and why they lose:"]
        for alt in result.alternatives[:8]:
            out.append(f"  {alt.layout.describe():36s} {loss_reason(alt, win, cluster)}")
    missed = rejected_for_memory(result, limit)
    if missed:
        out += ["", "Rejected for memory (closest miss of each degree pair):"]
        out += [f"  {line}" for line in missed]
    return "\n".join(out)


def render_evaluation(ev: Evaluation, cluster: ClusterSpec) -> str:
    """Returns the text report of one evaluated layout."""
    verdict = "fits" if ev.fits else f"does NOT fit (limit {ev.memory_limit_gib:.0f} GiB)"
    return "\n".join(
        [
            ranked_table([ev]),
            "",
            f"{ev.layout.describe()} {verdict}; {ev.num_microbatches} micro-batches, "
            f"bubble {ev.bubble_fraction:.1%}, model {ev.model_tflops_per_gpu:.0f} TFLOP/s "
            f"per GPU, hardware {ev.hardware_tflops_per_gpu:.0f}.",
        ]
    )
