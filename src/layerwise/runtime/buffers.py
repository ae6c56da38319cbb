"""Receive buffers reused from one step to the next (CPU only).

A steady pipeline receives the same shapes every step. Allocating each receive buffer anew
costs little on a GPU (PyTorch's caching allocator keeps freed blocks) but a lot on CPU:
large blocks come back from the C allocator as fresh pages, and the first write to every
4 KiB page is a page fault. With 4 MiB activations that was thousands of faults per step
per worker, and 10-17 ms of extra CPU per step on 4 workers. PyTorch's own pipelining keeps
one buffer per micro-batch for the whole run; this pool keeps only as many as are in use at
once, and hands a buffer out again only when nothing else references its memory.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from layerwise.runtime.tree import TensorMeta

Key = tuple[tuple[int, ...], torch.dtype]
STEPS_KEPT = 4  # free buffers of a shape no step asked for in this many steps are dropped


def _storage_users(t: torch.Tensor) -> int:
    """Return how many tensors, views, autograd saves and pending receives share ``t``'s memory
    (the temporary storage object made here counts once)."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


def pool_supported(device: torch.device) -> bool:
    # On CUDA, work queued on a stream may still read a buffer nothing references any more,
    # and the caching allocator already reuses blocks; the pool is for CPU memory only.
    return device.type == "cpu" and hasattr(torch._C, "_storage_Use_Count")


class BufferPool:
    """Hands out receive buffers, and takes them back once nothing else uses their memory."""

    def __init__(self) -> None:
        self._free: dict[Key, list[torch.Tensor]] = defaultdict(list)
        self._lent: list[tuple[Key, torch.Tensor]] = []
        self._used: dict[Key, int] = {}  # shape -> the last step that asked for it
        self.steps = 0
        self.allocations = 0  # buffers made, not reused: steady training makes none

    def take(self, meta: TensorMeta) -> torch.Tensor:
        """Return a CPU tensor of ``meta``'s shape and dtype (contents undefined).

        The caller gets an alias: the pool keeps the tensor it allocated, so the memory's
        user count tells when every alias, view and autograd save has gone."""
        key = (meta.shape, meta.dtype)
        self._used[key] = self.steps
        if not self._free[key]:
            self.reclaim()  # only when needed: a steady pipeline rarely gets here
        free = self._free[key]
        if free:
            buf = free.pop()
        else:
            buf = meta.empty(torch.device("cpu"))
            self.allocations += 1
        self._lent.append((key, buf))
        return buf.detach()

    def reclaim(self) -> None:
        """Move back every lent buffer that only the pool still references."""
        still = []
        for key, buf in self._lent:
            # 2: the pool's tensor, and the temporary storage object _storage_users makes
            if _storage_users(buf) <= 2:
                self._free[key].append(buf)
            else:
                still.append((key, buf))
        self._lent = still

    def end_step(self) -> None:
        """Reclaim, and drop free buffers of shapes no step asked for in the last
        ``STEPS_KEPT``: lengths that take turns keep theirs, and a length that is gone (an
        evaluation at another length) does not keep its memory."""
        self.reclaim()
        for key in [k for k in self._free if self.steps - self._used.get(k, -1) >= STEPS_KEPT]:
            del self._free[key]
            self._used.pop(key, None)
        self.steps += 1

    def held_bytes(self) -> int:
        """Bytes of free buffers waiting to be reused."""
        return sum(b.numel() * b.element_size() for bufs in self._free.values() for b in bufs)
