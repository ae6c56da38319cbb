"""The one validator: what each action waits for, structure checks, a deadlock-free order.

The simulator and the runtime read the same :func:`dependencies`, so a schedule that passes
:func:`validate` runs the way it is predicted, whether it was generated, written by hand or
loaded from a file.
"""

from __future__ import annotations

from layerwise.schedules.ir import KINDS, Action, Kind, Schedule, ScheduleError


def dependencies(action: Action, schedule: Schedule) -> list[Action]:
    """Return the actions that must finish before ``action`` can start.

    F(s, m) needs F(s-1, m); B or I of (s, m) need F(s, m) and the input gradient of
    (s+1, m) (its B or I); W(s, m) needs I(s, m). A skip from stage a to stage b adds
    F(a, m) to F(b, m)'s needs and the input gradient of (b, m) to (a, m)'s backward. The
    adjacent dependency always comes first.
    """
    return [Action(*key) for key in dependency_keys(action, schedule)]


Key = tuple[int, Kind, int]  # an Action's fields: equal to it, and hashed alike


def dependency_keys(action: Action, schedule: Schedule) -> list[Key]:
    """:func:`dependencies` as plain tuples, which compare and hash as the Actions do.

    The validator and the simulator ask this once or more for every action of schedules of
    tens of thousands; plain tuples cost a fraction of making named ones."""
    s, kind, m = action
    deps: list[Key]
    if kind == "F":
        deps = [(s - 1, "F", m)] if s > 0 else []
        if schedule.skips:
            deps += [(a, "F", m) for a in schedule.skip_sources.get(s, ())]
        return deps
    if kind == "W":
        return [(s, "I", m)]
    deps = [(s, "F", m)]
    later = [s + 1] if s + 1 < schedule.num_stages else []
    if schedule.skips:
        later += schedule.skip_targets.get(s, ())
    split = schedule.split_stages
    for b in later:
        grad: Kind = "I" if b in split else "B"
        deps.append((b, grad, m))
    return deps


def _check_placement(schedule: Schedule) -> None:
    if schedule.num_stages == 0 or schedule.num_workers == 0:
        raise ScheduleError("schedule has no stages or no workers")
    if sorted(set(schedule.stage_worker)) != list(range(schedule.num_workers)):
        raise ScheduleError(
            f"every worker must hold at least one stage; stage->worker map is "
            f"{list(schedule.stage_worker)} for {schedule.num_workers} workers"
        )


def _index_actions(schedule: Schedule) -> dict[Action, tuple[int, int]]:
    """Return where each action sits, (worker, position), checking each one on the way."""
    num_stages, m = schedule.num_stages, schedule.num_microbatches
    seen: dict[Action, tuple[int, int]] = {}
    for w, acts in enumerate(schedule.actions):
        for pos, a in enumerate(acts):
            if not 0 <= a.stage < num_stages:
                raise ScheduleError.at(
                    w, pos, a, f"stage {a.stage} does not exist (stages 0..{num_stages - 1})"
                )
            if not 0 <= a.microbatch < m:
                raise ScheduleError.at(
                    w, pos, a, f"micro-batch {a.microbatch} does not exist (0..{m - 1})"
                )
            if schedule.stage_worker[a.stage] != w:
                raise ScheduleError.at(
                    w, pos, a, f"stage {a.stage} lives on worker {schedule.stage_worker[a.stage]}"
                )
            if a in seen:
                raise ScheduleError.at(
                    w, pos, a, f"{a.describe()} appears twice (also at position {seen[a][1]})"
                )
            seen[a] = (w, pos)
            if a.kind == "W" and Action(a.stage, "I", a.microbatch) not in seen:
                raise ScheduleError.at(
                    w, pos, a, "weight gradient W comes before its input gradient I"
                )
    return seen


