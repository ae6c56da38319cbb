"""ZeRO-1 for pipeline stages: optimizer state sharded across data-parallel replicas.

Every replica holds every weight and (after the data-parallel reduction) every averaged
gradient, but each parameter is *owned* by one replica, which alone keeps its optimizer
state (two fp32 tensors for Adam) and updates it; owners then broadcast the new values.
Optimizer memory per worker falls by the data-parallel degree (Rajbhandari et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.parallel.data import local_tensor


def assign_owners(params: Sequence[nn.Parameter], replicas: int) -> list[int]:
    """Give each parameter an owner replica, largest first to the least loaded, so every
    replica holds about the same number of optimizer-state elements."""
    load = [0] * replicas
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: -local_tensor(params[i]).numel()):
        owner = min(range(replicas), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += local_tensor(params[i]).numel()
    return owners


class ShardedOptimizer:
    """Wraps an optimizer built on this replica's share of ``params``."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup,
        make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        self.params = list(params)
        self.group = group
        self.rank = dist.get_rank(group)
        self.owners = assign_owners(self.params, dist.get_world_size(group))
        self.mine = [p for p, o in zip(self.params, self.owners, strict=True) if o == self.rank]
        self.inner = make(self.mine)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # the inner optimizer's own list: loading a checkpoint replaces it with a new one
        return self.inner.param_groups

    def step(self) -> None:
        """Update the owned parameters, then copy every parameter from its owner."""
        self.inner.step()
        with torch.no_grad():
            for p, owner in zip(self.params, self.owners, strict=True):
                dist.broadcast(
                    local_tensor(p.data),
                    src=dist.get_global_rank(self.group, owner),
                    group=self.group,
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
