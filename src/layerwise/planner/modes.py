"""What each training mode stores per parameter and computes per token.

- ``full``: every weight is trained. Mixed-precision Adam keeps 16-bit weights and gradients,
  an fp32 master copy and two fp32 moments: 2 + 2 + 12 = 16 bytes per parameter
  (Rajbhandari et al. 2020). Backward is twice the forward's matmuls (input and weight
  gradients).
- ``lora``: the base weights are frozen in bf16 (2 bytes, no gradient, no optimizer state);
  the adapters, r (d_in + d_out) per adapted matrix (Hu et al. 2021), are trained like
  ``full``. Activations are still stored: the backward goes through the frozen base to reach
  the adapters of earlier layers, so its matmuls compute input gradients (one forward's
  worth) but no weight gradients.
- ``frozen``: no weight is trained; the backward only carries gradients to the inputs (to a
  prompt being tuned, or to a trained model upstream). Same activations and input-gradient
  matmuls as ``lora``, without adapters, gradients or optimizer.
- ``inference``: forward only; bf16 weights; one micro-batch's working set of activations.

Memory savers of the optimizer states (full and LoRA): 8-bit blockwise states (Dettmers et al.
2022: 1 byte per moment plus one fp32 scale per block of 2048) and offloading the states and
the optimizer step to host memory (ZeRO-Offload, Ren et al. 2021).
"""

from __future__ import annotations

from layerwise.planner.specs import Layout, TrainSpec

FROZEN_WEIGHT_BYTES = 2.0  # frozen weights are kept in bf16
QUANT_BLOCK = 2048  # values per 8-bit block, each with one fp32 absmax (Dettmers et al. 2022)


def trains_weights(mode: str) -> bool:
    """Returns whether ``mode`` has trained parameters (with gradients and optimizer)."""
    return mode in ("full", "lora")


def has_backward(mode: str) -> bool:
    """Returns whether ``mode`` runs a backward pass (and so stores activations)."""
    return mode != "inference"


def weight_bytes(train: TrainSpec) -> float:
    """Returns the bytes of one trained weight as the model computes with it."""
    return 4.0 if train.precision == "fp32" else 2.0


def grad_bytes(train: TrainSpec) -> float:
    """Returns the bytes of one trained parameter's gradient."""
    return 4.0 if (train.fp32_grads or train.precision == "fp32") else 2.0


def optimizer_bytes(train: TrainSpec, lay: Layout) -> float:
    """Returns the optimizer bytes per trained parameter: the fp32 master copy (mixed
    precision) and the moments (Adam: two, SGD: momentum), 4 bytes each or 8-bit."""
    master = 0.0 if train.precision == "fp32" else 4.0
    moments = 2 if train.optimizer == "adam" else 1
    per_moment = 4.0 if lay.optimizer_bits == 32 else 1.0 + 4.0 / QUANT_BLOCK
    return master + moments * per_moment


def optimizer_step_bytes(train: TrainSpec, lay: Layout, fp32_step_bytes: float) -> float:
    """Returns the bytes the optimizer step reads and writes per trained parameter: the fp32
    step's figure, less what 8-bit moments save in both directions."""
    moments = 2 if train.optimizer == "adam" else 1
    per_moment = 4.0 if lay.optimizer_bits == 32 else 1.0 + 4.0 / QUANT_BLOCK
    return fp32_step_bytes - 2 * moments * (4.0 - per_moment)


def backward_matmul_factor(mode: str) -> float:
    """Returns the backward's matmul FLOPs over the forward's for the base weights: input
    and weight gradients (2) when weights are trained, input gradients only (1) when they
    are frozen, none without a backward."""
    return {"full": 2.0, "lora": 1.0, "frozen": 1.0, "inference": 0.0}[mode]
