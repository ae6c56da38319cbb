"""Zero-bubble schedules (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): the backward
split into I (input gradient, which the previous stage waits for) and W (weight gradient,
which nobody waits for), so that weight gradients fill what would otherwise be idle time.

All of them are built by :func:`list_schedule`, on unit costs (F = I = W = 1), and differ
only in two limits per worker: ``ahead``, how many of its micro-batches may await their I
(the warm-up depth), and ``hold``, how many may await their W (the activations it keeps,
since W still reads the stage's input). The peak in flight is ``hold`` once m is large:

==============  ===========================  ==================  =========================
schedule        ahead (worker w)             hold                peak in flight (chunks)
==============  ===========================  ==================  =========================
zb-h1           p - w (1F1B's warm-up + 1)   p                   min(p, m)
zb-h2           2(p - w) - 1                 2p - 1              min(2p - 1, m)
interleaved-zb  interleaved warm-up + 1      vp + p - 1          min(vp + p - 1, vm)
==============  ===========================  ==================  =========================
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from layerwise.schedules.generators import (
    interleaved_unit,
    interleaved_warmup,
    multiple_of_workers,
)
from layerwise.schedules.ir import Action, Kind, Schedule, ScheduleError, check_sizes
from layerwise.schedules.registry import ScheduleSpec, register, stage_worker

Limit = Callable[[int], int]  # worker -> a limit on its micro-batches in flight


def _waits_for(action: Action, num_stages: int) -> list[Action]:
    """What ``action`` waits for when every stage splits its backward (the rule of
    ``validate.dependencies``): F the previous stage's F; I its own F and the next stage's
    I; W its own I."""
    s, mb = action.stage, action.microbatch
    if action.kind == "F":
        return [Action(s - 1, "F", mb)] if s > 0 else []
    if action.kind == "W":
        return [Action(s, "I", mb)]
    nxt = [Action(s + 1, "I", mb)] if s + 1 < num_stages else []
    return [Action(s, "F", mb), *nxt]


@dataclass
class _Worker:
    """One worker's progress through its fixed order of forwards and of input gradients."""

    forwards: list[Action]
    grads: list[Action]
    ahead: int
    hold: int
    actions: list[Action] = field(default_factory=list)
    next_f: int = 0
    next_i: int = 0
    pending_w: deque[Action] = field(default_factory=deque)
    free_at: int = 0

    def held(self) -> int:
        """Return how many micro-batch activations it holds: forwards whose W has not run."""
        return self.next_f - (self.next_i - len(self.pending_w))

    def choose(self, ready: Callable[[Action], bool]) -> Action | None:
        """Take the next forward if both limits allow it, else the next input gradient, else
        the oldest pending weight gradient; None if none of them can run now."""
        if (
            self.next_f < len(self.forwards)
            and self.next_f - self.next_i < self.ahead
            and self.held() < self.hold
            and ready(self.forwards[self.next_f])
        ):
            self.next_f += 1
            return self.forwards[self.next_f - 1]
        if self.next_i < len(self.grads) and ready(self.grads[self.next_i]):
            grad = self.grads[self.next_i]
            self.next_i += 1
            self.pending_w.append(Action(grad.stage, "W", grad.microbatch))
            return grad
        return self.pending_w.popleft() if self.pending_w else None


def _arrived(finish: dict[Action, int], num_stages: int, t: int) -> Callable[[Action], bool]:
    """Return whether an action's inputs are all finished by time ``t``."""
    return lambda a: all(finish.get(d, t + 1) <= t for d in _waits_for(a, num_stages))


