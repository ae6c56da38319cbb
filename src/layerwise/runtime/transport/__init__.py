"""Point-to-point transports between pipeline workers: one class per way of matching
messages. A new transport (say, one that batches NCCL operations) is a new module here with
a subclass of :class:`Transport` and an entry in :data:`TRANSPORTS`."""

from __future__ import annotations

import torch.distributed as dist

from layerwise.runtime.transport.base import (
    LOSS_TAG,
    PLAN_TAG,
    PeerError,
    PendingRecv,
    Transport,
)
from layerwise.runtime.transport.channels import ChannelTransport, open_channels
from layerwise.runtime.transport.tags import TagTransport

TRANSPORTS: dict[str, type[Transport]] = {"tags": TagTransport, "channels": ChannelTransport}
P2P_MODES = ("auto", *TRANSPORTS)


def transport_class(p2p: str, group: dist.ProcessGroup | None) -> type[Transport]:
    """The transport ``p2p`` names; ``auto`` picks tags on gloo and channels elsewhere."""
    if p2p not in P2P_MODES:
        raise ValueError(f"p2p must be one of {P2P_MODES}, got {p2p!r}")
    if p2p == "auto":
        distributed = dist.is_available() and dist.is_initialized()
        gloo = not distributed or dist.get_backend(group) == "gloo"
        p2p = "tags" if gloo else "channels"
    return TRANSPORTS[p2p]


__all__ = [
    "LOSS_TAG",
    "P2P_MODES",
    "PLAN_TAG",
    "TRANSPORTS",
    "ChannelTransport",
    "PeerError",
    "PendingRecv",
    "TagTransport",
    "Transport",
    "open_channels",
    "transport_class",
]
