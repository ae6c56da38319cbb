"""Per-GPU memory of one layout: weights, gradients, optimizer states, activations, buffers.

Formulas:
- parameters of a transformer layer: 12h^2 + 13h for GPT (Narayanan et al. 2021, Sec. 5.1),
  generalised here to grouped-query attention and gated MLPs;
- stored activations of one layer: Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", Sec. 4 and Table 2, kept as its parts so that
  GQA, SwiGLU, no dropout and fused attention change only the parts they touch;
- micro-batches in flight on each stage: what the schedule's registry entry declares, e.g.
  p - stage for 1F1B, and for stage 0 the factor (1 + (p-1)/(p v)) of the interleaved
  schedule (Korthikanti et al. 2022, Sec. 4.2.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from layerwise.planner.bubble import schedule_name
from layerwise.planner.specs import Layout, ModelSpec, TrainSpec
from layerwise.schedules import registry

GIB = float(2**30)
# Fixed per-GPU reserve: CUDA context, cuBLAS/NCCL workspaces, allocator slack (a documented
# default; measured contexts are 0.5-1 GiB on A100/H100, NCCL and cuBLAS add a few hundred MB).
RESERVED_GIB = 1.5
# ZB-H1's memory is modelled as 1F1B's, stage by stage, as in the paper's "same peak memory
# as 1F1B" and in the numbers the planner was checked with. The zb-h1 generator lets every
# worker hold up to p micro-batches (its registry entry), so a run's later stages hold more.
PEAK_AS = {"zb-h1": "1f1b"}


@dataclass(frozen=True)
class Memory:
    """Per-GPU memory in GiB of the most loaded pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        """Returns the sum of all parts, in GiB."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    def as_dict(self) -> dict[str, float]:
        """Returns the parts and the total as a JSON-ready dict, rounded to 0.01 GiB."""
        parts = {k: round(v, 2) for k, v in asdict(self).items()}
        parts["total"] = round(self.total, 2)
        return parts


def layer_params(m: ModelSpec) -> float:
    """Returns the parameters of one transformer layer (weights, biases, norms)."""
    h, d = m.hidden, m.hidden // m.heads
    qkv = h * (m.heads + 2 * m.kv) * d
    mlp = (3 if m.gated_mlp else 2) * h * m.ffn_size
    biases = 0 if m.gated_mlp else (m.heads + 2 * m.kv) * d + h + m.ffn_size + h
    return qkv + h * h + mlp + biases + 4 * h  # 4h: two norms with scale and shift


def embedding_params(m: ModelSpec) -> float:
    """Returns the parameters of the input embedding (with the position table if any)."""
    return m.vocab * m.hidden + (m.seq * m.hidden if m.learned_positions else 0)


def total_params(m: ModelSpec) -> float:
    """Returns the parameter count of the whole model."""
    head = 0 if m.tied_embeddings else m.vocab * m.hidden
    return m.layers * layer_params(m) + embedding_params(m) + head + 2 * m.hidden


def stage_params(m: ModelSpec, lay: Layout) -> tuple[float, float]:
    """Returns the parameters per GPU of the (first, last) pipeline stage."""
    body = m.layers / lay.pp * layer_params(m) / lay.tp
    emb = embedding_params(m) / lay.tp
    # A tied head is still a copy on the last stage when it is not the first (Megatron).
    head = m.vocab * m.hidden / lay.tp if (lay.pp > 1 or not m.tied_embeddings) else 0.0
    if lay.pp == 1:
        return body + emb + head, body + emb + head
    return body + emb, body + head


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
    """Returns how many micro-batches' worth of stage activations ``stage`` holds at peak:
    the registry's count of (chunk, micro-batch) activations, a chunk being 1/v of a stage.
    Interleaved: Megatron's warm-up of (v-1)p + 2(p-1-stage) + 1 chunk-micro-batches, for
    stage 0 p(1 + (p-1)/(pv)) (Korthikanti Sec. 4.2.3)."""
    p, m, v = lay.pp, num_microbatches, lay.vpp
    name = schedule_name(lay.schedule, v)
    return registry.get(PEAK_AS.get(name, name)).peak_inflight(p, m, v, stage) / v


def memory(m: ModelSpec, train: TrainSpec, lay: Layout) -> Memory:
    """Returns the per-GPU memory of the most loaded stage (first or last) in GiB."""
    first, last = stage_params(m, lay)
    w_bytes = 4 if train.precision == "fp32" else 2
    g_bytes = 4 if (train.fp32_grads or train.precision == "fp32") else 2
    master = 0 if train.precision == "fp32" else 4  # fp32 copy for mixed precision
    states = 8 if train.optimizer == "adam" else 4  # Adam m and v, or SGD momentum
    d = lay.dp
    num_mb = train.global_batch // (lay.dp * lay.micro_batch)
    stage_act = m.layers / lay.pp * layer_activation_bytes(m, lay)
    # Embedding output dropout mask per in-flight micro-batch (Korthikanti Sec. 4.3).
    emb_mask = m.seq * lay.micro_batch * m.hidden / (lay.tp if lay.sequence_parallel else 1)
    best: Memory | None = None
    for params, stage in ((first, 0), (last, lay.pp - 1)):
        weights = params * w_bytes / (d if lay.zero >= 3 else 1)
        grads = params * g_bytes / (d if lay.zero >= 2 else 1)
        opt = params * (master + states) / (d if lay.zero >= 1 else 1)
        inflight = inflight_microbatches(lay, num_mb, stage)
        act = inflight * (stage_act + (emb_mask if stage == 0 else 0.0))
        # Buffers: fp32 logits and their gradient on the last stage (cross-entropy),
        # a gathered layer for ZeRO-3, the fixed reserve.
        is_last = stage == lay.pp - 1
        logits = 8.0 * m.seq * lay.micro_batch * m.vocab / lay.tp if is_last else 0.0
        gathered = 2 * layer_params(m) / lay.tp * w_bytes if lay.zero >= 3 else 0.0
        buffers = (logits + gathered) / GIB + RESERVED_GIB
        mem = Memory(weights / GIB, grads / GIB, opt / GIB, act / GIB, buffers)
        if best is None or mem.total > best.total:
            best = mem
    assert best is not None
    return best