def list_schedule(name: str, p: int, m: int, v: int, ahead: Limit, hold: Limit) -> Schedule:
    """Return the split-backward schedule that list scheduling on unit costs gives.

    Stages are looped (stage s on worker s mod p). Each worker runs its forwards and its
    input gradients in interleaved order (:func:`interleaved_unit`; with v = 1 simply
    micro-batch order), so every stage sends its activations and its gradients in
    micro-batch order, as order-matching transports need. Time advances one unit at a time
    and each free worker takes, in this order: its next forward, if its input has arrived,
    fewer than ``ahead(w)`` micro-batches await their I and fewer than ``hold(w)`` await
    their W; else its next input gradient, once the next stage's has arrived; else its
    oldest pending weight gradient. Forwards go first because a forward left for later
    leaves the gradients that come back from it late, and the first worker idle.
    """
    n = p * v
    workers = [
        _Worker(
            forwards=[_unit_action(p, v, w, k, "F") for k in range(m * v)],
            grads=[_unit_action(p, v, w, k, "I") for k in range(m * v)],
            ahead=ahead(w),
            hold=hold(w),
        )
        for w in range(p)
    ]
    finish: dict[Action, int] = {}
    remaining, t = 3 * n * m, 0
    while remaining:
        ready = _arrived(finish, n, t)
        for worker in workers:
            action = worker.choose(ready) if worker.free_at <= t else None
            if action is not None:
                worker.actions.append(action)
                finish[action] = worker.free_at = t + 1
                remaining -= 1
        if all(worker.free_at <= t for worker in workers):
            # nobody started anything and nothing is running: nothing will change
            raise ScheduleError(f"{name}: list scheduling stalled at time {t} (p={p}, m={m})")
        t += 1
    actions = tuple(tuple(worker.actions) for worker in workers)
    return Schedule(name, m, stage_worker("looped", p, v), actions)


def _unit_action(p: int, v: int, w: int, k: int, kind: Kind) -> Action:
    """Return worker w's k-th forward ("F") or input gradient ("I") in interleaved order."""
    chunk, mb = interleaved_unit(p, v, k, backward=kind != "F")
    return Action(chunk * p + w, kind, mb)


