"""Data parallelism for pipeline stages: gradients averaged across replicas, one bucket per
stage, launched as soon as the schedule has finished that stage's last backward so the
reduction overlaps the backward work of the other stages."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, or the tensor itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t  # type: ignore[no-any-return]


class GradReducer:
    """Averages each stage's gradients over ``group`` (the data-parallel replicas)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []

    def replica_share(self, weight: float) -> float:
        """Return how much this replica's mean loss counts against the others' (1 when every
        replica's batch weighs the same): replicas x its weight / the weight of all.

        With token-weighted losses, replicas whose batches count different numbers of tokens
        must not count equally: the last stage of each replica scales its loss by this, so
        that the average below is the mean over every token of the global batch. Collective
        over the replicas' last stages (one number each)."""
        both = torch.tensor([weight], dtype=torch.float64)
        dist.all_reduce(both, group=self.group)
        total = float(both.item())
        return self.size * weight / total if total else 0.0

    def stage_done(self, stage: nn.Module) -> None:
        """Start the asynchronous all-reduce of ``stage``'s gradients (one flat bucket)."""
        grads = []
        for p in stage.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(local_tensor(p.grad))
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.pending.append((work, flat, grads))

    def finish(self) -> None:
        """Wait for every bucket and write the averages back into the gradients."""
        for work, flat, grads in self.pending:
            work.wait()
            flat.div_(self.size)
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(avg)
        self.pending = []
