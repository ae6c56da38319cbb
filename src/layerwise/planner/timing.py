"""Per-step time of one layout: compute, tensor/pipeline/data-parallel communication, bubble.

FLOPs follow Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM"), Eq. 3: a layer's forward is 24 b s h^2 (1 + s/(6h)) FLOPs,
the logit layer 2 b s h V, backward twice the forward. *Model* FLOPs count forward and
backward once; *hardware* FLOPs add what recomputation runs again. Modes without weight
gradients (LoRA, frozen) run input-gradient matmuls only, inference no backward at all
(planner/modes.py).

Every time below is a physical rate applied to a count of FLOPs or bytes. The constants of
``Calibration`` are the only fitted numbers (see docs/planner.md, "Calibration").
"""

from __future__ import annotations

from dataclasses import dataclass

from layerwise.planner import modes
from layerwise.planner.memory import layer_activation_bytes, layer_params
from layerwise.planner.params import adapter_params
from layerwise.planner.specs import ClusterSpec, Layout, ModelSpec, TrainSpec, check_fields


@dataclass(frozen=True)
class Calibration:
    """The physical parameters of the time model (fitted values are marked)."""

    # FITTED: fraction of the dense peak that large GEMMs sustain. Fitted jointly with
    # ``elementwise_traffic`` on the 14 published runs of tests/data (least relative error).
    matmul_efficiency: float = 0.74
    # FITTED: bytes moved through HBM by the non-matmul kernels (norms, softmax, GeLU,
    # dropout, residuals, forward + backward share) per byte of activation the layer produces.
    elementwise_traffic: float = 2.5
    # Documented defaults: NCCL bus bandwidth / link bandwidth, and per-collective latency.
    nvlink_efficiency: float = 0.75
    network_efficiency: float = 0.80
    latency_s: float = 20e-6
    # A fused Adam step reads and writes about 32 bytes per parameter (fp32 master, m, v,
    # gradient in; master, m, v and the 16-bit copy out), at HBM speed.
    optimizer_bytes_per_param: float = 32.0
    # Offload (documented defaults): pinned host copies reach about 80 % of the PCIe link;
    # the CPU optimizer step streams its bytes at 25 GB/s per GPU (a two-socket host's
    # 200-400 GB/s of DRAM bandwidth shared by 8 GPUs).
    host_efficiency: float = 0.80
    cpu_optimizer_gbps: float = 25.0

    def __post_init__(self) -> None:
        """Raises PlanError for an efficiency or traffic that cannot be a rate."""
        # only these two can be set from the command line; the others are fixed defaults
        check_fields(self, positive=("matmul_efficiency",), not_negative=("elementwise_traffic",))


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class StageCosts:
    """Seconds for one micro-batch through one pipeline worker (the slowest one)."""

    forward: float  # the worker's layers and its pipeline sends (all of its chunks)
    backward: float  # the same, including any recomputation
    head_forward: float  # the output layer and loss, on the last worker only
    matmul: float  # parts of forward + backward, for the breakdown
    elementwise: float
    recompute: float
    tensor_comm: float
    pipeline_comm: float
    head_backward: float = -1.0  # the output layer's backward; -1: twice its forward

    def __post_init__(self) -> None:
        """Fills in the output layer's backward when it was not given."""
        if self.head_backward < 0:
            object.__setattr__(self, "head_backward", 2 * self.head_forward)


@dataclass(frozen=True)
class LayerCosts:
    """Seconds of one transformer layer for one micro-batch on one GPU."""

    forward: float
    backward: float  # including recomputation
    matmul: float  # forward + backward
    elementwise: float  # forward + backward
    recompute: float
    tensor_comm: float  # forward + backward


