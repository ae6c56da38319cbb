"""Healing from a surviving replica, in memory: the worker side.

With data parallelism every weight and (without ZeRO) every optimizer state lives on each
replica. When a worker is lost, the others need not go back to the last checkpoint: they
leave the broken process group, wait for the launcher (:mod:`layerwise.job.heal_launcher`)
to start a replacement, join a new group with it (a new *generation* of the rendezvous,
under its own prefix in the launcher's store), and each data-parallel group copies the
state of its most advanced surviving member to the others over ``torch.distributed``. Only
the step in flight is redone. When some stage has no surviving replica, or the survivors
disagree on the step, everyone loads the newest checkpoint instead, in the same processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from layerwise.job.checkpoints import OPTIONS
from layerwise.parallel.data import local_tensor
from layerwise.runtime.transport.base import forget_orphaned_sends

STORE_ENV, GENERATION_ENV = "LAYERWISE_HEAL_STORE", "LAYERWISE_GENERATION"
GENERATION_KEY = "layerwise/generation"


def heal_timeout(timeout_s: float) -> float:
    """How long survivors wait for a replacement and its group: the launcher may wait one
    timeout for the others to report before it starts it, and a new process takes seconds
    to import and build its stages."""
    return 3 * timeout_s + 60


class Healable(Protocol):
    """What healing needs of a trainer (``job.train.Trainer``)."""

    done: int
    groups: Any
    pipe: Any
    inner: torch.optim.Optimizer
    guard: Any

    def resume(self, required: bool) -> int: ...


@dataclass
class HealLink:
    """This worker's tie to the launcher's store, and the generation it belongs to."""

    host: str
    port: int
    generation: int
    backend: str = "gloo"

    @classmethod
    def from_env(cls, device: str) -> HealLink | None:
        where = os.environ.get(STORE_ENV)
        if not where:
            return None
        host, port = where.rsplit(":", 1)
        return cls(host, int(port), int(os.environ.get(GENERATION_ENV, "0")),
                   "nccl" if device == "cuda" else "gloo")  # fmt: skip

    def _store(self, timeout_s: float) -> dist.TCPStore:
        return dist.TCPStore(self.host, self.port, is_master=False,
                             timeout=timedelta(seconds=timeout_s))  # fmt: skip

    def connect(self, timeout_s: float, wait_s: float | None = None) -> None:
        """Join this generation's process group (rank and world from the environment): wait
        up to ``wait_s`` for the others to arrive (a replacement takes a while to start),
        then give every operation ``timeout_s``, as the job's own group has."""
        store = dist.PrefixStore(f"gen{self.generation}/", self._store(wait_s or timeout_s))
        dist.init_process_group(self.backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timedelta(seconds=timeout_s))  # fmt: skip

    def next_generation(self, timeout_s: float) -> None:
        """Wait until the launcher has started the replacements and opened a new generation."""
        store = self._store(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = int(store.get(GENERATION_KEY).decode())
            if now > self.generation:
                self.generation = now
                return
            time.sleep(0.1)
        raise TimeoutError(f"no replacement worker within {timeout_s:g}s")


def leave_group() -> None:
    """Drop the broken process group (and the sends it will never finish)."""
    forget_orphaned_sends()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Snapshot:
    """A survivor's state, copied out of its trainer so that the trainer (and with it every
    handle on the broken process group) can be dropped before the group is left: then the
    group's connections close and peers still blocked on them fail at once instead of
    waiting out their timeout."""

    model: dict[str, Any]
    optim: dict[str, Any]
    guard: tuple[float | None, int]
    done: int
    record: dict[str, Any] | None  # the record of step ``done - 1``, in case it went unlogged

    @classmethod
    def of(cls, trainer: Healable, record: dict[str, Any] | None) -> Snapshot:
        module = trainer.pipe.module()
        model = {k: v.detach().clone() for k, v in get_model_state_dict(module).items()}
        optim = get_optimizer_state_dict(module, trainer.inner, options=OPTIONS)
        optim = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                 for k, v in optim.items()}  # fmt: skip
        guard = (trainer.guard.ema, trainer.guard.nonfinite_in_row)
        return cls(model, optim, guard, trainer.done, record)

    def restore(self, trainer: Healable) -> None:
        module = trainer.pipe.module()
        set_model_state_dict(module, self.model)
        set_optimizer_state_dict(module, trainer.inner, self.optim, options=OPTIONS)
        trainer.guard.ema, trainer.guard.nonfinite_in_row = self.guard


def plan(done: list[int], coords: list[tuple[int, int, int]]) -> tuple[int, dict[int, int]] | None:
    """Given each rank's completed steps (-1: a replacement with no state) and its (dp, pp,
    tp) coordinates, return the step to go on from and, per rank, the rank it takes its
    state from; None when a stage's replicas all died or survivors disagree on the step."""
    groups: dict[tuple[int, int], list[int]] = {}
    for rank, (_, pp, tp) in enumerate(coords):
        groups.setdefault((pp, tp), []).append(rank)
    best = {key: max(done[r] for r in ranks) for key, ranks in groups.items()}
    if min(best.values()) < 0 or len(set(best.values())) != 1:
        return None
    step = next(iter(best.values()))
    source = {}
    for ranks in groups.values():
        donor = min(r for r in ranks if done[r] == step)
        source.update({r: donor for r in ranks})
    return step, source


def _broadcast_state(trainer: Healable, donor: int) -> None:
    """Copy model and optimizer state from ``donor`` to the rest of this rank's
    data-parallel group (collective over the group)."""
    group = trainer.groups.dp
    module = trainer.pipe.module()
    model = get_model_state_dict(module)
    optim = get_optimizer_state_dict(module, trainer.inner, options=OPTIONS)
    with torch.no_grad():
        for state in (model, optim):
            for key in sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)):
                dist.broadcast(local_tensor(state[key]), src=donor, group=group)
    set_model_state_dict(module, model)
    set_optimizer_state_dict(module, trainer.inner, optim, options=OPTIONS)


def recover(link: HealLink, old: Snapshot | None, build: Callable[[], Healable],
            timeout_s: float) -> tuple[Healable, int, dict[str, Any] | None]:  # fmt: skip
    """Rejoin the job after a loss (``old``: this survivor's state, its trainer already
    dropped; None for a replacement). Return the trainer to go on with, the step to go on
    from, and the record of the step before it as a survivor has it (a lost first rank may
    have died before logging it); ``timeout_s`` is the job's own timeout."""
    wait_s = heal_timeout(timeout_s)
    if old is not None:
        leave_group()
        link.next_generation(wait_s)
    link.connect(timeout_s, wait_s)
    trainer = build()
    if old is not None:
        old.restore(trainer)
    done: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(done, old.done if old is not None else -1)
    layout = trainer.groups.layout
    found = None
    if layout.dp > 1 and trainer.groups.dp is not None and not trainer.cfg.zero:
        found = plan(done, [layout.coords(r) for r in range(layout.world)])
    if found is None:  # no replica holds everything: the newest checkpoint, in-process
        return trainer, trainer.resume(required=False), None
    step, source = found
    _broadcast_state(trainer, source[dist.get_rank()])
    first = min(r for r in range(len(done)) if done[r] == step)
    shared = [trainer.guard.ema, trainer.guard.nonfinite_in_row, old.record if old else None]
    dist.broadcast_object_list(shared, src=first)
    trainer.guard.ema, trainer.guard.nonfinite_in_row, record = shared
    trainer.done = step
    return trainer, step, record if record and record.get("step") == step - 1 else None
