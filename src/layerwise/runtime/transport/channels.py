"""Messages matched by order, one process group per stream (what NCCL needs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from layerwise.runtime.transport.base import ACT, GRAD, META, Transport
from layerwise.schedules import Schedule, stream_order_problems


def open_channels(
    stage_worker: Sequence[int],
    worker: int,
    pipeline_ranks: Sequence[int],
    skips: Sequence[tuple[int, int]] = (),
) -> dict[tuple[int, int], dist.ProcessGroup]:
    """Give each stream of messages (one stage boundary, one direction) its own process group.

    NCCL ignores tags: between two ranks, messages match in the order they are posted. Two
    workers may exchange several streams at once (with several stages per worker, more than
    one boundary joins them), and each worker posts them in the order of its own action
    list, which differ. Inside one stream both sides go in micro-batch order (see
    ``schedules.stream_order_problems``), so one group per stream makes order-matching exact.

    Collective over the whole job (the default group): every rank calls it while building
    its pipeline, as when all ranks build their pipelines together. Two-rank groups for the
    same pair of ranks cannot be created by their members alone (PyTorch names such groups by
    their ranks), so every rank creates every pipeline's groups, in one agreed order.
    A skip between two stages (``skips``) is a stream both ways, numbered after the stages.
    """
    mine = (tuple(pipeline_ranks), tuple(stage_worker), tuple(map(tuple, skips)))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    channels: dict[tuple[int, int], dist.ProcessGroup] = {}
    for ranks, workers, joins in sorted(set(everyone)):
        streams = [(s, s + 1, (s, ACT), (s + 1, GRAD)) for s in range(len(workers) - 1)]
        n = len(workers)
        streams += [(a, b, (n + k, ACT), (n + k, GRAD)) for k, (a, b) in enumerate(joins)]
        for sa, sb, *keys in streams:
            a, b = workers[sa], workers[sb]
            if a == b:
                continue
            for key in keys:  # keyed by the sending stage (or skip stream)
                group = dist.new_group(sorted({ranks[a], ranks[b]}))
                if (ranks, workers, joins) == mine and worker in (a, b):
                    assert group is not None
                    channels[key] = group
    return channels


class ChannelTransport(Transport):
    """Every stream has a two-rank process group of its own and every tag is 0: messages
    match by the order they are posted in, which is all NCCL offers (tested on gloo too)."""

    name = "channels"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (sending stage, ACT or GRAD) -> a two-rank group of its own; see open_channels
        self.channels: dict[tuple[int, int], dist.ProcessGroup] = {}

    @classmethod
    def problems(cls, schedule: Schedule) -> list[str]:
        problems = stream_order_problems(schedule)
        if not problems:
            return []
        return [
            "messages between workers match in the order they are posted here (as NCCL "
            "needs), so every stage must run its forwards and its backwards in micro-batch "
            "order: " + "; ".join(problems)
        ]

    @classmethod
    def open(
        cls,
        schedule: Schedule,
        worker: int,
        group: dist.ProcessGroup | None,
        device: torch.device,
        timeout_s: float,
        on_wait: Callable[[float, float], None] | None = None,
    ) -> Transport:
        transport = super().open(schedule, worker, group, device, timeout_s, on_wait)
        assert isinstance(transport, ChannelTransport)
        if schedule.num_workers > 1:
            ranks = [transport.global_rank(w) for w in range(schedule.num_workers)]
            transport.channels = open_channels(schedule.stage_worker, worker, ranks, schedule.skips)
        return transport

    def _tag(self, stage: int, kind: int, microbatch: int, index: int = 0) -> int:
        return 0  # order is all there is, as on NCCL, also when gloo carries the messages

    def _channel(self, stage: int, kind: int) -> dist.ProcessGroup | None:
        # metadata travels with the activations it describes, so it stays in their order
        return self.channels.get((stage, ACT if kind == META else kind), self.group)