def layer_forward_flops(m: ModelSpec, micro_batch: int) -> float:
    """Returns the matmul FLOPs of one layer's forward for one micro-batch (all TP ranks)."""
    s, h, d = m.seq, m.hidden, m.hidden // m.heads
    proj = h * (m.heads + 2 * m.kv) * d + h * h + (3 if m.gated_mlp else 2) * h * m.ffn_size
    return 2.0 * s * micro_batch * proj + 4.0 * s * s * micro_batch * h


def attention_core_flops(m: ModelSpec, micro_batch: int) -> float:
    """Returns the FLOPs of Q K^T and attention-over-V (what selective recompute repeats)."""
    return 4.0 * m.seq * m.seq * micro_batch * m.hidden


def logit_forward_flops(m: ModelSpec, micro_batch: int) -> float:
    """Returns the FLOPs of the output layer's forward for one micro-batch."""
    return 2.0 * m.seq * micro_batch * m.hidden * m.vocab


def step_flops(
    m: ModelSpec, train: TrainSpec, recompute: str, rank: int | None = None
) -> tuple[float, float]:
    """Returns (model FLOPs, hardware FLOPs) of one optimizer step over the whole cluster."""
    b = train.global_batch
    layer, logits = m.layers * layer_forward_flops(m, 1), logit_forward_flops(m, 1)
    passes = 1.0 + modes.backward_matmul_factor(train.mode)
    model = passes * (layer + logits) * b
    adapters = 0.0
    if train.mode == "lora":  # forward, input and weight gradients of the adapters
        adapters = m.layers * 2.0 * m.seq * adapter_params(m, rank or train.lora_rank)
        model += 3.0 * adapters * b
    if not modes.has_backward(train.mode):
        extra = 0.0
    elif recompute == "full":
        extra = (layer + adapters) * b
    elif recompute == "selective":
        extra = m.layers * attention_core_flops(m, 1) * b
    else:
        extra = 0.0
    return model, model + extra


