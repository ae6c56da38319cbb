"""Per-GPU memory of one layout: weights, gradients, optimizer states, activations, buffers.

Formulas:
- parameters of a transformer layer: 12h^2 + 13h for GPT (Narayanan et al. 2021, Sec. 5.1),
  generalised here to grouped-query attention and gated MLPs;
- stored activations of one layer: Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", Sec. 4 and Table 2, kept as its parts so that
  GQA, SwiGLU, no dropout and fused attention change only the parts they touch;
- micro-batches in flight on each stage: what the schedule's registry entry declares, e.g.
  p - stage for 1F1B, and for stage 0 the factor (1 + (p-1)/(p v)) of the interleaved
  schedule (Korthikanti et al. 2022, Sec. 4.2.3);
- bytes per parameter of each training mode, 8-bit states and offload: planner/modes.py.

Every worker is costed with its own layers (stages may be uneven); the layout's memory is
the worst worker's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from layerwise.planner import modes
from layerwise.planner.bubble import schedule_name
from layerwise.planner.params import (
    adapted_matrices,
    adapter_params,
    embedding_params,
    layer_params,
    total_params,
)
from layerwise.planner.specs import Layout, ModelSpec, TrainSpec
from layerwise.planner.stages import resolve, stage_map, worker_layers
from layerwise.schedules import registry

__all__ = ["Memory", "embedding_params", "layer_params", "memory", "total_params"]

GIB = float(2**30)
# Fixed per-GPU reserve: CUDA context, cuBLAS/NCCL workspaces, allocator slack (a documented
# default; measured contexts are 0.5-1 GiB on A100/H100, NCCL and cuBLAS add a few hundred MB).
RESERVED_GIB = 1.5
# Every schedule's activations follow its registry entry (what the simulator and the runtime
# hold): ZB-H1 lets every worker hold up to p micro-batches, where 1F1B's worker w holds
# p - w, so on uneven stages a heavy last stage holds p of them, not one.


@dataclass(frozen=True)
class Memory:
    """Per-GPU memory in GiB of the most loaded pipeline worker; ``host`` is what one GPU
    keeps in host memory (offloaded optimizer states), not part of the total."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    host: float = 0.0

    @property
    def total(self) -> float:
        """Returns the sum of the GPU parts, in GiB."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    def as_dict(self) -> dict[str, float]:
        """Returns the GPU parts and their total as a JSON-ready dict, rounded to 0.01 GiB."""
        parts = ("weights", "gradients", "optimizer", "activations", "buffers")
        out = {k: round(getattr(self, k), 2) for k in parts}
        out["total"] = round(self.total, 2)
        return out


def layer_activation_bytes(m: ModelSpec, lay: Layout, stored: bool = True) -> float:
    """Returns the activation bytes one layer keeps for one micro-batch (Korthikanti Table 2).

    With ``stored=False`` the recomputation setting is ignored: the result is what the
    layer's kernels produce, which the time model uses as its elementwise traffic.
    """
    s, b, h, t = m.seq, lay.micro_batch, m.hidden, lay.tp
    sbh = s * b * h
    sp = lay.sequence_parallel and t > 1
    recompute = lay.recompute if stored else "none"
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)  # only the layer input is kept
    kv = m.kv / m.heads
    drop = 1.0 if m.dropout else 0.0
    f = m.ffn_size / h
    # Outside the tensor-parallel region (split only by sequence parallelism): two norm
    # inputs (4), the QKV and MLP inputs (2 + 2) and two dropout masks (2): "10sbh".
    outside = (4 + 2 + 2 + 2 * drop) * sbh
    # Inside the region, split by t: Q, K, V (2 + 4 kv/a), the output projection input (2),
    # the MLP's intermediate tensors (4f, or 6f gated): "24sbh/t" for GPT.
    inside = (2 + 4 * kv + 2 + (6 if m.gated_mlp else 4) * f) * sbh
    # Scores, softmax output and dropout mask, "5as^2b" (Korthikanti Sec. 4.1); selective
    # recomputation or a fused (flash) kernel keeps only the softmax statistics instead.
    if recompute == "selective" or m.flash_attention:
        scores = 4.0 * m.heads * s * b  # fp32 log-sum-exp per row
    else:
        scores = (4 + drop) * m.heads * s * s * b
    return outside / (t if sp else 1) + (inside + scores) / t


def inflight_microbatches(lay: Layout, num_microbatches: int, stage: int = 0) -> float:
    """Returns how many micro-batches' worth of its activations worker ``stage`` holds at peak:
    the registry's count of (chunk, micro-batch) activations, a chunk being 1/v of a stage.
    Interleaved: Megatron's warm-up of (v-1)p + 2(p-1-stage) + 1 chunk-micro-batches, for
    stage 0 p(1 + (p-1)/(pv)) (Korthikanti Sec. 4.2.3)."""
    return _peaks(lay, num_microbatches)[stage]


def _peaks(lay: Layout, num_microbatches: int) -> tuple[float, ...]:
    """Returns :func:`inflight_microbatches` of every worker."""
    name = schedule_name(lay.schedule, lay.vpp)
    return _spec_peaks(registry.get(name), lay.pp, num_microbatches, lay.vpp)


@lru_cache(maxsize=4096)
def _spec_peaks(spec: registry.ScheduleSpec, p: int, m: int, v: int) -> tuple[float, ...]:
    # keyed on the registry entry itself, so a schedule registered again is asked again
    return tuple(spec.peak_inflight(p, m, v, w) / v for w in range(p))


def _activations(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple[float, float]:
    """Returns (bytes per layer and in-flight micro-batch, bytes the first worker adds per
    in-flight micro-batch); in inference, (0, the whole working set of one worker)."""
    sbh = m.seq * lay.micro_batch * m.hidden
    split = lay.tp if lay.sequence_parallel else 1
    if not modes.has_backward(train.mode):
        # Inference keeps nothing for a backward: the layer being computed (its activations
        # for one micro-batch bound its working set) plus the stage's input and output.
        return 0.0, layer_activation_bytes(m, lay) + 2 * 2.0 * sbh / split
    per_layer = layer_activation_bytes(m, lay)
    if train.mode == "lora" and lay.recompute != "full":
        # the rank-r intermediate x A of every adapted matrix, bf16
        per_layer += 2.0 * m.seq * lay.micro_batch * train.lora_rank * len(adapted_matrices(m))
    # Embedding output dropout mask per in-flight micro-batch (Korthikanti Sec. 4.3).
    return per_layer, sbh / split


def _states(
    m: ModelSpec, train: TrainSpec, lay: Layout, layers: int, first: bool, last: bool
) -> tuple[float, float, float, float]:
    """Returns (weights, gradients, optimizer on GPU, optimizer in host memory) in bytes of
    one GPU of a worker with ``layers`` layers, the embedding if ``first``, the output layer
    if ``last`` (a tied one is still a copy when it is not on the first worker)."""
    t, d = lay.tp, lay.dp
    params = layers * layer_params(m) / t
    params += embedding_params(m) / t if first else 0.0
    params += m.vocab * m.hidden / t if last and not (first and m.tied_embeddings) else 0.0
    if train.mode == "full":
        trained, weights = params, params * modes.weight_bytes(train)
    else:
        trained = layers * adapter_params(m, train.lora_rank) / t if train.mode == "lora" else 0
        weights = params * modes.FROZEN_WEIGHT_BYTES + trained * modes.weight_bytes(train)
    grads = trained * modes.grad_bytes(train)
    opt = trained * modes.optimizer_bytes(train, lay)
    weights /= d if lay.zero >= 3 else 1
    grads /= d if lay.zero >= 2 else 1
    opt /= d if lay.zero >= 1 else 1
    return (weights, grads, 0.0, opt) if lay.offload else (weights, grads, opt, 0.0)


def memory(
    m: ModelSpec, train: TrainSpec, lay: Layout, split: tuple[int, ...] | None = None
) -> Memory:
    """Returns the per-GPU memory of the most loaded worker in GiB, its stages holding the
    layers of ``split`` (default: the layout's own split, or the default one)."""
    split = split or resolve(m, lay)
    owners = stage_map(lay)
    per_worker = worker_layers(split, owners, lay.pp)
    frozen = train.mode != "full"
    w_bytes = modes.FROZEN_WEIGHT_BYTES if frozen else modes.weight_bytes(train)
    # Buffers: fp32 logits (and their gradient when there is a backward) on the last worker,
    # a gathered layer for ZeRO-3, the fixed reserve.
    logit_bytes = 8.0 if modes.has_backward(train.mode) else 4.0
    logits = logit_bytes * m.seq * lay.micro_batch * m.vocab / lay.tp
    gathered = 2 * layer_params(m) / lay.tp * w_bytes if lay.zero >= 3 else 0.0
    per_layer, first_extra = _activations(m, train, lay)
    peaks = _peaks(lay, train.global_batch // (lay.dp * lay.micro_batch))
    if not modes.has_backward(train.mode):
        peaks = tuple(1.0 for _ in peaks)
    states: dict[tuple[int, bool, bool], tuple[float, float, float, float]] = {}
    worst: tuple[float, ...] = ()
    host = 0.0
    for w, layers in enumerate(per_worker):
        first, last = w == owners[0], w == owners[-1]
        key = (layers, first, last)
        if key not in states:
            states[key] = _states(m, train, lay, layers, first, last)
        weights, grads, opt, offloaded = states[key]
        extra = first_extra if first or not modes.has_backward(train.mode) else 0.0
        act = peaks[w] * (layers * per_layer + extra)
        buffers = (logits if last else 0.0) + gathered
        total = weights + grads + opt + act + buffers
        host = max(host, offloaded)
        if not worst or total > worst[0]:
            worst = (total, weights, grads, opt, act, buffers)
    _, weights, grads, opt, act, buffers = worst
    return Memory(weights / GIB, grads / GIB, opt / GIB, act / GIB,
                  buffers / GIB + RESERVED_GIB, host / GIB)  # fmt: skip
