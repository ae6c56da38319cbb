"""Inputs of the planner: model architecture, GPU and cluster, training settings, one layout.

Presets are plain dataclass instances; every field can be overridden with
``dataclasses.replace``. Memory sizes are GiB (2**30 bytes), bandwidths GB/s (1e9 bytes/s),
compute TFLOP/s (1e12 FLOP/s).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from layerwise.schedules import registry


class PlanError(ValueError):
    """An input the planner cannot work with; the message says what to change."""


DEFAULT_SCHEDULE = "1f1b"
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adam", "sgd")
# full: every weight trained; lora: frozen base, trained low-rank adapters (Hu et al. 2021);
# frozen: no weight trained, backward only carries gradients to the inputs; inference:
# forward only. docs/planner.md, "Training modes", defines each.
MODES = ("full", "lora", "frozen", "inference")
OPTIMIZER_BITS = (32, 8)


def _flag(field: str) -> str:
    """Returns the ``layerwise plan`` flag that sets ``field`` (they share their names)."""
    return "--" + field.replace("_", "-")


def check_fields(
    spec: object,
    at_least_one: tuple[str, ...] = (),
    not_negative: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
) -> None:
    """Raises PlanError naming the first field of ``spec`` (and its flag) that is out of range:
    whole counts below 1 or below 0, or quantities that are not positive and finite. Every
    spec checks its own fields here when it is built, so no bad size reaches the formulas."""
    what = type(spec).__name__
    for name in at_least_one:
        value = getattr(spec, name)
        if value < 1:
            raise PlanError(
                f"{what}.{name} must be at least 1, got {value}; set {_flag(name)} to 1 or more"
            )
    for name in not_negative:
        value = getattr(spec, name)
        if not (math.isfinite(value) and value >= 0):
            raise PlanError(
                f"{what}.{name} must be 0 or more, got {value}; set {_flag(name)} to 0 or more"
            )
    for name in positive:
        value = getattr(spec, name)
        if not (math.isfinite(value) and value > 0):
            raise PlanError(
                f"{what}.{name} must be a positive number, got {value}; set {_flag(name)} "
                f"to one above 0"
            )


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, described by its shape."""

    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    kv_heads: int = 0  # 0 means "same as heads" (multi-head attention)
    ffn: int = 0  # 0 means 4 * hidden
    gated_mlp: bool = False  # SwiGLU (three FFN matrices) as in Llama
    tied_embeddings: bool = True  # GPT/Megatron share the input embedding with the head
    learned_positions: bool = True  # GPT-style position table of seq x hidden
    dropout: bool = True  # dropout masks are stored activations (Korthikanti et al. 2022)
    flash_attention: bool = False  # fused attention: no s^2 activations are stored

    def __post_init__(self) -> None:
        """Raises PlanError for a size below 1 or heads that the KV heads do not divide."""
        check_fields(self, ("layers", "hidden", "heads", "seq", "vocab"), ("kv_heads", "ffn"))
        if self.heads % self.kv:
            raise PlanError(
                f"{self.heads} attention heads cannot be shared by {self.kv} key/value heads; "
                f"set --kv-heads to a divisor of --heads {self.heads}"
            )

    @property
    def kv(self) -> int:
        """Returns the number of key/value heads."""
        return self.kv_heads or self.heads

    @property
    def ffn_size(self) -> int:
        """Returns the FFN inner size."""
        return self.ffn or 4 * self.hidden