def allreduce_s(nbytes: float, ranks: int, gbps: float, cal: Calibration) -> float:
    """Returns the seconds of a ring all-reduce: 2 (n-1)/n of the data crosses each link."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (ranks - 1) * cal.latency_s + 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9)


def reduce_scatter_s(nbytes: float, ranks: int, gbps: float, cal: Calibration) -> float:
    """Returns the seconds of a ring reduce-scatter (or all-gather): half an all-reduce."""
    return 0.5 * allreduce_s(nbytes, ranks, gbps, cal)


def link_gbps(cluster: ClusterSpec, size: int, stride: int, cal: Calibration) -> float:
    """Returns the usable per-GPU bus bandwidth (GB/s) of a ring over ``size`` ranks.

    Ranks are ``stride`` apart (Megatron's order: tp fastest, then dp, then pp). Inside a
    node the ring runs on NVLink. Across nodes NCCL runs one ring per NIC, so a node's k
    members move their share through k NICs in parallel: k x the per-GPU network bandwidth,
    at most the NVLink bandwidth.
    """
    gpu, per_node = cluster.gpu, cluster.gpus_per_node
    nvlink = gpu.nvlink_gbps * cal.nvlink_efficiency
    if size * stride <= per_node:
        return nvlink
    k = max(1, min(size, per_node // stride))
    return min(nvlink, k * gpu.network_gbps * cal.network_efficiency)


def layer_costs(
    m: ModelSpec,
    cluster: ClusterSpec,
    lay: Layout,
    cal: Calibration = DEFAULT_CALIBRATION,
    train: TrainSpec | None = None,
) -> LayerCosts:
    """Returns the forward and backward seconds of one layer for one micro-batch."""
    mode = train.mode if train else "full"
    gpu, t, b = cluster.gpu, lay.tp, lay.micro_batch
    flops_rate = gpu.peak_tflops * 1e12 * cal.matmul_efficiency
    mm_f = layer_forward_flops(m, b) / t / flops_rate
    ew_f = cal.elementwise_traffic * layer_activation_bytes(m, lay, stored=False)
    ew_f /= gpu.hbm_gbps * 1e9
    # Megatron's two all-reduces per layer and pass (or all-gather + reduce-scatter with
    # sequence parallelism: the same bytes), on the critical path (Narayanan et al. Sec. 3.2).
    act = 2.0 * m.seq * b * m.hidden
    tp_f = 2 * allreduce_s(act, t, link_gbps(cluster, t, 1, cal), cal)
    lora_f = 0.0
    if mode == "lora" and train:  # x A then (x A) B for every adapted matrix
        lora_f = 2.0 * m.seq * b * adapter_params(m, train.lora_rank) / t / flops_rate
    fwd = mm_f + lora_f + ew_f + tp_f
    if not modes.has_backward(mode):
        return LayerCosts(fwd, 0.0, mm_f + lora_f, ew_f, 0.0, tp_f)
    if lay.recompute == "full":
        rec = fwd
    elif lay.recompute == "selective":
        rec = attention_core_flops(m, b) / t / flops_rate
    else:
        rec = 0.0
    mm_b = modes.backward_matmul_factor(mode) * mm_f + 2 * lora_f
    return LayerCosts(
        forward=fwd,
        backward=mm_b + 2 * ew_f + tp_f + rec,
        matmul=mm_f + lora_f + mm_b,
        elementwise=3 * ew_f,
        recompute=rec,
        tensor_comm=2 * tp_f,
    )


def head_costs(
    m: ModelSpec,
    cluster: ClusterSpec,
    lay: Layout,
    cal: Calibration = DEFAULT_CALIBRATION,
    mode: str = "full",
) -> tuple[float, float]:
    """Returns (forward, backward) seconds of the logit layer and the fp32 cross-entropy
    for one micro-batch: backward is twice the forward with a trained head, once with a
    frozen one (input gradient only), nothing in inference."""
    gpu, t, b = cluster.gpu, lay.tp, lay.micro_batch
    head_f = logit_forward_flops(m, b) / t / (gpu.peak_tflops * 1e12 * cal.matmul_efficiency)
    head_f += cal.elementwise_traffic * 4.0 * m.seq * b * m.vocab / t / (gpu.hbm_gbps * 1e9)
    return head_f, modes.backward_matmul_factor(mode) * head_f


def p2p_s(m: ModelSpec, cluster: ClusterSpec, lay: Layout, cal: Calibration) -> float:
    """Returns the seconds of one pipeline send between stages (the activation, split over
    tp ranks, Narayanan Sec. 4.1); 0 without a pipeline."""
    if lay.pp == 1:
        return 0.0
    # Neighbouring stages are tp * dp ranks apart: on another node once that reaches a
    # node; each tp rank then sends its 1/t share through its own NIC.
    apart = lay.tp * lay.dp
    gbps = cluster.gpu.nvlink_gbps * cal.nvlink_efficiency
    if apart >= cluster.gpus_per_node or apart * lay.pp > cluster.gpus_per_node:
        gbps = cluster.gpu.network_gbps * cal.network_efficiency
    return cal.latency_s + 2.0 * m.seq * lay.micro_batch * m.hidden / lay.tp / (gbps * 1e9)


def worker_costs(
    layer: LayerCosts,
    layers: float,
    chunks: int,
    p2p: float,
    head: tuple[float, float] = (0.0, 0.0),
    backward_sends: bool = True,
) -> StageCosts:
    """Returns the per-micro-batch costs of a worker with ``layers`` layers in ``chunks``
    stages, each sending once forward (and once back), plus ``head`` on the last worker."""
    sends = p2p * chunks
    back = sends if backward_sends else 0.0
    return StageCosts(
        forward=layers * layer.forward + sends,
        backward=layers * layer.backward + back,
        head_forward=head[0],
        matmul=layers * layer.matmul + (head[0] + head[1]),
        elementwise=layers * layer.elementwise,
        recompute=layers * layer.recompute,
        tensor_comm=layers * layer.tensor_comm,
        pipeline_comm=sends + back,
        head_backward=head[1],
    )


def trained_params(
    m: ModelSpec, train: TrainSpec, lay: Layout, layers: float | None = None
) -> tuple[float, float]:
    """Returns (trained, all) parameters per GPU of the worker with ``layers`` layers
    (default: an even share), counting one vocabulary-sized table on every worker."""
    layers = m.layers / lay.pp if layers is None else layers
    every = layers * layer_params(m) / lay.tp + m.vocab * m.hidden / lay.tp
    if train.mode == "full":
        return every, every
    if train.mode == "lora":
        return layers * adapter_params(m, train.lora_rank) / lay.tp, every
    return 0.0, every


def data_parallel_s(
    m: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    lay: Layout,
    costs: StageCosts,
    cal: Calibration = DEFAULT_CALIBRATION,
    layers: float | None = None,
) -> tuple[float, float]:
    """Returns (total, exposed) seconds of data-parallel communication per step, for the
    worker with ``layers`` layers (default: an even share).

    The reduction of a stage's gradients either runs after the pipeline flush (exposed) or
    overlaps the last micro-batch's backward. ZeRO-2 and -3 keep gradients sharded, so they
    reduce-scatter after every micro-batch, and ZeRO-3 also gathers the weights for the
    forward and the backward of every micro-batch; those overlap the micro-batch's compute.
    """
    d = lay.dp
    trained, every = trained_params(m, train, lay, layers)
    if d <= 1 or (trained == 0 and lay.zero < 3):
        return 0.0, 0.0
    g_bytes, w_bytes = modes.grad_bytes(train), modes.weight_bytes(train)
    gather_bytes = w_bytes if train.mode == "full" else modes.FROZEN_WEIGHT_BYTES
    gbps = link_gbps(cluster, d, lay.tp, cal)
    num_mb = train.global_batch // (d * lay.micro_batch)
    if lay.zero <= 1:
        # All-reduce, or reduce-scatter + all-gather of the updated 16-bit weights.
        volume = 2 * g_bytes if lay.zero == 0 else g_bytes + w_bytes
        total = reduce_scatter_s(trained * volume, d, gbps, cal)
        window = costs.backward / lay.vpp if train.overlap_grad_reduce else 0.0
        return total, max(0.0, total - window)
    gathers = 2 * every * gather_bytes if lay.zero == 3 else 0.0
    per_mb = reduce_scatter_s(trained * g_bytes + gathers, d, gbps, cal)
    end = reduce_scatter_s(trained * w_bytes, d, gbps, cal) if lay.zero == 2 else 0.0
    total = per_mb * num_mb + end
    exposed = num_mb * max(0.0, per_mb - (costs.forward + costs.backward)) + end
    return total, exposed


def optimizer_s(
    m: ModelSpec,
    cluster: ClusterSpec,
    lay: Layout,
    cal: Calibration = DEFAULT_CALIBRATION,
    train: TrainSpec | None = None,
    layers: float | None = None,
) -> float:
    """Returns the seconds of the optimizer step on the largest worker's (sharded) states:
    at HBM speed on the GPU, or with ``lay.offload`` the gradients down and the updated
    weights up the host link plus the CPU step (all on the critical path: ZeRO-Offload's
    overlap of the copies with the backward and its delayed update are not modelled)."""
    train = train or TrainSpec(global_batch=1)
    trained, _ = trained_params(m, train, lay, layers)
    shard = trained / (lay.dp if lay.zero >= 1 else 1)
    step_bytes = modes.optimizer_step_bytes(train, lay, cal.optimizer_bytes_per_param)
    if not lay.offload:
        return shard * step_bytes / (cluster.gpu.hbm_gbps * 1e9)
    link = cluster.gpu.host_gbps * cal.host_efficiency * 1e9
    copies = shard * (modes.grad_bytes(train) + modes.weight_bytes(train)) / link
    return copies + shard * step_bytes / (cal.cpu_optimizer_gbps * 1e9)
