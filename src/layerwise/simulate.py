"""Discrete-event simulation of a schedule: per-stage costs in, predicted Timeline out.

Each worker runs its action list in order. An action starts when its worker is free and
every action it depends on has finished, plus the point-to-point cost when that action ran
on another worker (latency + bytes / bandwidth). Sends do not block the sender, matching the
runtime, which posts them asynchronously.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from layerwise.schedules import Action, Schedule, dependencies, dependency_keys
from layerwise.timeline import Event, Timeline


def _per_stage(value: float | Sequence[float], num_stages: int, name: str) -> tuple[float, ...]:
    values = (
        (float(value),) * num_stages if isinstance(value, int | float) else tuple(map(float, value))
    )
    if len(values) != num_stages:
        raise ValueError(f"{name} has {len(values)} entries, expected one per stage ({num_stages})")
    for s, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{s}] = {v}: costs must be finite and >= 0")
    return values


@dataclass(frozen=True)
class Costs:
    """Per-stage times of one micro-batch, and the cost of sending between workers.

    ``input_grad`` and ``weight_grad`` default to half of ``backward`` each; they are only
    used by stages whose backward the schedule splits into I and W.
    ``activation_bytes[s]`` is the size of what stage s sends forward (its gradient, sent
    back, is the same size). ``skip_bytes`` gives the size of the skips between two stages
    (``Schedule.skips``) as ((stashing stage, popping stage), bytes) pairs; a skip not
    listed is costed like its stashing stage's activation.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    input_grad: tuple[float, ...]
    weight_grad: tuple[float, ...]
    activation_bytes: tuple[float, ...]
    comm_latency: float = 0.0
    comm_bandwidth: float = math.inf  # bytes per second
    skip_bytes: tuple[tuple[tuple[int, int], float], ...] = ()

    @staticmethod
    def per_stage(
        forward: Sequence[float],
        backward: Sequence[float],
        input_grad: Sequence[float] | None = None,
        weight_grad: Sequence[float] | None = None,
        activation_bytes: float | Sequence[float] = 0.0,
        comm_latency: float = 0.0,
        comm_bandwidth: float = math.inf,
    ) -> Costs:
        """Build Costs from per-stage lists, validating lengths and values."""
        n = len(forward)
        fwd = _per_stage(forward, n, "forward")
        bwd = _per_stage(backward, n, "backward")
        ig = _per_stage(input_grad, n, "input_grad") if input_grad is not None else None
        wg = _per_stage(weight_grad, n, "weight_grad") if weight_grad is not None else None
        if ig is None and wg is None:
            ig = tuple(b / 2 for b in bwd)
        if ig is None:
            assert wg is not None
            ig = tuple(max(0.0, b - w) for b, w in zip(bwd, wg, strict=True))
        if wg is None:
            wg = tuple(max(0.0, b - i) for b, i in zip(bwd, ig, strict=True))
        if comm_latency < 0 or not comm_bandwidth > 0:
            raise ValueError("comm_latency must be >= 0 and comm_bandwidth > 0")
        return Costs(
            fwd,
            bwd,
            ig,
            wg,
            _per_stage(activation_bytes, n, "activation_bytes"),
            float(comm_latency),
            float(comm_bandwidth),
        )

    @staticmethod
    def uniform(
        num_stages: int,
        forward: float = 1.0,
        backward: float = 2.0,
        weight_grad: float | None = None,
        activation_bytes: float = 0.0,
        comm_latency: float = 0.0,
        comm_bandwidth: float = math.inf,
    ) -> Costs:
        """Return identical costs for every stage; W defaults to half of B."""
        wg = None if weight_grad is None else [weight_grad] * num_stages
        return Costs.per_stage(
            [forward] * num_stages,
            [backward] * num_stages,
            None,
            wg,
            activation_bytes,
            comm_latency,
            comm_bandwidth,
        )

    @property
    def num_stages(self) -> int:
        return len(self.forward)

    def duration(self, action: Action) -> float:
        """Return the compute time of ``action``."""
        table = {"F": self.forward, "B": self.backward, "I": self.input_grad, "W": self.weight_grad}
        return table[action.kind][action.stage]

    def transfer(self, sender_stage: int, receiver_stage: int) -> float:
        """Return the time to move one activation (or its gradient) between two stages."""
        boundary = min(sender_stage, receiver_stage)
        return self.comm_latency + self.activation_bytes[boundary] / self.comm_bandwidth

    def skip_transfer(self, source: int, target: int) -> float:
        """Return the time to move the skips from stage ``source`` to stage ``target`` (or
        their gradients back)."""
        size = dict(self.skip_bytes).get((source, target), self.activation_bytes[source])
        return self.comm_latency + size / self.comm_bandwidth