def _gpt(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    # Megatron GPT: s=2048, vocabulary padded to 51200 (Narayanan et al. 2021, Table 1).
    return ModelSpec(name, layers, hidden, heads, seq=2048, vocab=51200)


def _llama(
    name: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, seq: int, vocab: int
) -> ModelSpec:
    return ModelSpec(
        name, layers, hidden, heads, seq, vocab, kv_heads=kv, ffn=ffn, gated_mlp=True,
        tied_embeddings=False, learned_positions=False, dropout=False, flash_attention=True,
    )  # fmt: skip


MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _gpt("gpt3-175b", 96, 12288, 96),
        # The sizes of Narayanan et al. 2021 Table 1 and Korthikanti et al. 2022 Table 3.
        _gpt("megatron-1.7b", 24, 2304, 24),
        _gpt("megatron-3.6b", 30, 3072, 32),
        _gpt("megatron-7.5b", 36, 4096, 32),
        _gpt("megatron-18b", 40, 6144, 48),
        _gpt("megatron-22b", 48, 6144, 64),
        _gpt("megatron-39b", 48, 8192, 64),
        _gpt("megatron-76b", 60, 10240, 80),
        _gpt("megatron-145b", 80, 12288, 96),
        _gpt("megatron-310b", 96, 16384, 128),
        _gpt("megatron-530b", 105, 20480, 128),
        _gpt("megatron-1t", 128, 25600, 160),
        # OPT-30B (Zhang et al. 2022): a 30B GPT shape.
        ModelSpec("opt-30b", 48, 7168, 56, seq=2048, vocab=50272),
        # BLOOM: ALiBi (no position table), a 250k vocabulary tied with the head.
        ModelSpec("bloom-176b", 70, 14336, 112, seq=2048, vocab=250880, learned_positions=False),
        _llama("llama2-7b", 32, 4096, 32, 32, 11008, 4096, 32000),
        _llama("llama2-13b", 40, 5120, 40, 40, 13824, 4096, 32000),
        _llama("llama2-70b", 80, 8192, 64, 8, 28672, 4096, 32000),
        _llama("llama3-8b", 32, 4096, 32, 8, 14336, 8192, 128256),
        _llama("llama3-70b", 80, 8192, 64, 8, 28672, 8192, 128256),
        _llama("llama3-405b", 126, 16384, 128, 8, 53248, 8192, 128256),
    ]
}


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: dense 16-bit peak, memory, and the links it sees."""

    name: str
    peak_tflops: float  # dense bf16/fp16 tensor-core peak
    memory_gib: float
    hbm_gbps: float  # memory bandwidth
    nvlink_gbps: float  # per-GPU, one direction, inside a node
    network_gbps: float  # per-GPU share of the inter-node network, one direction
    host_gbps: float = 32.0  # the GPU's link to host memory (PCIe x16), one direction

    def __post_init__(self) -> None:
        """Raises PlanError for a rate or capacity that is not a positive number."""
        check_fields(self, positive=("peak_tflops", "memory_gib", "hbm_gbps", "nvlink_gbps",
                                     "network_gbps", "host_gbps"))  # fmt: skip


GPU_PRESETS: dict[str, GPUSpec] = {
    g.name: g
    for g in [
        # Vendor datasheets (SXM parts); network = one 200/400 Gb/s NIC per GPU as on DGX;
        # host = the PCIe x16 link of the GPU's generation, one direction (3.0: 16 GB/s,
        # 4.0: 32 GB/s, 5.0: 64 GB/s).
        GPUSpec("v100-32gb", 125.0, 32.0, 900.0, 150.0, 12.5, 16.0),
        GPUSpec("a100-40gb", 312.0, 40.0, 1555.0, 300.0, 25.0, 32.0),
        GPUSpec("a100-80gb", 312.0, 80.0, 2039.0, 300.0, 25.0, 32.0),
        GPUSpec("h100-80gb", 989.0, 79.6, 3350.0, 450.0, 50.0, 64.0),
        GPUSpec("h200-141gb", 989.0, 140.0, 4800.0, 450.0, 50.0, 64.0),
        GPUSpec("b200-192gb", 2250.0, 178.0, 8000.0, 900.0, 50.0, 64.0),
        GPUSpec("mi300x-192gb", 1307.0, 192.0, 5300.0, 448.0, 50.0, 64.0),
    ]
}


@dataclass(frozen=True)
class ClusterSpec:
    """``nodes`` nodes of ``gpus_per_node`` identical GPUs."""

    gpu: GPUSpec
    gpus_per_node: int = 8
    nodes: int = 1
    # CPU memory of one node in GiB, where offloaded optimizer states go; None: not known,
    # so no offload can be checked (math.inf: assume any amount, to report what is needed).
    host_memory_gib: float | None = None

    def __post_init__(self) -> None:
        """Raises PlanError for a cluster without GPUs or a host memory that is not positive."""
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise PlanError(
                f"a cluster needs at least one node of at least one GPU, got {self.nodes} "
                f"node(s) of {self.gpus_per_node} GPUs; set --gpus-per-node and --nodes (or "
                f"--gpus) to 1 or more"
            )
        host = self.host_memory_gib
        if host is not None and not host > 0:  # also refuses NaN
            raise PlanError(
                f"ClusterSpec.host_memory_gib must be a positive number, got {host}; set "
                f"--host-memory-gib to the CPU memory of one node in GiB"
            )

    @property
    def gpus(self) -> int:
        """Returns the total number of GPUs."""
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class TrainSpec:
    """What the run must do, independent of how it is split."""

    global_batch: int  # sequences per optimizer step
    precision: str = "bf16"  # bf16 | fp16 (mixed, fp32 master weights) | fp32
    optimizer: str = "adam"  # adam | sgd
    # Megatron accumulates and all-reduces gradients in fp32 (18 bytes/param with Adam);
    # the ZeRO paper's 16 bytes/param assumes 16-bit gradients.
    fp32_grads: bool = False
    # Megatron-2021 reduced gradients after the pipeline flush; newer stacks overlap the
    # reduction with the last micro-batch's backward.
    overlap_grad_reduce: bool = True
    mode: str = "full"  # one of MODES
    lora_rank: int = 16  # r of the LoRA adapters (mode "lora")

    def __post_init__(self) -> None:
        """Raises PlanError for an empty batch or an unknown precision, optimizer or mode."""
        check_fields(self, ("global_batch", "lora_rank"))
        if self.mode not in MODES:
            raise PlanError(f"--mode must be one of {', '.join(MODES)}, not {self.mode}")
        if self.precision not in PRECISIONS:
            raise PlanError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer}"
            )


@dataclass(frozen=True)
class Layout:
    """One way to split the run: the degrees and the per-GPU choices."""

    dp: int
    tp: int
    pp: int
    micro_batch: int
    vpp: int = 1  # model chunks per pipeline worker (interleaved 1F1B when > 1)
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    zero: int = 0  # 0 none, 1 optimizer states (= distributed optimizer), 2 + grads, 3 + weights
    schedule: str = DEFAULT_SCHEDULE  # one of schedules(); vpp > 1 runs its interleaved form
    # Transformer layers of each of the pp x vpp stages in model order; empty: the default
    # split (the exact min-max partition, planner/stages.py).
    stage_layers: tuple[int, ...] = ()
    offload: bool = False  # optimizer states in host memory, stepped there (ZeRO-Offload)
    optimizer_bits: int = 32  # 8: blockwise 8-bit optimizer states (Dettmers et al. 2022)

    def describe(self) -> str:
        """Returns a short one-line name such as ``dp8 tp8 pp4 v2 mb1 full sp z1``."""
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"v{self.vpp}")
        parts += [f"mb{self.micro_batch}", self.recompute]
        if self.sequence_parallel:
            parts.append("sp")
        parts.append(f"z{self.zero}")
        if self.optimizer_bits != 32:
            parts.append(f"{self.optimizer_bits}bit")
        if self.offload:
            parts.append("offload")
        if self.schedule != DEFAULT_SCHEDULE:
            parts.append(self.schedule)
        if self.stage_layers:
            parts.append("split " + compact_split(self.stage_layers))
        return " ".join(parts)


def compact_split(stage_layers: tuple[int, ...]) -> str:
    """Returns a split written with runs folded, e.g. ``5,6x10,5`` for (5, 6, ..., 6, 5)."""
    runs: list[list[int]] = []
    for n in stage_layers:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ",".join(str(n) if k == 1 else f"{n}x{k}" for n, k in runs)


def schedules() -> tuple[str, ...]:
    """Returns the schedules a layout may name: the registered ones with one stage per worker,
    references such as naive left out. The default comes first, so that it wins ties in
    step time when the search tries them all."""
    single = [s.name for s in registry.specs() if not s.multi_chunk and not s.reference]
    return (DEFAULT_SCHEDULE, *(n for n in single if n != DEFAULT_SCHEDULE))


def interleavable() -> tuple[str, ...]:
    """Returns the layout schedules that can run with vpp > 1: those that a registered
    schedule interleaves (1f1b, run as interleaved-1f1b)."""
    return tuple(n for n in schedules() if registry.interleaved_form(n) is not None)


def _lookup(table: dict[str, object], key: str, what: str) -> object:
    if key not in table:
        known = ", ".join(sorted(table))
        raise PlanError(f"unknown {what} preset '{key}' (known: {known})")
    return table[key]


def model_preset(name: str) -> ModelSpec:
    """Returns the model preset called ``name``; raises PlanError listing the known ones."""
    model = _lookup(dict(MODEL_PRESETS), name, "model")
    assert isinstance(model, ModelSpec)
    return model


def gpu_preset(name: str) -> GPUSpec:
    """Returns the GPU preset called ``name``; raises PlanError listing the known ones."""
    gpu = _lookup(dict(GPU_PRESETS), name, "GPU")
    assert isinstance(gpu, GPUSpec)
    return gpu


def override(spec: ModelSpec, **fields: object) -> ModelSpec:
    """Returns ``spec`` with the non-None ``fields`` replaced."""
    changes = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]
