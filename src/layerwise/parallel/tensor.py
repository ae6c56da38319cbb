"""Tensor parallelism with torch.distributed.tensor.parallel, from a plan the model family gives.

A plan maps submodule names to styles. ``"col"`` splits a linear layer's output features over
the tensor-parallel ranks, ``"row"`` its input features (its partial outputs are summed): a
column-wise linear followed by a row-wise one needs one all-reduce in forward and one in
backward (Shoeybi et al. 2019, Megatron-LM). ``"shared_input"`` marks a module whose input is
read by several column-wise submodules (attention's q, k and v). Modules the plan does not
name stay whole on every rank, which is right when their inputs are identical on all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

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

TensorParallelStyle = Literal["col", "row", "shared_input"]
TensorParallelPlan = Mapping[str, TensorParallelStyle]


def apply_plan(module: nn.Module, tp_mesh: DeviceMesh, plan: TensorParallelPlan) -> nn.Module:
    """Shard ``module`` over ``tp_mesh`` in place as ``plan`` says; return it (unchanged when
    the plan is empty or the mesh has a single rank)."""
    styles = {name: _style(name, kind) for name, kind in plan.items()}  # bad plans fail anywhere
    if tp_mesh.size() == 1 or not styles:
        return module
    return parallelize_module(module, tp_mesh, styles)


def _style(name: str, kind: str) -> ParallelStyle:
    """Return torch's parallel style for one plan entry."""
    if kind == "col":
        return ColwiseParallel()
    if kind == "row":
        return RowwiseParallel()
    if kind == "shared_input":
        # q, k and v read the same input: turn it into a replicated DTensor once, at the
        # attention module, so its three gradients meet there in one all-reduce instead of one
        # each (any module whose input several column-wise submodules read gains the same)
        return PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)
        )
    raise ValueError(
        f"tensor-parallel plan entry {name!r} has style {kind!r}; "
        f"use 'col', 'row' or 'shared_input'"
    )