def simulate(schedule: Schedule, costs: Costs) -> Timeline:
    """Predict the Timeline of one step of ``schedule`` with ``costs``.

    Raises ValueError if the costs do not have one entry per stage, and ScheduleError if the
    schedule deadlocks.
    """
    if costs.num_stages != schedule.num_stages:
        raise ValueError(
            f"costs describe {costs.num_stages} stages but the schedule has {schedule.num_stages}"
        )
    finish: dict[tuple[int, str, int], float] = {}
    free_at = [0.0] * schedule.num_workers
    events: list[Event] = []
    for w, pos in schedule.order:
        action = schedule.actions[w][pos]
        ready = max(free_at[w], inputs_at(action, schedule, costs, finish))
        end = ready + costs.duration(action)
        finish[action] = end
        free_at[w] = end
        events.append(Event(w, ready, end, action.kind, action.stage, action.microbatch))
    return Timeline(
        num_workers=schedule.num_workers,
        events=events,
        source="simulated",
        meta={
            "schedule": schedule.name,
            "microbatches": schedule.num_microbatches,
            "stages": schedule.num_stages,
        },
    )


def inputs_at(
    action: Action, schedule: Schedule, costs: Costs, finish: dict[tuple[int, str, int], float]
) -> float:
    """Return when every input of ``action`` is on its worker: each dependency's end in
    ``finish`` (all must be there), plus the message's time when it ran on another worker."""
    worker_of = schedule.stage_worker
    w = worker_of[action.stage]
    near = action.stage - 1 if action.kind == "F" else action.stage + 1
    ready = 0.0
    for dep in dependency_keys(action, schedule):
        arrive = finish[dep]
        dep_stage = dep[0]
        if worker_of[dep_stage] != w:
            if dep_stage in (near, action.stage):
                arrive += costs.transfer(dep_stage, action.stage)
            else:  # a skip, its own message (a skip to the next stage is costed as the
                # activation that travels beside it)
                pair = (min(dep_stage, action.stage), max(dep_stage, action.stage))
                arrive += costs.skip_transfer(*pair)
        ready = max(ready, arrive)
    return ready


def measured_costs(
    timelines: Sequence[Timeline], schedule: Schedule, dispatch: float | None = None
) -> Costs:
    """Return the costs a run of ``schedule`` actually had, read off measured timelines.

    Each stage gets its mean F, B (or I and W) duration, plus the worker's *dispatch* time:
    the median gap between two consecutive actions of a worker when the second one's inputs
    were already there, the runtime's own work between actions (posting receives, reaping
    sends, hooks), which the simulator has no other place for and which weighs more the more
    and shorter the actions are (``dispatch`` given: that instead, e.g. read off another run
    with :func:`dispatch_time`). The point-to-point latency is the median hand-off: the delay
    from a remote dependency's end to the start of the action that was waiting for it,
    counted only where that worker had nothing else to do (else the delay is its own work,
    not the message's). Simulating ``schedule`` with these costs gives a prediction whose
    remaining gap to the measurement is contention and noise.
    """
    durations, handoffs, gaps = _read(timelines, schedule)
    if dispatch is None:
        dispatch = statistics.median(gaps) if gaps else 0.0

    def mean(kind: str) -> list[float]:
        return [
            statistics.fmean(durations.get((kind, s), [0.0])) + dispatch
            if (kind, s) in durations
            else 0.0
            for s in range(schedule.num_stages)
        ]

    latency = statistics.median(handoffs) if handoffs else 0.0
    if schedule.split_stages:
        ig, wg = mean("I"), mean("W")
        bwd = [i + w for i, w in zip(ig, wg, strict=True)]
        return Costs.per_stage(mean("F"), bwd, ig, wg, comm_latency=latency)
    return Costs.per_stage(mean("F"), mean("B"), comm_latency=latency)


def dispatch_time(timelines: Sequence[Timeline], schedule: Schedule) -> float:
    """Return the runtime's own time between two actions of a worker whose inputs were there
    (the median such gap, see :func:`measured_costs`); 0 when no gap had its inputs ready."""
    gaps = _read(timelines, schedule)[2]
    return statistics.median(gaps) if gaps else 0.0


def _read(
    timelines: Sequence[Timeline], schedule: Schedule
) -> tuple[dict[tuple[str, int], list[float]], list[float], list[float]]:
    """(durations by (kind, stage), hand-offs, gaps with inputs ready) of measured timelines."""
    durations: dict[tuple[str, int], list[float]] = {}
    handoffs: list[float] = []
    gaps: list[float] = []  # between a worker's consecutive actions, inputs ready
    for tl in timelines:
        ends = {
            Action(e.stage, e.kind, e.microbatch): e.end  # type: ignore[arg-type]
            for e in tl.events
            if e.kind in ("F", "B", "I", "W")
        }
        for w in range(tl.num_workers):
            prev_end = -math.inf
            for e in tl.worker_events(w):
                if e.kind not in ("F", "B", "I", "W"):
                    continue
                durations.setdefault((e.kind, e.stage), []).append(e.duration)
                action = Action(e.stage, e.kind, e.microbatch)  # type: ignore[arg-type]
                remote = [
                    ends[d]
                    for d in dependencies(action, schedule)
                    if schedule.stage_worker[d.stage] != w and d in ends
                ]
                if remote and max(remote) >= prev_end:
                    handoffs.append(max(0.0, e.start - max(remote)))
                elif prev_end > -math.inf:
                    gaps.append(max(0.0, e.start - prev_end))
                prev_end = e.end
    return durations, handoffs, gaps
