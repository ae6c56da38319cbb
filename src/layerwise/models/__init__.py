"""Models expressed as lists of layers, ready for pipeline partitioning, behind one interface
(:class:`ModelFamily`) that the job and the planner use."""

from layerwise.models.family import (
    ModelFamily,
    family_names,
    get_family,
    register_family,
)
from layerwise.models.gpt import (
    Block,
    Embedding,
    GPTConfig,
    GPTFamily,
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
    "GPTFamily",
    "Head",
    "ModelFamily",
    "build_gpt",
    "family_names",
    "flops_per_token",
    "generate",
    "get_family",
    "gpt_layers",
    "layer_parameter_counts",
    "loss_fn",
    "parameter_count",
    "register_family",
    "tied_parameter_names",
]
