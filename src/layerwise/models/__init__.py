"""Models expressed as lists of layers, ready for pipeline partitioning."""

from layerwise.models.gpt import (
    Block,
    Embedding,
    GPTConfig,
    Head,
    build_gpt,
    flops_per_token,
    generate,
    gpt_layers,
    layer_parameter_counts,
    loss_fn,
    parameter_count,
    tied_parameter_names,
)

__all__ = [
    "Block",
    "Embedding",
    "GPTConfig",
    "Head",
    "build_gpt",
    "flops_per_token",
    "generate",
    "gpt_layers",
    "layer_parameter_counts",
    "loss_fn",
    "parameter_count",
    "tied_parameter_names",
]
