"""Simulation of a schedule whose workers share fewer cores than there are of them.

:func:`layerwise.simulate.simulate` gives every worker a core of its own. When a job starts
more worker processes than the machine has cores (eight CPU workers on a laptop), an action's
time depends on how many processes want a core while it runs: a worker waiting for a message
hands its core to the others, so a pipeline's bubbles make the busy workers faster. This
simulator shares the cores among the runnable processes, as the operating system does
(processor sharing): with ``r`` processes runnable on ``cores`` cores, each progresses at
``min(1, cores / r)`` of its speed alone.

Costs are given as seconds *under full load* (what an action takes while all ``processes``
are runnable, which is what a probe of the loaded machine measures), so the loss of speed to
switching and shared caches is in them; an action with fewer processes runnable runs faster
by its larger share of a core. One pipeline is simulated; each of its workers
stands for ``copies`` processes running the same actions at the same times (its data-parallel
replicas and tensor-parallel peers), which count ``copies`` times toward ``r``.

Processor sharing holds for processes that compute alone. Tensor-parallel peers do not: each
all-reduce waits until all of a group's members hold a core, so a group of 4 on 2 cores runs
only 1.4-1.6x faster with the other processes idle, where sharing says 2x (measured, 8 processes
on 2 cores). ``speeds`` then gives the measured speed for a number of runnable processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from layerwise.schedules import Schedule, dependency_keys
from layerwise.simulate import Costs, inputs_at
from layerwise.timeline import Event, Timeline

_DONE = 1e-12  # remaining work below this is finished (floating-point dust)


def simulate_shared(
    schedule: Schedule, costs: Costs, cores: int, copies: int = 1,
    speeds: Mapping[int, float] | None = None,
) -> Timeline:  # fmt: skip
    """Predict one step of ``schedule`` whose ``num_workers * copies`` processes share
    ``cores`` cores; ``costs`` are the actions' seconds with all of those processes runnable.
    ``speeds`` maps a number of runnable processes to how much faster each runs than with all
    of them runnable (measured); a number it lacks gets processor sharing's speed.

    Raises ValueError for bad sizes or costs, and ScheduleError if the schedule deadlocks.
    """
    if costs.num_stages != schedule.num_stages:
        raise ValueError(
            f"costs describe {costs.num_stages} stages but the schedule has {schedule.num_stages}"
        )
    if cores < 1 or copies < 1:
        raise ValueError(f"cores ({cores}) and copies ({copies}) must be at least 1")
    if speeds and min(speeds.values()) <= 0:
        raise ValueError(f"speeds must be positive, got {dict(speeds)}")
    schedule.order  # noqa: B018 -- raises ScheduleError on a deadlocking schedule
    workers = schedule.num_workers
    processes = workers * copies
    pos = [0] * workers
    left = [costs.duration(a[0]) if a else 0.0 for a in schedule.actions]
    ready: list[float | None] = [None] * workers  # when the current action's inputs are there
    started: list[float | None] = [None] * workers
    finish: dict[tuple[int, str, int], float] = {}
    events: list[Event] = []
    now = 0.0
    while True:
        for w in range(workers):
            if ready[w] is None and pos[w] < len(schedule.actions[w]):
                action = schedule.actions[w][pos[w]]
                if all(d in finish for d in dependency_keys(action, schedule)):
                    ready[w] = inputs_at(action, schedule, costs, finish)
        active = [w for w in range(workers) if pos[w] < len(schedule.actions[w])]
        if not active:
            break
        runnable = [w for w in active if (r := ready[w]) is not None and r <= now]
        # a process's share of a core now, over its share with all of them runnable
        busy = len(runnable) * copies
        speed = min(1.0, cores / max(1, busy)) / min(1.0, cores / processes)
        if speeds and busy in speeds:
            speed = speeds[busy]
        step = math.inf
        for w in runnable:
            step = min(step, left[w] / speed)
        for w in active:
            r = ready[w]
            if r is not None and r > now:
                step = min(step, r - now)
        if step == math.inf:  # unreachable for a schedule that has an order
            raise RuntimeError("no worker can make progress")
        for w in runnable:
            if started[w] is None:
                started[w] = now
            left[w] -= step * speed
        now += step
        for w in runnable:
            if left[w] <= _DONE:
                action = schedule.actions[w][pos[w]]
                finish[action] = now
                start = started[w]
                assert start is not None
                events.append(Event(w, start, now, action.kind, action.stage, action.microbatch))
                pos[w] += 1
                ready[w] = started[w] = None
                if pos[w] < len(schedule.actions[w]):
                    left[w] = costs.duration(schedule.actions[w][pos[w]])
    return Timeline(
        num_workers=workers,
        events=sorted(events, key=lambda e: (e.start, e.worker)),
        source="simulated",
        meta={
            "schedule": schedule.name,
            "microbatches": schedule.num_microbatches,
            "stages": schedule.num_stages,
            "cores": cores,
            "processes": processes,
        },
    )
