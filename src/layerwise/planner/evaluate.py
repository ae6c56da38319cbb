"""Score one fixed layout: check it, then predict its memory and step time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerwise.planner.bubble import pipeline_time
from layerwise.planner.memory import Memory, memory
from layerwise.planner.specs import (
    RECOMPUTE,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    interleavable,
    schedules,
)
from layerwise.planner.timing import (
    DEFAULT_CALIBRATION,
    Calibration,
    StageCosts,
    data_parallel_s,
    optimizer_s,
    stage_costs,
    step_flops,
)
from layerwise.schedules import interleaved_form, problems


@dataclass(frozen=True)
class Evaluation:
    """The prediction for one layout; times in seconds, memory in GiB."""

    layout: Layout
    num_microbatches: int
    memory: Memory
    memory_limit_gib: float
    costs: StageCosts
    pipeline_s: float
    bubble_fraction: float
    dp_comm_s: float
    dp_exposed_s: float
    optimizer_s: float
    model_flops: float
    hardware_flops: float
    gpus: int
    peak_tflops: float

    @property
    def fits(self) -> bool:
        """Returns whether the most loaded GPU's memory is within the GPU's capacity."""
        return self.memory.total <= self.memory_limit_gib

    @property
    def step_time_s(self) -> float:
        """Returns the predicted seconds per optimizer step."""
        return self.pipeline_s + self.dp_exposed_s + self.optimizer_s

    @property
    def model_tflops_per_gpu(self) -> float:
        """Returns achieved model TFLOP/s per GPU (no recomputation counted)."""
        return self.model_flops / self.step_time_s / self.gpus / 1e12

    @property
    def hardware_tflops_per_gpu(self) -> float:
        """Returns achieved hardware TFLOP/s per GPU (recomputed FLOPs included)."""
        return self.hardware_flops / self.step_time_s / self.gpus / 1e12

    @property
    def mfu(self) -> float:
        """Returns model FLOPs utilisation: model TFLOP/s over the GPU's dense peak."""
        return self.model_tflops_per_gpu / self.peak_tflops

    def to_json(self) -> dict[str, Any]:
        """Returns a JSON-ready dict with the headline numbers and the breakdowns."""
        lay, c, m = self.layout, self.costs, self.num_microbatches
        return {
            "layout": {
                "dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp,
                "micro_batch": lay.micro_batch, "num_microbatches": m,
                "recompute": lay.recompute, "sequence_parallel": lay.sequence_parallel,
                "zero": lay.zero, "schedule": lay.schedule,
            },
            "fits": self.fits,
            "step_time_s": round(self.step_time_s, 4),
            "model_tflops_per_gpu": round(self.model_tflops_per_gpu, 1),
            "hardware_tflops_per_gpu": round(self.hardware_tflops_per_gpu, 1),
            "mfu": round(self.mfu, 4),
            "bubble_fraction": round(self.bubble_fraction, 4),
            "memory_gib": {**self.memory.as_dict(), "limit": self.memory_limit_gib},
            "time_s": {
                "pipeline": round(self.pipeline_s, 4),
                "matmul": round(m * c.matmul, 4),
                "elementwise": round(m * c.elementwise, 4),
                "recompute": round(m * c.recompute, 4),
                "tensor_parallel_comm": round(m * c.tensor_comm, 4),
                "pipeline_comm": round(m * c.pipeline_comm, 4),
                "data_parallel_comm": round(self.dp_comm_s, 4),
                "data_parallel_exposed": round(self.dp_exposed_s, 4),
                "optimizer": round(self.optimizer_s, 4),
            },
        }  # fmt: skip


