"""What every transport between pipeline workers does, over torch.distributed.

Activations go forward (stage s -> s+1) and gradients back (s+1 -> s). Every wait has a
timeout; a peer that dies or stalls raises :class:`PeerError` naming the peer. How a message
finds its receive is the one thing that differs between transports, and each way is its own
subclass: :class:`~layerwise.runtime.transport.tags.TagTransport` (gloo matches every
message by its tag) and :class:`~layerwise.runtime.transport.channels.ChannelTransport`
(one process group per stream, where messages match in order, as NCCL needs). A subclass
supplies the group and the tag of each message, and says which schedules it can carry.

Metadata (structure, shapes, dtypes, and which tensors need a gradient back) of an
activation travels once per *key* (the shapes of the micro-batch's inputs, which every
worker learns at the start of a step, and how the step treats gradients) and is cached by
both sides, so steady-state transfers are payload only. Gradients need no metadata: the
receiver already holds the output they belong to. Only the tensors the sender marked get a
gradient: a float the sender computed without a graph (a mask, a rotary table) is received
as data and sends nothing back.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from layerwise.runtime.buffers import BufferPool, pool_supported
from layerwise.runtime.tree import TensorMeta, flatten, unflatten
from layerwise.schedules import Schedule


class PeerError(RuntimeError):
    """A peer worker died, stalled past the timeout, or sent something unexpected;
    ``peer_rank`` is its global rank when known."""

    def __init__(self, message: str, peer_rank: int | None = None) -> None:
        super().__init__(message)
        self.peer_rank = peer_rank


ACT, GRAD, META = 0, 1, 2
MAX_TENSORS = 32
FAILURE_KEY = "layerwise/first_failure"
# numbers one worker shares with all (on the pipeline group, above every message and tie tag)
PLAN_TAG, LOSS_TAG = 2**30 + 8, 2**30 + 9


# Sends still in flight when their transport was dropped. A send's buffers and its work
# object must live until the peer has received it (gloo may abandon a send whose work object
# is freed), so a dropped transport leaves them here, and every transport reaps this list.
_ORPHANED_SENDS: list[tuple[Any, list[torch.Tensor]]] = []


def forget_orphaned_sends() -> None:
    """Drop every orphaned send: their process group is being torn down after a failure."""
    _ORPHANED_SENDS.clear()


def reap_orphaned_sends() -> None:
    """Forget the orphaned sends that have completed."""
    _ORPHANED_SENDS[:] = [(w, ts) for w, ts in _ORPHANED_SENDS if not w.is_completed()]


@dataclass
class PendingRecv:
    """Receive buffers posted before they are needed."""

    works: list[Any]
    buffers: list[torch.Tensor]
    spec: Any
    peer: int
    what: str
    needs_grad: list[bool] | None = None  # activations: which tensors send a gradient back


class Transport:
    """Sends and receives tensor trees between the workers of one pipeline group.

    Subclasses say how messages are matched: :meth:`_tag` and :meth:`_channel`, and which
    schedules they can carry (:meth:`problems`)."""

    name = "base"

    def __init__(
        self,
        worker: int,
        num_workers: int,
        group: dist.ProcessGroup | None,
        device: torch.device,
        timeout_s: float,
        num_streams: int,
        on_wait: Callable[[float, float], None] | None = None,
    ) -> None:
        self.worker = worker
        self.num_workers = num_workers
        self.group = group
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        # a stream is what one stage sends to its neighbour (numbered by the stage), or one
        # skip between two stages (numbered after the stages: num_stages + its index)
        self.num_streams = num_streams
        self.on_wait = on_wait
        # (stage, key) -> (structure, tensors, which need a gradient)
        self.meta_cache: dict[tuple[int, Any], tuple[Any, list[TensorMeta], list[bool]]] = {}
        self.pending_sends: list[tuple[Any, list[torch.Tensor], int, str]] = []
        self.pool = BufferPool() if pool_supported(device) else None

    @classmethod
    def problems(cls, schedule: Schedule) -> list[str]:
        """Why this transport cannot carry ``schedule``; empty if it can."""
        return []

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
        """Check that this transport can carry ``schedule`` and set it up for ``worker``.

        Collective over the group when a subclass needs set-up (process groups)."""
        problems = cls.problems(schedule)
        if problems:
            raise ValueError(f"the {cls.name} transport cannot carry this schedule: "
                             + "; ".join(problems))  # fmt: skip
        return cls(worker, schedule.num_workers, group, device, timeout_s,
                   schedule.num_stages + len(schedule.skips), on_wait)  # fmt: skip

    # -- helpers ------------------------------------------------------------------------------

    def global_rank(self, worker: int) -> int:
        if self.group is None:
            return worker
        return dist.get_global_rank(self.group, worker)

    def _tag(self, stage: int, kind: int, microbatch: int, index: int = 0) -> int:
        """The tag of one tensor of one message (kind ACT, GRAD or META)."""
        raise NotImplementedError

    def _channel(self, stage: int, kind: int) -> dist.ProcessGroup | None:
        """The process group that carries messages sent by ``stage`` of ``kind``."""
        return self.group

    def report_failure(self, message: str) -> str:
        """Record the first failure of the job in the rendezvous store; return the first one.

        A dead worker cannot say why it died, but its neighbour can, and every other worker
        then sees a neighbour vanish. The store lets them all name the first loss.
        """
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=5))
            first = store.compare_set(FAILURE_KEY, "", message)
            return bytes(first).decode() if first else message
        except Exception:  # the store itself may be gone with the worker that hosted it
            return message

    def _wait(self, work: Any, peer: int, what: str) -> None:
        t0 = time.perf_counter()
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as err:
            if "timed out" in str(err).lower():
                message = (
                    f"worker {self.worker}: no {what} from worker {peer} (rank "
                    f"{self.global_rank(peer)}) within {self.timeout.total_seconds():g}s; "
                    f"is it alive and running the same schedule?"
                )
            else:
                message = (
                    f"worker {self.worker} lost worker {peer} (rank {self.global_rank(peer)}) "
                    f"while waiting for {what}"
                )
            first = self.report_failure(message)
            if first != message:
                message += f". First failure in the job: {first}"
            raise PeerError(
                f"{message} [{str(err).splitlines()[0][:200]}]", self.global_rank(peer)
            ) from err
        if ok is False:
            raise PeerError(
                f"worker {self.worker}: no {what} from worker {peer} within "
                f"{self.timeout.total_seconds():g}s (is it alive?)",
                self.global_rank(peer),
            )
        if self.on_wait is not None:
            self.on_wait(t0, time.perf_counter())

    def _isend(
        self, tensor: torch.Tensor, peer: int, stage: int, kind: int, mb: int, index: int
    ) -> Any:
        return dist.isend(
            tensor,
            dst=self.global_rank(peer),
            group=self._channel(stage, kind),
            tag=self._tag(stage, kind, mb, index),
        )

    def _irecv(
        self, tensor: torch.Tensor, peer: int, stage: int, kind: int, mb: int, index: int
    ) -> Any:
        return dist.irecv(
            tensor,
            src=self.global_rank(peer),
            group=self._channel(stage, kind),
            tag=self._tag(stage, kind, mb, index),
        )

    # -- sending ------------------------------------------------------------------------------

    def send_activation(
        self,
        value: Any,
        stage: int,
        microbatch: int,
        peer: int,
        signature: Any,
        needs_grad: list[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Send stage ``stage``'s output for ``microbatch`` to ``peer``; return the sent tensors.

        ``needs_grad`` marks the tensors whose gradient the sender will wait for (default:
        every floating-point one); it must be the same for every message of a ``signature``."""
        tensors, spec = flatten(value)
        metas = [TensorMeta.of(t) for t in tensors]
        needs = [t.is_floating_point() for t in tensors] if needs_grad is None else needs_grad
        key = (stage, signature)
        cached = self.meta_cache.get(key)
        if cached is None:
            self.meta_cache[key] = (spec, metas, needs)
            blob_data = pickle.dumps((spec, metas, needs))
            raw = torch.frombuffer(bytearray(blob_data), dtype=torch.uint8)
            blob = raw.to(self.device)  # NCCL moves only GPU tensors
            size = torch.tensor([blob.numel()], dtype=torch.int64, device=self.device)
            for i, t in enumerate((size, blob)):
                work = self._isend(t, peer, stage, META, microbatch, i)
                self.pending_sends.append((work, [t], peer, "metadata"))
        elif cached[:2] == (spec, metas) and cached[2] != needs:
            raise PeerError(
                f"stage {stage}'s outputs that need a gradient changed for micro-batch "
                f"{microbatch} (now {needs}, before {cached[2]}) although their shapes did "
                f"not; a parameter was frozen or unfrozen during the pipeline's life? build a "
                f"new Pipeline after changing which parameters require grad"
            )
        elif cached != (spec, metas, needs):
            raise PeerError(
                f"stage {stage} output for micro-batch {microbatch} changed to "
                f"{[m.describe() for m in metas]} (structure {spec}) although its inputs kept "
                f"their shapes; it was {[m.describe() for m in cached[1]]}. Stage outputs must "
                f"depend only on input shapes."
            )
        sent = [t.detach().contiguous() for t in tensors]
        for i, t in enumerate(sent):
            work = self._isend(t, peer, stage, ACT, microbatch, i)
            self.pending_sends.append((work, [t], peer, "activation"))
        return sent

    def send_gradient(
        self, grads: list[torch.Tensor], stage: int, microbatch: int, peer: int
    ) -> None:
        """Send the input gradients of ``stage`` for ``microbatch`` back to ``peer``."""
        for i, g in enumerate(grads):
            g = g.contiguous()
            work = self._isend(g, peer, stage, GRAD, microbatch, i)
            self.pending_sends.append((work, [g], peer, "gradient"))

    def share_number(self, number: float, src: int, tag: int, what: str) -> float:
        """Return worker ``src``'s ``number`` on every worker of the group.

        Point to point rather than a broadcast: ``src`` only posts its sends (they finish in
        the background and are reaped with the others), so a worker that knows a number
        early, like the last stage's loss, never waits for the workers still busy; and a
        worker that learns it late finds the message already there."""
        value = torch.tensor([number], dtype=torch.float64, device=self.device)
        if self.worker == src:
            for peer in range(self.num_workers):
                if peer != src:
                    work = dist.isend(value, dst=self.global_rank(peer), group=self.group, tag=tag)
                    self.pending_sends.append((work, [value], peer, what))
            return number
        work = dist.irecv(value, src=self.global_rank(src), group=self.group, tag=tag)
        self._wait(work, src, what)
        return float(value.item())

    def close(self, wait: bool = True) -> None:
        """Finish this transport's sends: wait for each (bounded by the timeout), or, without
        ``wait``, hand those still in flight to the module so that they are not lost."""
        if wait:
            self.reap_sends(block=True)
        else:
            _ORPHANED_SENDS.extend((w, ts) for w, ts, _, _ in self.pending_sends)
            self.pending_sends = []
        reap_orphaned_sends()

    def reap_sends(self, block: bool = False) -> None:
        """Drop finished sends (and their buffers); with ``block``, wait for all of them."""
        keep = []
        for work, tensors, peer, what in self.pending_sends:
            if block:
                self._wait(work, peer, f"acknowledgement of a {what} send")
            elif not work.is_completed():
                keep.append((work, tensors, peer, what))
        self.pending_sends = keep

    # -- receiving ----------------------------------------------------------------------------

    def _buffer(self, meta: TensorMeta) -> torch.Tensor:
        return self.pool.take(meta) if self.pool is not None else meta.empty(self.device)

    def forget_shapes(self, keep: set[Any]) -> None:
        """Drop the metadata of every message whose micro-batch shapes are not in ``keep``.

        Called at the start of a step on every worker at once (see
        :mod:`layerwise.runtime.shapes`), when no message is in flight, so the two ends of
        every stream forget the same entries."""
        self.meta_cache = {k: v for k, v in self.meta_cache.items() if k[1][0] in keep}

    def end_step(self) -> None:
        """At the end of a step: take back the receive buffers nothing uses any more, and
        forget those of shapes the step did not use (the pool takes buffers back by itself
        whenever it runs out, so nothing needs doing between actions)."""
        if self.pool is not None:
            self.pool.end_step()

    def _recv_meta(
        self, stage: int, microbatch: int, peer: int, signature: Any
    ) -> tuple[Any, list[TensorMeta], list[bool]]:
        key = (stage, signature)
        if key not in self.meta_cache:
            what = f"metadata of stage {stage}'s output"
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._wait(self._irecv(size, peer, stage, META, microbatch, 0), peer, what)
            blob = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
            self._wait(self._irecv(blob, peer, stage, META, microbatch, 1), peer, what)
            self.meta_cache[key] = pickle.loads(blob.cpu().numpy().tobytes())
        return self.meta_cache[key]

    def knows(self, stage: int, signature: Any) -> bool:
        """Return True if the metadata of ``stage``'s output for these shapes is cached."""
        return (stage, signature) in self.meta_cache

    def post_activation(
        self, stage: int, microbatch: int, peer: int, signature: Any, what: str = ""
    ) -> PendingRecv:
        """Post receives for stage ``stage``'s output for ``microbatch`` (sent by ``peer``)."""
        spec, metas, needs = self._recv_meta(stage, microbatch, peer, signature)
        buffers = [self._buffer(m) for m in metas]
        works = [self._irecv(b, peer, stage, ACT, microbatch, i) for i, b in enumerate(buffers)]
        what = f"{what or f'stage {stage} output'} for micro-batch {microbatch}"
        return PendingRecv(works, buffers, spec, peer, what, needs)

    def post_gradient(
        self, like: list[TensorMeta], stage: int, microbatch: int, peer: int, what: str = ""
    ) -> PendingRecv:
        """Post receives for the gradients of ``like`` (outputs of ``stage - 1``) from ``peer``."""
        buffers = [self._buffer(m) for m in like]
        works = [self._irecv(b, peer, stage, GRAD, microbatch, i) for i, b in enumerate(buffers)]
        what = f"{what or f'stage {stage} input gradient'} for micro-batch {microbatch}"
        return PendingRecv(works, buffers, None, peer, what)

    def complete(self, pending: PendingRecv) -> Any:
        """Wait for a posted receive; return the tree (activations) or the tensor list (grads)."""
        for work in pending.works:
            self._wait(work, pending.peer, pending.what)
        if pending.spec is None:
            return pending.buffers
        return unflatten(pending.buffers, pending.spec)