def zb_h1(num_workers: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, Sec. 2.1): 1F1B with the backward split into I and W.

    A forward runs while fewer than ``p - w`` of worker w's micro-batches await their I
    (1F1B's warm-up) and fewer than ``p`` await their W (1F1B's peak memory, as in the
    paper). Later workers thus defer their W into the cool-down that 1F1B leaves idle,
    which cuts the bubble to about a third of 1F1B's when F = I = W. (Trying I before F
    leaves the first worker idle in the cool-down: its last forward then leaves too late
    for the gradients to come back in time.)
    """
    check_sizes(num_workers, num_microbatches)
    p = num_workers
    return list_schedule("zb-h1", p, num_microbatches, 1, lambda w: p - w, lambda w: p)


def zb_h2(num_workers: int, num_microbatches: int) -> Schedule:
    """ZB-H2 (Qi et al. 2023, Sec. 2.2): ZB-H1 with a deeper warm-up, so that forwards fill
    the wait for the first input gradient. Worker w's first I can start at time 2p - 1 - w,
    so it runs ``2(p - w) - 1`` forwards first; every worker may hold up to ``2p - 1``
    micro-batches (the paper's limit), and W fill whatever is left (p = 3, m = 6)::

        w0  F0 F1 F2 F3 F4 I0 W0 F5 I1 I2 W1 W2 I3 I4 W3 W4 I5 W5 .. ..
        w1  .. F0 F1 F2 I0 F3 I1 F4 I2 W0 F5 I3 I4 W1 W2 I5 W3 W4 W5 ..
        w2  .. .. F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 W0 F5 I5 W1 W2 W3 W4 W5

    (ZB-H1 on the same sizes leaves w0 idle for two units after its third forward.)

    With m >= 2p every worker computes without a gap from its first action to its last:
    the step is a parallelogram, the paper's zero bubble. Its slanted ends (worker w starts
    and ends w forwards late) are left for the next step to fill, which the paper reaches
    by validating the optimizer step afterwards; inside one step they remain, so
    each worker idles (p - 1) max(F + I - 2W, F) against ZB-H1's (p - 1) max(F + I - W, F):
    the same with F = I = W, less when I takes longer than W.
    """
    check_sizes(num_workers, num_microbatches)
    p = num_workers
    return list_schedule(
        "zb-h2", p, num_microbatches, 1, lambda w: 2 * (p - w) - 1, lambda w: 2 * p - 1
    )


# Micro-batches go through a worker's chunks in groups of p, as in interleaved 1F1B.
INTERLEAVED_ZB_SIZES = multiple_of_workers("interleaved-zb")


def interleaved_zb(num_workers: int, num_microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B with the backward split into I and W, W deferred into idle time (as
    PyTorch's ``ScheduleInterleavedZeroBubble``): stages looped, forwards and backwards in
    interleaved 1F1B's order and warm-up, and every worker allowed the activations that
    interleaved 1F1B's first worker holds, ``(v-1)p + 2(p-1) + 1`` chunk-micro-batches, so
    later workers keep W for the cool-down. With p = m = v = 2 (stages 0, 2 on w0), against
    interleaved 1F1B below it (F = I = W = 1, B = 2)::

        w0  0F0 0F1 2F0 2F1 ... 2I0 2W0 2I1 0I0 0I1 2W1 0W0 0W1
        w1  ... 1F0 1F1 3F0 3I0 3F1 3I1 1I0 1I1 3W0 3W1 1W0 1W1

        w0  0F0 0F1 2F0 2F1 ... ... 2B0 2B0 ... 2B1 2B1 0B0 0B0 0B1 0B1
        w1  ... 1F0 1F1 3F0 3B0 3B0 3F1 3B1 3B1 1B0 1B0 1B1 1B1 ... ...

    With F = I = W it leaves only the ramp of (p - 1) chunk forwards per worker. With one
    stage per worker it is ZB-H2 (Megatron's interleaved warm-up, 2(p-1-w), is deeper
    than 1F1B's). Needs m to be a multiple of p.
    """
    check_sizes(num_workers, num_microbatches, chunks)
    p, m, v = num_workers, num_microbatches, chunks
    INTERLEAVED_ZB_SIZES.check(p, m, v)
    return list_schedule(
        "interleaved-zb",
        p,
        m,
        v,
        lambda w: interleaved_warmup(p, v, w) + 1,
        lambda w: interleaved_warmup(p, v, 0) + 1,
    )


register(
    ScheduleSpec(
        name="zb-h1",
        generator=zb_h1,
        description="1F1B with the backward split into I and W: deferred weight gradients "
        "fill the cool-down bubble at 1F1B's peak memory",
        # A forward waits only until fewer than p micro-batches await their W, so every
        # worker, not only the first, may hold p; deferred W keep later workers' inputs.
        peak_inflight=lambda p, m, v, w: min(p, m),
        aliases=("zb", "zbh1"),
        split_backward=True,
    )
)
register(
    ScheduleSpec(
        name="zb-h2",
        generator=zb_h2,
        description="zero-bubble with a deeper warm-up: no gaps inside a worker's step, at "
        "up to 2p-1 micro-batches' activations (twice 1F1B's)",
        # every worker reaches the hold limit once m >= 2p - 1; below, it holds them all
        peak_inflight=lambda p, m, v, w: min(2 * p - 1, m),
        aliases=("zbh2",),
        split_backward=True,
    )
)
register(
    ScheduleSpec(
        name="interleaved-zb",
        generator=interleaved_zb,
        description="interleaved 1F1B with the backward split into I and W: deferred weight "
        "gradients fill the bubble, at interleaved 1F1B's peak memory",
        # every worker may hold what interleaved 1F1B's first worker holds, and does
        peak_inflight=lambda p, m, v, w: min(interleaved_warmup(p, v, 0) + 1, m * v),
        aliases=("interleaved-zero-bubble",),
        chunks_default=2,
        chunks_allowed=(1, None),
        constraints=(INTERLEAVED_ZB_SIZES,),
        split_backward=True,
        interleaves="zb-h1",
    )
)