def check_layout(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, lay: Layout) -> None:
    """Raises PlanError, saying what to change, if ``lay`` cannot run this model here."""
    if min(lay.dp, lay.tp, lay.pp, lay.vpp, lay.micro_batch) < 1:
        raise PlanError(f"all degrees and the micro-batch must be >= 1 (got {lay.describe()})")
    if lay.dp * lay.tp * lay.pp != cluster.gpus:
        raise PlanError(
            f"dp x tp x pp = {lay.dp} x {lay.tp} x {lay.pp} = {lay.dp * lay.tp * lay.pp}, "
            f"but the cluster has {cluster.gpus} GPUs ({cluster.nodes} nodes x "
            f"{cluster.gpus_per_node}); the product must equal the GPU count"
        )
    if model.heads % lay.tp:
        raise PlanError(
            f"tensor parallel degree {lay.tp} does not divide the {model.heads} attention heads"
        )
    if model.kv % lay.tp and lay.tp % model.kv:
        raise PlanError(f"tensor parallel degree {lay.tp} and {model.kv} KV heads do not divide")
    if model.layers % (lay.pp * lay.vpp):
        raise PlanError(
            f"{model.layers} layers cannot be split evenly into pp x vpp = "
            f"{lay.pp} x {lay.vpp} = {lay.pp * lay.vpp} stages"
        )
    if train.global_batch % (lay.dp * lay.micro_batch):
        raise PlanError(
            f"global batch {train.global_batch} is not a multiple of dp x micro-batch = "
            f"{lay.dp} x {lay.micro_batch}"
        )
    num_mb = train.global_batch // (lay.dp * lay.micro_batch)
    if lay.vpp > 1:
        _check_interleaving(lay, num_mb)
    if lay.recompute not in RECOMPUTE:
        raise PlanError(f"recompute must be one of {', '.join(RECOMPUTE)}, not {lay.recompute}")
    if lay.zero not in (0, 1, 2, 3):
        raise PlanError(f"zero stage must be 0, 1, 2 or 3, not {lay.zero}")
    if lay.schedule not in schedules():
        raise PlanError(f"schedule must be one of {', '.join(schedules())}, not {lay.schedule}")


def _check_interleaving(lay: Layout, num_microbatches: int) -> None:
    """Raises PlanError unless the layout's schedule can run with vpp > 1 chunks per worker:
    pp > 1, a registered interleaved form of it, and sizes that suit that form."""
    form = interleaved_form(lay.schedule)
    if lay.pp == 1 or form is None:
        raise PlanError(
            f"interleaving (vpp={lay.vpp}) needs pp > 1 and one of the schedules "
            f"{', '.join(interleavable())} (got pp={lay.pp}, schedule {lay.schedule})"
        )
    found = problems(form, lay.pp, num_microbatches, lay.vpp)
    if found:
        raise PlanError(
            f"interleaving (vpp={lay.vpp}) runs {form} with {num_microbatches} micro-batches "
            f"per step (global batch / (dp x micro-batch)): {'; '.join(found)}"
        )


def evaluate(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    lay: Layout,
    cal: Calibration = DEFAULT_CALIBRATION,
) -> Evaluation:
    """Returns the predicted memory and time of ``lay``; raises PlanError if it is invalid."""
    check_layout(model, cluster, train, lay)
    num_mb = train.global_batch // (lay.dp * lay.micro_batch)
    costs = stage_costs(model, cluster, lay, cal)
    v = lay.vpp
    pipe_s, bubble = pipeline_time(
        lay.schedule, lay.pp, num_mb, v, costs.forward / v, costs.backward / v, costs.head_forward
    )
    dp_total, dp_exposed = data_parallel_s(model, cluster, train, lay, costs, cal)
    model_flops, hw_flops = step_flops(model, train, lay.recompute)
    return Evaluation(
        layout=lay,
        num_microbatches=num_mb,
        memory=memory(model, train, lay),
        memory_limit_gib=cluster.gpu.memory_gib,
        costs=costs,
        pipeline_s=pipe_s,
        bubble_fraction=bubble,
        dp_comm_s=dp_total,
        dp_exposed_s=dp_exposed,
        optimizer_s=optimizer_s(model, cluster, lay, cal),
        model_flops=model_flops,
        hardware_flops=hw_flops,
        gpus=cluster.gpus,
        peak_tflops=cluster.gpu.peak_tflops,
    )