def _check_complete(schedule: Schedule, seen: dict[Action, tuple[int, int]]) -> None:
    """Raise unless every stage runs F and (B, or I and W) once for every micro-batch."""
    m = schedule.num_microbatches
    for s in range(schedule.num_stages):
        w = schedule.stage_worker[s]
        end = len(schedule.actions[w])
        for mb in range(m):
            has = {k: Action(s, k, mb) in seen for k in KINDS}
            if not has["F"]:
                raise ScheduleError.at(w, end, None, f"{Action(s, 'F', mb).describe()} is missing")
            if has["B"] and (has["I"] or has["W"]):
                raise ScheduleError.at(
                    w,
                    seen[Action(s, "B", mb)][1],
                    Action(s, "B", mb),
                    "a micro-batch's backward is either one B or an I and a W, not both",
                )
            if not has["B"] and not (has["I"] and has["W"]):
                missing: Kind = "B" if not (has["I"] or has["W"]) else ("W" if has["I"] else "I")
                raise ScheduleError.at(
                    w, end, None, f"{Action(s, missing, mb).describe()} is missing"
                )
        split = {Action(s, "I", mb) in seen for mb in range(m)}
        if len(split) > 1:
            raise ScheduleError.at(
                w, 0, None, f"stage {s} mixes B and I/W backwards across micro-batches"
            )


def execution_order(schedule: Schedule) -> list[tuple[int, int]]:
    """Return (worker, position) pairs in an order that respects every dependency.

    Workers run their lists in order; sends do not block (the runtime posts them
    asynchronously) and a receive blocks until its data exists. Raises ScheduleError naming
    each stuck worker and what it waits for if the schedule deadlocks.
    """
    pos = [0] * schedule.num_workers
    done: set[Key] = set()
    waiting: dict[Key, list[int]] = {}
    stack = list(range(schedule.num_workers - 1, -1, -1))
    order: list[tuple[int, int]] = []
    while stack:
        w = stack.pop()
        acts = schedule.actions[w]
        while pos[w] < len(acts):
            a = acts[pos[w]]
            missing = next((d for d in dependency_keys(a, schedule) if d not in done), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(w)
                break
            done.add(a)
            order.append((w, pos[w]))
            pos[w] += 1
            stack.extend(waiting.pop(a, []))
    if len(order) < sum(len(a) for a in schedule.actions):
        raise _deadlock(schedule, pos, done)
    return order


def _deadlock(schedule: Schedule, pos: list[int], done: set[Key]) -> ScheduleError:
    """Return the error that names each stuck worker and the action it waits for."""
    where = {a: (w, i) for w, acts in enumerate(schedule.actions) for i, a in enumerate(acts)}
    lines = []
    for w, acts in enumerate(schedule.actions):
        if pos[w] < len(acts):
            a = acts[pos[w]]
            dep = next(d for d in dependencies(a, schedule) if d not in done)
            dw, dpos = where[dep]
            why = (
                "which comes later in its own list"
                if dw == w
                else f"which is stuck behind worker {dw}'s own wait"
            )
            lines.append(
                f"worker {w}, position {pos[w]} ({a}) waits for {dep} "
                f"({dep.describe()}, worker {dw} position {dpos}), {why}"
            )
    return ScheduleError("schedule deadlocks:\n  " + "\n  ".join(lines))


def validate(schedule: Schedule) -> None:
    """Check that ``schedule`` is complete, consistent and cannot deadlock; raise ScheduleError.

    Rules: each stage does F and B (or I and W) once per micro-batch, on the worker that
    holds it; F(s, m) after F(s-1, m); B(s, m) after B(s+1, m) and F(s, m); W after its I.
    """
    _check_placement(schedule)
    for a, b in schedule.skips:
        if not 0 <= a < b < schedule.num_stages:
            raise ScheduleError(
                f"skip ({a}, {b}) must go from a stage to a later one of the "
                f"{schedule.num_stages} stages"
            )
    _check_complete(schedule, _index_actions(schedule))
    _ = schedule.order


def stream_order_problems(schedule: Schedule) -> list[str]:
    """Where a stream of messages would not go in micro-batch order; empty if none.

    A stream is what one stage sends to a neighbour on another worker: its activations
    (sent by its F actions) or its input gradients (sent by its B or I actions). Transports
    that match messages by order rather than by tag (NCCL) need each stream to be sent and
    received in the same order; since the receiving stage consumes a stream with the same
    kind of action, micro-batch order on every stage is enough. Every built-in schedule
    has it; a hand-written one may not.
    """
    problems = []
    for s in range(schedule.num_stages):
        w = schedule.stage_worker[s]
        for kinds, what in ((("F",), "forwards"), (("B", "I"), "input-gradient backwards")):
            mbs = [a.microbatch for a in schedule.actions[w] if a.stage == s and a.kind in kinds]
            if mbs != sorted(mbs):
                problems.append(
                    f"stage {s} (worker {w}) runs its {what} in micro-batch order {mbs}"
                )
    return problems
