"""Tensor parallelism for Hugging Face decoder blocks laid out as Llama's.

Attention's q, k and v projections are split by output features (each rank keeps whole
heads, and whole key-value heads, so grouped-query attention keeps its grouping) and its
output projection by input features; the MLP's gate and up projections by output features
and its down projection by input features: one all-reduce after attention and one after the
MLP, in forward and in backward (Shoeybi et al. 2019). The blocks reshape with ``-1`` heads,
so each rank simply runs its share of the heads. Norms, embeddings and the head stay whole.
Blocks with fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) would need their
fused weights split piece by piece, and are refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from layerwise.parallel.tensor import TensorParallelPlan

ATTENTION = {"q_proj": "col", "k_proj": "col", "v_proj": "col", "o_proj": "row"}
MLP = {"gate_proj": "col", "up_proj": "col", "down_proj": "row"}


def block_plan(block: nn.Module, prefix: str = "block") -> TensorParallelPlan:
    """Return the plan of one wrapped decoder block (``prefix`` names the model's block inside
    the pipeline layer); ValueError naming what is missing when it is not laid out as Llama's."""
    inner = block.get_submodule(prefix)
    missing = [
        f"{part}.{name}"
        for part, names in (("self_attn", ATTENTION), ("mlp", MLP))
        for name in names
        if not isinstance(getattr(getattr(inner, part, None), name, None), nn.Linear)
    ]
    if missing:
        raise ValueError(
            f"{type(inner).__name__} has no {', '.join(missing)} (as nn.Linear): tensor "
            f"parallelism for Hugging Face blocks splits Llama's separate projections; use "
            f"--tp 1 for this model"
        )
    plan: dict[str, Any] = {f"{prefix}.self_attn.{n}": s for n, s in ATTENTION.items()}
    plan.update({f"{prefix}.mlp.{n}": s for n, s in MLP.items()})
    return plan


def check_tensor_parallel(config: Any, tp: int) -> None:
    """Raise ValueError unless ``tp`` divides the heads, key-value heads and MLP width."""
    heads = int(config.num_attention_heads)
    sizes = (
        ("attention heads", heads),
        ("key-value heads", int(getattr(config, "num_key_value_heads", None) or heads)),
        ("MLP width", int(config.intermediate_size)),
    )
    for what, size in sizes:
        if size % tp:
            fits = [t for t in range(1, heads + 1) if all(s % t == 0 for _, s in sizes)]
            raise ValueError(
                f"--tp {tp} does not divide the model's {what} ({size}); tensor parallelism "
                f"gives every rank an equal share: try --tp in {fits}"
            )
