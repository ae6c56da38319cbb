"""Parameters shared by layers on different workers (a tied embedding and head, or a weight
used by three or more layers)."""

from __future__ import annotations

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

    def __init__(self, param: nn.Parameter, ranks: list[int], me: int, index: int = 0) -> None:
        self.param, self.ranks, self.me = param, ranks, me
        self.peers = [r for r in ranks if r != me]
        self.tag = TIE_TAG + 2 * (index % MAX_TIES)

    @property
    def leader(self) -> bool:
        return self.me == self.ranks[0]

    @property
    def peer(self) -> int:
        """The other holder, for a tie between two workers."""
        return self.peers[0]

    def sync_values(self, group: dist.ProcessGroup | None) -> None:
        """Make every copy start equal: the leader's values win."""
        with torch.no_grad():
            if self.leader:
                value = self.param.data.contiguous()
                works = [dist.isend(value, dst=r, group=group, tag=self.tag) for r in self.peers]
                for work in works:
                    work.wait()
            else:
                buf = torch.empty_like(self.param.data)
                dist.recv(buf, src=self.ranks[0], group=group, tag=self.tag)
                self.param.data.copy_(buf)

    def sum_grads(self, group: dist.ProcessGroup | None) -> None:
        """Replace each copy's gradient with the sum of all, so the copies stay identical."""
        p = self.param
        mine = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
        got = {r: torch.empty_like(mine) for r in self.peers}
        sends = [dist.isend(mine, dst=r, group=group, tag=self.tag + 1) for r in self.peers]
        recvs = [dist.irecv(got[r], src=r, group=group, tag=self.tag + 1) for r in self.peers]
        for work in recvs + sends:
            work.wait()
        got[self.me] = mine
        total = got[self.ranks[0]]
        for r in self.ranks[1:]:  # a fixed order: every holder adds the same way
            total = total + got[r]
        p.grad = total
