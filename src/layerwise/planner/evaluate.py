"""Score one fixed layout: check it, then predict its memory and step time.

The step follows the slowest stage through the schedule: every stage's forward and backward
(its own layers, the output layer on the last) go to the core simulator, and the memory is
the most loaded worker's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerwise.planner import modes
from layerwise.planner.bubble import SplitCosts, pipeline_time, pipeline_time_split
from layerwise.planner.memory import Memory, memory
from layerwise.planner.specs import (
    OPTIMIZER_BITS,
    RECOMPUTE,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    interleavable,
    schedules,
)
from layerwise.planner.stages import (
    check_split,
    check_stage_count,
    resolve,
    stage_map,
    worker_layers,
)
from layerwise.planner.timing import (
    DEFAULT_CALIBRATION,
    Calibration,
    StageCosts,
    data_parallel_s,
    head_costs,
    layer_costs,
    optimizer_s,
    p2p_s,
    step_flops,
    worker_costs,
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
    stage_layers: tuple[int, ...] = ()  # transformer layers of each stage, in model order
    mode: str = "full"
    gpus_per_node: int = 8
    host_limit_gib: float | None = None  # CPU memory of a node; None: not known

    @property
    def host_gib(self) -> float:
        """Returns the host memory one node needs for its GPUs' offloaded states, in GiB."""
        return self.memory.host * self.gpus_per_node

    @property
    def fits(self) -> bool:
        """Returns whether the most loaded GPU's memory is within the GPU's capacity, and
        the offloaded states within the host's."""
        host_ok = self.host_gib == 0 or self.host_gib <= (self.host_limit_gib or 0.0)
        return self.memory.total <= self.memory_limit_gib and host_ok

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
            "mode": self.mode,
            "stage_layers": list(self.stage_layers),
            "fits": self.fits,
            "step_time_s": round(self.step_time_s, 4),
            "model_tflops_per_gpu": round(self.model_tflops_per_gpu, 1),
            "hardware_tflops_per_gpu": round(self.hardware_tflops_per_gpu, 1),
            "mfu": round(self.mfu, 4),
            "bubble_fraction": round(self.bubble_fraction, 4),
            "memory_gib": {**self.memory.as_dict(), "limit": self.memory_limit_gib},
            "host_memory_gib": {"needed": round(self.host_gib, 2), "limit": self.host_limit_gib},
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
    check_stage_count(model.layers, lay.pp * lay.vpp)
    if lay.stage_layers:
        check_split(lay.stage_layers, model.layers, lay.pp, lay.vpp)
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
    _check_mode(cluster, train, lay)


def _check_mode(cluster: ClusterSpec, train: TrainSpec, lay: Layout) -> None:
    """Raises PlanError for memory savers the training mode cannot use, and for an offload
    to a host whose memory is not known."""
    if lay.optimizer_bits not in OPTIMIZER_BITS:
        raise PlanError(f"--optimizer-bits must be 32 or 8, not {lay.optimizer_bits}")
    if train.mode == "inference" and (lay.recompute != "none" or lay.zero != 0):
        raise PlanError(
            "inference keeps no activations for a backward and no gradients or optimizer "
            "states: use --recompute none and --zero 0"
        )
    if not modes.trains_weights(train.mode) and (lay.offload or lay.optimizer_bits != 32):
        raise PlanError(
            f"--mode {train.mode} has no optimizer states to offload or quantize; drop "
            f"--offload and --optimizer-bits, or use --mode full or lora"
        )
    if lay.offload and cluster.host_memory_gib is None:
        raise PlanError(
            "--offload optimizer keeps the optimizer states in host memory, whose size is "
            "not known: give --host-memory-gib (CPU memory of one node in GiB, e.g. 2048 "
            "for a DGX H100)"
        )


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


@dataclass(frozen=True)
class PipelineCosts:
    """Per-micro-batch seconds of every stage, and of the slowest worker."""

    split: tuple[int, ...]
    stages: SplitCosts  # what every stage costs
    slowest: StageCosts  # the worker with the most work per micro-batch
    max_layers: int  # the most layers any worker holds (its states are the largest)


