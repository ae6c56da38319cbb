"""Tensor parallelism for the GPT blocks with torch.distributed.tensor.parallel.

Attention: q, k, v column-wise (each rank gets whole heads), output projection row-wise;
MLP: first linear column-wise, second row-wise. Each pair needs one all-reduce in forward
and one in backward (Shoeybi et al. 2019, Megatron-LM). Embedding, norms and head stay
replicated: their inputs are identical on every tensor-parallel rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from layerwise.models.gpt import Block

BLOCK_PLAN = {
    "attn.q_proj": "col",
    "attn.k_proj": "col",
    "attn.v_proj": "col",
    "attn.out_proj": "row",
    "mlp.fc_in": "col",
    "mlp.fc_out": "row",
}


def tensor_parallel(layer: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard a GPT block across ``tp_mesh`` in place; other layers are returned unchanged."""
    if tp_mesh.size() == 1 or not isinstance(layer, Block):
        return layer
    plan: dict[str, ParallelStyle] = {
        name: ColwiseParallel() if kind == "col" else RowwiseParallel()
        for name, kind in BLOCK_PLAN.items()
    }
    # q, k and v read the same input: turn it into a replicated DTensor once, at the attention
    # module, so its three gradients meet there in one all-reduce instead of one each
    plan["attn"] = PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)
    )
    return parallelize_module(layer, tp_mesh, plan)
