"""Parameters shared by two layers on different workers (a tied embedding and head)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

TIE_TAG = 2**30  # tags above every activation and gradient tag


class Tie:
    """One copy of a parameter that another worker of the pipeline also holds."""

    def __init__(self, param: nn.Parameter, peer_rank: int, leader: bool) -> None:
        self.param, self.peer, self.leader = param, peer_rank, leader

    def sync_values(self, group: dist.ProcessGroup | None) -> None:
        """Make both copies start equal: the leader's values win."""
        with torch.no_grad():
            if self.leader:
                dist.send(self.param.data.contiguous(), dst=self.peer, group=group, tag=TIE_TAG)
            else:
                buf = torch.empty_like(self.param.data)
                dist.recv(buf, src=self.peer, group=group, tag=TIE_TAG)
                self.param.data.copy_(buf)

    def sum_grads(self, group: dist.ProcessGroup | None) -> None:
        """Replace each copy's gradient with the sum of both, so the copies stay identical."""
        p = self.param
        mine = p.grad if p.grad is not None else torch.zeros_like(p)
        theirs = torch.empty_like(mine)
        send = dist.isend(mine.contiguous(), dst=self.peer, group=group, tag=TIE_TAG + 1)
        dist.recv(theirs, src=self.peer, group=group, tag=TIE_TAG + 1)
        send.wait()
        # add in a fixed order so both workers get bit-identical sums
        p.grad = mine + theirs if self.leader else theirs + mine
