"""The rank grid: data x pipeline x tensor parallel, as one DeviceMesh.

Ranks are laid out as ``grid[dp][pp][tp]`` with tensor parallelism innermost, as Megatron-LM
does: tensor-parallel peers exchange an all-reduce per sub-layer, so they get consecutive
ranks and therefore the same node (NVLink); pipeline neighbours exchange one activation per
micro-batch and data-parallel replicas one gradient reduction per step, which tolerate the
slower links between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class Grid:
    """Degrees of data (dp), pipeline (pp) and tensor (tp) parallelism."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Return (dp, pp, tp) coordinates of a global rank."""
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def __str__(self) -> str:
        return f"dp={self.dp} x pp={self.pp} x tp={self.tp} = {self.world} workers"


def check_grid(
    layout: Grid, world: int | None, num_layers: int, layers_text: str | None = None
) -> None:
    """Raise ValueError, before any process-group work, if the rank grid cannot hold the model.

    ``num_layers`` counts every layer the partitioner splits (embedding and head included);
    ``layers_text`` says what they are, for the message.
    What the model itself requires of the layout (tp dividing the heads, for instance) is
    its family's check: :meth:`layerwise.models.family.ModelFamily.check` runs both.
    """
    for name in ("dp", "pp", "tp"):
        if getattr(layout, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(layout, name)}")
    if world is not None and world != layout.world:
        raise ValueError(f"world size {world} is not dp*pp*tp = {layout}")
    if layout.pp > num_layers:
        raise ValueError(
            f"--pp {layout.pp} is larger than the number of layers ({num_layers}"
            + (f": {layers_text}" if layers_text else "")
            + f"): every pipeline stage needs at least one layer; use --pp {num_layers} or fewer"
        )


def build_mesh(
    layout: Grid, device_type: str = "cpu", timeout_s: float | None = None
) -> DeviceMesh:
    """Create the (dp, pp, tp) mesh over the default process group (collective). Its groups
    get ``timeout_s`` for every operation (torch would give them 30 minutes, whatever the
    default group has), so that a hung peer is found on the axes too."""
    if dist.get_world_size() != layout.world:
        raise ValueError(f"world size {dist.get_world_size()} is not dp*pp*tp = {layout}")
    override: dict[int | str, Any] | None = None
    if timeout_s is not None:
        options = _options(device_type, timeout_s)
        if options is not None:
            override = {name: options for name in ("dp", "pp", "tp")}
    return init_device_mesh(
        device_type,
        (layout.dp, layout.pp, layout.tp),
        mesh_dim_names=("dp", "pp", "tp"),
        backend_override=override,
    )


def _options(device_type: str, timeout_s: float) -> tuple[str, Any] | None:
    """Backend options carrying a timeout, for the backend this device uses."""
    if device_type == "cuda":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            return None
        options = nccl.Options()
        options._timeout = timedelta(seconds=timeout_s)
        return ("nccl", options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    return ("gloo", options)


def describe_mesh(layout: Grid) -> str:
    """Return the rank grid as text: one line per data-parallel replica, tp groups bracketed."""
    lines = [f"rank grid {layout} (tensor parallel innermost):"]
    for d in range(layout.dp):
        stages = []
        for p in range(layout.pp):
            ranks = [(d * layout.pp + p) * layout.tp + t for t in range(layout.tp)]
            stages.append("[" + " ".join(map(str, ranks)) + "]")
        lines.append(
            f"  replica {d}: " + " -> ".join(f"stage group {p} {r}" for p, r in enumerate(stages))
        )
    return "\n".join(lines)
