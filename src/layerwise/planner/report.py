"""Text output of ``layerwise plan``: tables with memory and time breakdowns, and reasons."""

from __future__ import annotations

from dataclasses import replace

from layerwise.planner.evaluate import Evaluation
from layerwise.planner.explain import (
    components,
    loss_reason,
    rejected_for_memory,
    suggestions,
    why_winner,
)
from layerwise.planner.fallback import MODE_NAMES
from layerwise.planner.memory import total_params
from layerwise.planner.search import SHOWN_ALTERNATIVES, Fixed, PlanResult
from layerwise.planner.specs import ClusterSpec, ModelSpec, TrainSpec, compact_split

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
    host = (
        f"; {cluster.host_memory_gib:g} GiB host memory per node" if cluster.host_memory_gib else ""
    )
    return (
        f"model   {model.name}: {total_params(model) / 1e9:.1f}B parameters, {model.layers} "
        f"layers, hidden {model.hidden}, {model.heads} heads{kv}, ffn {model.ffn_size}, "
        f"seq {model.seq}, vocab {model.vocab}\n"
        f"cluster {cluster.nodes} x {cluster.gpus_per_node} {gpu.name} ({gpu.peak_tflops:.0f} "
        f"TFLOP/s, {gpu.memory_gib:.0f} GiB, NVLink {gpu.nvlink_gbps:g} GB/s, network "
        f"{gpu.network_gbps:g} GB/s, host link {gpu.host_gbps:g} GB/s per GPU{host})\n"
        f"train   global batch {train.global_batch} x {model.seq} tokens, {train.precision}, "
        f"{train.optimizer}, {mode_name(train.mode, train.lora_rank)}"
    )


def mode_name(mode: str, rank: int) -> str:
    """Returns the training mode in words, e.g. 'LoRA rank 16'."""
    return f"LoRA rank {rank}" if mode == "lora" else MODE_NAMES[mode]


def ranked_table(evs: list[Evaluation]) -> str:
    """Returns the ranking with throughput, memory (GiB) and time (s/step) breakdowns."""
    mem_cols = ("wts", "grads", "optim", "acts", "bufs", "total")
    width = max([36] + [len(ev.layout.describe()) for ev in evs])
    lines = [
        f"{'#':>2} {'layout':{width}s} {'step s':>7s} {'MFU':>6s} {'hwTF':>5s} |"
        + "".join(f"{c:>7s}" for c in mem_cols)
        + " |"
        + "".join(f"{c:>8s}" for c in TIME_SHORT.values())
    ]
    for i, ev in enumerate(evs, 1):
        mem = ev.memory.as_dict()
        parts = components(ev)
        lines.append(
            f"{i:>2} {ev.layout.describe():{width}s} {ev.step_time_s:7.2f} {ev.mfu:6.1%} "
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
    where = f"{cluster.gpus} x {cluster.gpu.name}"
    if result.instead_of is not None:
        full = result.instead_of
        out.append(f"Full training: {full.considered} layouts can run, none fits on {where}; "
                   f"--allow lora: planning LoRA rank {train.lora_rank} instead.")  # fmt: skip
        train = replace(train, mode=result.mode)
    n_fit = result.considered - len(result.over_memory)
    out.append(f"{result.considered} layouts can run; {n_fit} fit in {limit:.0f} GiB.")
    if not result.ranked:
        name = mode_name(train.mode, train.lora_rank)
        out.append(f"Nothing fits: {name} does not fit on {where}. What would, cheapest change "
                   f"first:")  # fmt: skip
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
        shown = result.alternatives[:SHOWN_ALTERNATIVES]
        width = max(36, *(len(alt.layout.describe()) for alt in shown))
        for alt in shown:
            out.append(f"  {alt.layout.describe():{width}s} {loss_reason(alt, win, cluster)}")
    missed = rejected_for_memory(result, limit)
    if missed:
        out += ["", "Rejected for memory (closest miss of each degree pair):"]
        out += [f"  {line}" for line in missed]
    return "\n".join(out)


def render_evaluation(ev: Evaluation, cluster: ClusterSpec) -> str:
    """Returns the text report of one evaluated layout."""
    verdict = "fits" if ev.fits else f"does NOT fit (limit {ev.memory_limit_gib:.0f} GiB)"
    host = ""
    if ev.layout.offload:
        host = f", {ev.host_gib:.0f} of {ev.host_limit_gib or 0:.0f} GiB host memory per node"
    return "\n".join(
        [
            ranked_table([ev]),
            "",
            f"{ev.layout.describe()} {verdict}{host}; {ev.mode}; stages of "
            f"{compact_split(ev.stage_layers)} layers; {ev.num_microbatches} micro-batches, "
            f"bubble {ev.bubble_fraction:.1%}, model {ev.model_tflops_per_gpu:.0f} TFLOP/s "
            f"per GPU, hardware {ev.hardware_tflops_per_gpu:.0f}.",
        ]
    )
