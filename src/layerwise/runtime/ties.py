"""Parameters shared by layers on different workers (a tied embedding and head, or a weight
used by three or more layers)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TIE_TAG = 2**30  # tags above every activation and gradient tag; two per tie, 2**30 + 8 up used
MAX_TIES = 4  # ties get tags TIE_TAG .. TIE_TAG + 2 * MAX_TIES - 1


class Tie:
    """This worker's copy of a parameter that other workers of the pipeline also hold.

    ``ranks``: the global ranks of every holder, in worker order (this one included). The
    first holder's values win at the start; after each step every copy gets the sum of all
    copies' gradients, added in worker order so that every holder gets the same bits."""

    def __init__(
        self, param: nn.Parameter, ranks: list[int], me: int, index: int = 0,
        timeout_s: float | None = None,
    ) -> None:  # fmt: skip
        self.param, self.ranks, self.me = param, ranks, me
        self.peers = [r for r in ranks if r != me]
        self.tag = TIE_TAG + 2 * (index % MAX_TIES)
        # every wait on a peer is bounded by the pipeline's timeout, not the group's
        self.timeout = None if timeout_s is None else timedelta(seconds=timeout_s)

    def _wait(self, works: list[Any]) -> None:
        for work in works:
            if self.timeout is None:
                work.wait()
            elif work.wait(self.timeout) is False:
                raise RuntimeError(
                    f"rank {self.me}: no tied copy of a parameter from ranks {self.peers} "
                    f"within {self.timeout.total_seconds():g}s; are they alive?"
                )

    @property
    def leader(self) -> bool:
        return self.me == self.ranks[0]

    def sync_values(self, group: dist.ProcessGroup | None) -> None:
        """Make every copy start equal: the leader's values win."""
        with torch.no_grad():
            if self.leader:
                value = self.param.data.contiguous()
                self._wait([dist.isend(value, dst=r, group=group, tag=self.tag)
                            for r in self.peers])  # fmt: skip
            else:
                buf = torch.empty_like(self.param.data)
                self._wait([dist.irecv(buf, src=self.ranks[0], group=group, tag=self.tag)])
                self.param.data.copy_(buf)

    def sum_grads(self, group: dist.ProcessGroup | None) -> None:
        """Replace each copy's gradient with the sum of all, so the copies stay identical."""
        p = self.param
        mine = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
        got = {r: torch.empty_like(mine) for r in self.peers}
        sends = [dist.isend(mine, dst=r, group=group, tag=self.tag + 1) for r in self.peers]
        recvs = [dist.irecv(got[r], src=r, group=group, tag=self.tag + 1) for r in self.peers]
        self._wait(recvs + sends)
        got[self.me] = mine
        total = got[self.ranks[0]]
        for r in self.ranks[1:]:  # a fixed order: every holder adds the same way
            total = total + got[r]
        p.grad = total