def pipeline_costs(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    lay: Layout,
    cal: Calibration = DEFAULT_CALIBRATION,
) -> PipelineCosts:
    """Returns the per-stage and per-worker costs of ``lay`` with its own or default split."""
    split = resolve(model, lay)
    layer = layer_costs(model, cluster, lay, cal, train)
    head = head_costs(model, cluster, lay, cal, train.mode)
    p2p = p2p_s(model, cluster, lay, cal)
    back_p2p = p2p if modes.has_backward(train.mode) else 0.0
    stages = SplitCosts(split, layer.forward, layer.backward, p2p, back_p2p, *head)
    owners = stage_map(lay)
    per_worker = worker_layers(split, owners, lay.pp)
    workers = [
        worker_costs(layer, n, lay.vpp, p2p, head if w == owners[-1] else (0.0, 0.0),
                     modes.has_backward(train.mode))
        for w, n in enumerate(per_worker)
    ]  # fmt: skip
    # ties go to the later worker: with equal layers the last one also runs the head
    slowest = max(reversed(workers), key=lambda c: c.forward + c.backward + c.head_forward
                  + c.head_backward)  # fmt: skip
    return PipelineCosts(split, stages, slowest, max(per_worker))


def _pipeline_s(
    train: TrainSpec, lay: Layout, num_mb: int, pc: PipelineCosts
) -> tuple[float, float]:
    """Returns (seconds, bubble fraction) of the pipeline part of the step."""
    v, c = lay.vpp, pc.slowest
    if train.mode == "full" and len(set(pc.split)) == 1:
        # Even stages: the cached one-chunk-shape simulation (the same numbers as before
        # uneven stages were modelled).
        return pipeline_time(
            lay.schedule, lay.pp, num_mb, v, c.forward / v, c.backward / v, c.head_forward
        )
    only_forward = not modes.has_backward(train.mode)
    return pipeline_time_split(lay.schedule, lay.pp, num_mb, v, pc.stages, only_forward)


def lower_bound_s(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, lay: Layout, cal: Calibration
) -> float:
    """Returns a bound on ``evaluate``'s step time: no worker can start before the first
    micro-batch has gone forward through the stages ahead of its first one, and then has
    all of its own work to do (the rest of the bubble left out)."""
    pc = pipeline_costs(model, cluster, train, lay, cal)
    m = train.global_batch // (lay.dp * lay.micro_batch)
    fwd, bwd = pc.stages.stages()
    if not modes.has_backward(train.mode):
        bwd = [0.0] * len(bwd)
    owners = stage_map(lay)
    work = [0.0] * lay.pp
    first: dict[int, int] = {}
    for s, w in enumerate(owners):
        work[w] += fwd[s] + bwd[s]
        first.setdefault(w, s)
    # 0.9: a margin for the rounding of the simulated costs (bubble.py), so that the bound
    # stays below the evaluated time
    pipe = max(0.9 * sum(fwd[: first[w]]) + m * work[w] for w in range(lay.pp))
    exposed = data_parallel_s(model, cluster, train, lay, pc.slowest, cal, pc.max_layers)[1]
    return pipe + exposed + optimizer_s(model, cluster, lay, cal, train, pc.max_layers)


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
    pc = pipeline_costs(model, cluster, train, lay, cal)
    pipe_s, bubble = _pipeline_s(train, lay, num_mb, pc)
    dp_total, dp_exposed = data_parallel_s(model, cluster, train, lay, pc.slowest, cal,
                                           pc.max_layers)  # fmt: skip
    model_flops, hw_flops = step_flops(model, train, lay.recompute)
    return Evaluation(
        layout=lay,
        num_microbatches=num_mb,
        memory=memory(model, train, lay, pc.split),
        memory_limit_gib=cluster.gpu.memory_gib,
        costs=pc.slowest,
        pipeline_s=pipe_s,
        bubble_fraction=bubble,
        dp_comm_s=dp_total,
        dp_exposed_s=dp_exposed,
        optimizer_s=optimizer_s(model, cluster, lay, cal, train, pc.max_layers),
        model_flops=model_flops,
        hardware_flops=hw_flops,
        gpus=cluster.gpus,
        peak_tflops=cluster.gpu.peak_tflops,
        stage_layers=pc.split,
        mode=train.mode,
        gpus_per_node=cluster.gpus_per_node,
        host_limit_gib=cluster.host_memory_gib,
    )
