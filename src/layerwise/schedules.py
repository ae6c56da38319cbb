"""Pipeline schedules as data: actions, generators, one validator, text and CSV round-trip.

A schedule says, for every worker, the ordered list of work it does in one training step.
Each item is an :class:`Action`: a stage, a kind and a micro-batch, printed ``0F3`` (stage 0,
forward, micro-batch 3). Kinds:

- ``F``: forward of one micro-batch through one stage;
- ``B``: its full backward;
- ``I`` / ``W``: the backward split in two, input gradient first (what the previous stage
  waits for) and weight gradient later (which nobody waits for). Zero-bubble schedules use
  the freedom to place ``W`` in what would otherwise be idle time.

Generators are pure functions; the simulator and the runtime read the result and nothing
else, so a schedule written by hand or loaded from a file runs exactly like a built-in one.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Kind = Literal["F", "B", "I", "W"]
KINDS: tuple[Kind, ...] = ("F", "B", "I", "W")
KIND_NAMES = {"F": "forward", "B": "backward", "I": "input-gradient", "W": "weight-gradient"}
_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")


class ScheduleError(ValueError):
    """A schedule that cannot run: names the worker, the position and the rule broken."""


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work: ``kind`` of micro-batch ``microbatch`` through stage ``stage``."""

    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    def describe(self) -> str:
        """Return a human phrase, e.g. 'forward of micro-batch 3 on stage 0'."""
        return f"{KIND_NAMES[self.kind]} of micro-batch {self.microbatch} on stage {self.stage}"

    @staticmethod
    def parse(text: str) -> Action:
        """Parse ``'0F3'`` back into an Action; raise ValueError on anything else."""
        match = _ACTION_RE.match(text)
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><F|B|I|W><microbatch>, e.g. '0F3'"
            )
        kind: Kind = match.group(2)  # type: ignore[assignment]
        return Action(int(match.group(1)), kind, int(match.group(3)))


@dataclass(frozen=True)
class Schedule:
    """Per-worker ordered action lists, plus which worker holds which stage."""

    name: str
    num_microbatches: int
    stage_worker: tuple[int, ...]  # stage index -> worker index
    actions: tuple[tuple[Action, ...], ...]  # worker index -> its actions in order

    @property
    def num_workers(self) -> int:
        return len(self.actions)

    @property
    def num_stages(self) -> int:
        return len(self.stage_worker)

    @property
    def chunks(self) -> int:
        """Stages per worker (1 for plain pipelines, v for interleaved)."""
        return self.num_stages // self.num_workers

    def stages_of(self, worker: int) -> list[int]:
        """Return the stages that live on ``worker``, in increasing order."""
        return [s for s, w in enumerate(self.stage_worker) if w == worker]

    @cached_property
    def split_stages(self) -> frozenset[int]:
        """Return the stages whose backward runs as I then W rather than one B."""
        return frozenset(a.stage for acts in self.actions for a in acts if a.kind == "I")

    @cached_property
    def order(self) -> tuple[tuple[int, int], ...]:
        """A dependency-respecting order of (worker, position); computed once, shared by the
        validator and the simulator. Raises ScheduleError if the schedule deadlocks."""
        return tuple(execution_order(self))

    def splits_backward(self, stage: int) -> bool:
        """Return True if ``stage`` runs its backward as I then W rather than one B."""
        return stage in self.split_stages

    def __str__(self) -> str:
        return to_text(self)


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def _check_sizes(num_workers: int, num_microbatches: int, chunks: int = 1) -> None:
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if chunks < 1:
        raise ValueError(f"chunks (stages per worker) must be >= 1, got {chunks}")


def _plain(
    name: str, num_workers: int, num_microbatches: int, lists: list[list[Action]]
) -> Schedule:
    return Schedule(
        name=name,
        num_microbatches=num_microbatches,
        stage_worker=tuple(range(num_workers)),
        actions=tuple(tuple(a) for a in lists),
    )


def naive(num_workers: int, num_microbatches: int = 1) -> Schedule:
    """The plain layer-wise flow: each micro-batch goes forward through every worker and back
    before the next one starts, so only one worker computes at any moment::

        w0  F0 .. .. .. .. .. B0 F1 ...
        w1  .. F0 .. .. .. B0 .. ..
        w2  .. .. F0 .. B0 .. .. ..
        w3  .. .. .. F0B0 .. .. ..
    """
    _check_sizes(num_workers, num_microbatches)
    lists = [
        [Action(w, k, m) for m in range(num_microbatches) for k in ("F", "B")]
        for w in range(num_workers)
    ]
    return _plain("naive", num_workers, num_microbatches, lists)


def gpipe(num_workers: int, num_microbatches: int) -> Schedule:
    """GPipe (Huang et al. 2019): all forwards, then all backwards. Holds m activations::

    w0  F0 F1 F2 F3 .. .. .. .. .. .. B0 B1 B2 B3
    w1  .. F0 F1 F2 F3 .. .. .. .. B0 B1 B2 B3 ..
    """
    _check_sizes(num_workers, num_microbatches)
    lists = [
        [Action(w, "F", m) for m in range(num_microbatches)]
        + [Action(w, "B", m) for m in range(num_microbatches)]
        for w in range(num_workers)
    ]
    return _plain("gpipe", num_workers, num_microbatches, lists)


def one_f_one_b(num_workers: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush, Narayanan et al. 2021), in three phases per worker w:

    - warm-up: ``p - w - 1`` forwards, so the last worker starts backward at once;
    - steady state: one forward, one backward, repeated;
    - cool-down: the remaining backwards.

    Worker w never holds more than ``min(p - w, m)`` activations. Any m >= 1 works: with
    m < p the warm-up is simply shorter.
    """
    _check_sizes(num_workers, num_microbatches)
    p, m = num_workers, num_microbatches
    lists: list[list[Action]] = []
    for w in range(p):
        warmup = min(p - w - 1, m)
        acts = [Action(w, "F", i) for i in range(warmup)]
        for i in range(m - warmup):
            acts += [Action(w, "F", warmup + i), Action(w, "B", i)]
        acts += [Action(w, "B", i) for i in range(m - warmup, m)]
        lists.append(acts)
    return _plain("1f1b", p, m, lists)


def interleaved_1f1b(num_workers: int, num_microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Sec. 2.2): each worker holds ``chunks``
    stages placed round-robin (stage s on worker s mod p), which divides the bubble by
    ``chunks`` at the price of ``chunks`` times more point-to-point traffic.

    Micro-batches go through a worker's chunks in groups of p; m must be a multiple of p.
    """
    _check_sizes(num_workers, num_microbatches, chunks)
    p, m, v = num_workers, num_microbatches, chunks
    if m % p != 0:
        raise ValueError(
            f"interleaved-1f1b needs the number of micro-batches to be a multiple of the number "
            f"of workers (got m={m}, p={p}); try m={max(p, (m // p) * p)} or m={(m // p + 1) * p}"
        )
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        # The k-th forward (or backward) of a worker: which chunk, which micro-batch.
        chunk = (k // p) % v
        if backward:
            chunk = v - 1 - chunk
        return chunk, (k // (p * v)) * p + k % p

    lists: list[list[Action]] = []
    for w in range(p):
        warmup = min((p - w - 1) * 2 + (v - 1) * p, total)
        fwd = [unit(k, False) for k in range(total)]
        bwd = [unit(k, True) for k in range(total)]
        acts = [Action(c * p + w, "F", mb) for c, mb in fwd[:warmup]]
        for k in range(total - warmup):
            c, mb = fwd[warmup + k]
            acts.append(Action(c * p + w, "F", mb))
            c, mb = bwd[k]
            acts.append(Action(c * p + w, "B", mb))
        acts += [Action(c * p + w, "B", mb) for c, mb in bwd[total - warmup :]]
        lists.append(acts)
    return Schedule(
        name="interleaved-1f1b",
        num_microbatches=m,
        stage_worker=tuple(s % p for s in range(p * v)),
        actions=tuple(tuple(a) for a in lists),
    )


def zb_h1(num_workers: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward
    split into I (input gradient, on the critical path) and W (weight gradient, deferrable).

    The order is built by list scheduling on unit costs (F = I = W = 1): a free worker runs a
    ready F while fewer than ``p - w`` of its micro-batches await their I (1F1B's warm-up)
    and fewer than ``p`` await their W (1F1B's peak memory, as in the paper); else a ready I;
    else its oldest pending W. Later workers thus defer their W into the cool-down that 1F1B
    leaves idle, which cuts the bubble to about a third of 1F1B's when F = I = W. (Trying I
    before F leaves the first worker idle in the cool-down: its last forward then leaves too
    late for the gradients to come back in time.)
    """
    _check_sizes(num_workers, num_microbatches)
    p, m = num_workers, num_microbatches
    done: dict[tuple[int, str, int], int] = {}  # (stage, kind, mb) -> finish time
    lists: list[list[Action]] = [[] for _ in range(p)]
    next_f = [0] * p
    next_i = [0] * p
    pending_w: list[list[int]] = [[] for _ in range(p)]
    free_at = [0] * p
    remaining = 3 * p * m
    t = 0
    while remaining:
        for w in range(p):
            if free_at[w] > t:
                continue
            choice: Action | None = None
            i = next_i[w]
            if (
                next_f[w] < m
                and next_f[w] - next_i[w] < p - w
                and next_f[w] - (next_i[w] - len(pending_w[w])) < p
                and (w == 0 or done.get((w - 1, "F", next_f[w]), t + 1) <= t)
            ):
                choice = Action(w, "F", next_f[w])
                next_f[w] += 1
            elif i < next_f[w] and (w == p - 1 or done.get((w + 1, "I", i), t + 1) <= t):
                choice = Action(w, "I", i)
                next_i[w] += 1
                pending_w[w].append(i)
            elif pending_w[w]:
                choice = Action(w, "W", pending_w[w].pop(0))
            if choice is not None:
                lists[w].append(choice)
                done[(choice.stage, choice.kind, choice.microbatch)] = t + 1
                free_at[w] = t + 1
                remaining -= 1
        t += 1
    return _plain("zb-h1", p, m, lists)


GENERATORS: dict[str, Callable[..., Schedule]] = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(GENERATORS)


def generate(name: str, num_workers: int, num_microbatches: int, chunks: int = 1) -> Schedule:
    """Build the named schedule; ``chunks`` (stages per worker) only for interleaved ones."""
    key = name.lower().replace("_", "-")
    key = {"interleaved": "interleaved-1f1b", "zb": "zb-h1", "zbh1": "zb-h1"}.get(key, key)
    if key not in GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if key == "interleaved-1f1b":
        schedule = interleaved_1f1b(num_workers, num_microbatches, chunks)
    else:
        if chunks != 1:
            raise ValueError(f"schedule {key!r} has one stage per worker; chunks must be 1")
        schedule = GENERATORS[key](num_workers, num_microbatches)
    validate(schedule)
    return schedule


# ---------------------------------------------------------------------------------------------
# Dependencies and validation
# ---------------------------------------------------------------------------------------------


def dependencies(action: Action, schedule: Schedule) -> list[Action]:
    """Return the actions that must finish before ``action`` can start.

    F(s, m) needs F(s-1, m); B or I of (s, m) need F(s, m) and the input gradient of
    (s+1, m) (its B or I); W(s, m) needs I(s, m).
    """
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return [Action(s - 1, "F", m)] if s > 0 else []
    if action.kind == "W":
        return [Action(s, "I", m)]
    deps = [Action(s, "F", m)]
    if s + 1 < schedule.num_stages:
        grad_kind: Kind = "I" if schedule.splits_backward(s + 1) else "B"
        deps.append(Action(s + 1, grad_kind, m))
    return deps


def _fail(worker: int, position: int, action: Action | None, rule: str) -> ScheduleError:
    where = f"worker {worker}, position {position}"
    if action is not None:
        where += f" ({action})"
    return ScheduleError(f"{where}: {rule}")


def _check_structure(schedule: Schedule) -> None:
    num_stages, m = schedule.num_stages, schedule.num_microbatches
    if num_stages == 0 or schedule.num_workers == 0:
        raise ScheduleError("schedule has no stages or no workers")
    if sorted(set(schedule.stage_worker)) != list(range(schedule.num_workers)):
        raise ScheduleError(
            f"every worker must hold at least one stage; stage->worker map is "
            f"{list(schedule.stage_worker)} for {schedule.num_workers} workers"
        )
    seen: dict[Action, tuple[int, int]] = {}
    for w, acts in enumerate(schedule.actions):
        for pos, a in enumerate(acts):
            if not 0 <= a.stage < num_stages:
                raise _fail(
                    w, pos, a, f"stage {a.stage} does not exist (stages 0..{num_stages - 1})"
                )
            if not 0 <= a.microbatch < m:
                raise _fail(w, pos, a, f"micro-batch {a.microbatch} does not exist (0..{m - 1})")
            if schedule.stage_worker[a.stage] != w:
                raise _fail(
                    w, pos, a, f"stage {a.stage} lives on worker {schedule.stage_worker[a.stage]}"
                )
            if a in seen:
                raise _fail(
                    w, pos, a, f"{a.describe()} appears twice (also at position {seen[a][1]})"
                )
            seen[a] = (w, pos)
            if a.kind == "W" and Action(a.stage, "I", a.microbatch) not in seen:
                raise _fail(w, pos, a, "weight gradient W comes before its input gradient I")
    for s in range(num_stages):
        w = schedule.stage_worker[s]
        for mb in range(m):
            has = {k: Action(s, k, mb) in seen for k in KINDS}
            if not has["F"]:
                raise _fail(
                    w, len(schedule.actions[w]), None, f"{Action(s, 'F', mb).describe()} is missing"
                )
            if has["B"] and (has["I"] or has["W"]):
                raise _fail(
                    w,
                    seen[Action(s, "B", mb)][1],
                    Action(s, "B", mb),
                    "a micro-batch's backward is either one B or an I and a W, not both",
                )
            if not has["B"] and not (has["I"] and has["W"]):
                missing: Kind = "B" if not (has["I"] or has["W"]) else ("W" if has["I"] else "I")
                raise _fail(
                    w,
                    len(schedule.actions[w]),
                    None,
                    f"{Action(s, missing, mb).describe()} is missing",
                )
        split = {Action(s, "I", mb) in seen for mb in range(m)}
        if len(split) > 1:
            raise _fail(w, 0, None, f"stage {s} mixes B and I/W backwards across micro-batches")


def execution_order(schedule: Schedule) -> list[tuple[int, int]]:
    """Return (worker, position) pairs in an order that respects every dependency.

    Workers run their lists in order; sends do not block (the runtime posts them
    asynchronously) and a receive blocks until its data exists. Raises ScheduleError naming
    each stuck worker and what it waits for if the schedule deadlocks.
    """
    pos = [0] * schedule.num_workers
    done: set[Action] = set()
    waiting: dict[Action, list[int]] = {}
    stack = list(range(schedule.num_workers - 1, -1, -1))
    order: list[tuple[int, int]] = []
    while stack:
        w = stack.pop()
        acts = schedule.actions[w]
        while pos[w] < len(acts):
            a = acts[pos[w]]
            missing = next((d for d in dependencies(a, schedule) if d not in done), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(w)
                break
            done.add(a)
            order.append((w, pos[w]))
            pos[w] += 1
            stack.extend(waiting.pop(a, []))
    if len(order) < sum(len(a) for a in schedule.actions):
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
        raise ScheduleError("schedule deadlocks:\n  " + "\n  ".join(lines))
    return order


def validate(schedule: Schedule) -> None:
    """Check that ``schedule`` is complete, consistent and cannot deadlock; raise ScheduleError.

    Rules: each stage does F and B (or I and W) once per micro-batch, on the worker that
    holds it; F(s, m) after F(s-1, m); B(s, m) after B(s+1, m) and F(s, m); W after its I.
    """
    _check_structure(schedule)
    _ = schedule.order


def sequential(like: Schedule) -> Schedule:
    """One micro-batch through ``like``'s stages, on the same workers, one action at a time.

    Forwards in stage order, then backwards in reverse (I where ``like`` splits the
    backward), then the deferred weight gradients (W). Nothing overlaps and every hand-off
    happens while its receiver has nothing else to do, so a measured run of it shows each
    stage's own costs and the plain cost of a message (see ``Pipeline.calibrate``)."""
    split = like.split_stages
    rows: list[list[Action]] = [[] for _ in range(like.num_workers)]
    order = list(range(like.num_stages))
    for s in order:
        rows[like.stage_worker[s]].append(Action(s, "F", 0))
    for s in reversed(order):
        rows[like.stage_worker[s]].append(Action(s, "I" if s in split else "B", 0))
    for s in reversed(order):
        if s in split:
            rows[like.stage_worker[s]].append(Action(s, "W", 0))
    return _build("sequential", rows, 1, like.stage_worker)


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


# ---------------------------------------------------------------------------------------------
# Text and CSV
# ---------------------------------------------------------------------------------------------


def to_text(schedule: Schedule) -> str:
    """Return a text form: a header line, then ``worker N: 0F0 0F1 0B0 ...`` per worker."""
    header = (
        f"# schedule={schedule.name} microbatches={schedule.num_microbatches} "
        f"placement={','.join(map(str, schedule.stage_worker))}"
    )
    rows = [f"worker {w}: " + " ".join(map(str, acts)) for w, acts in enumerate(schedule.actions)]
    return "\n".join([header, *rows]) + "\n"


def _build(
    name: str, rows: Sequence[Sequence[Action]], m: int | None, placement: Sequence[int] | None
) -> Schedule:
    all_actions = [a for row in rows for a in row]
    if not all_actions:
        raise ScheduleError("schedule is empty")
    if placement is None:
        owner: dict[int, int] = {}
        for w, row in enumerate(rows):
            for pos, a in enumerate(row):
                if owner.setdefault(a.stage, w) != w:
                    raise _fail(
                        w, pos, a, f"stage {a.stage} already appears on worker {owner[a.stage]}"
                    )
        missing = sorted(set(range(max(owner) + 1)) - set(owner))
        if missing:
            raise ScheduleError(f"stages {missing} appear on no worker")
        placement = [owner[s] for s in range(len(owner))]
    schedule = Schedule(
        name=name,
        num_microbatches=m if m is not None else max(a.microbatch for a in all_actions) + 1,
        stage_worker=tuple(placement),
        actions=tuple(tuple(row) for row in rows),
    )
    validate(schedule)
    return schedule


def _parse_row(items: Iterable[str], worker: int) -> list[Action]:
    row = []
    for i, tok in enumerate(t for t in items if t.strip()):
        try:
            row.append(Action.parse(tok))
        except ValueError as err:
            raise ScheduleError(f"worker {worker}, position {i}: {err}") from None
    return row


def from_text(text: str) -> Schedule:
    """Parse :func:`to_text` output (or hand-written rows ``worker N: ...``) and validate it."""
    name, m, placement = "custom", None, None
    rows: dict[int, list[Action]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            fields = dict(f.split("=", 1) for f in line[1:].split() if "=" in f)
            name = fields.get("schedule", name)
            m = int(fields["microbatches"]) if "microbatches" in fields else m
            if "placement" in fields:
                placement = [int(x) for x in fields["placement"].split(",")]
            continue
        if not line:
            continue
        head, sep, body = line.partition(":")
        if not sep or not head.strip().lower().startswith("worker"):
            raise ScheduleError(f"line {lineno}: expected 'worker N: 0F0 0F1 ...', got {raw!r}")
        worker = int(head.split()[-1])
        rows[worker] = _parse_row(body.split(), worker)
    if sorted(rows) != list(range(len(rows))):
        raise ScheduleError(f"workers must be numbered 0..N-1, got {sorted(rows)}")
    return _build(name, [rows[w] for w in range(len(rows))], m, placement)


def to_csv(schedule: Schedule) -> str:
    """Return a CSV form: one row per worker, one action per cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for acts in schedule.actions:
        writer.writerow([str(a) for a in acts])
    return out.getvalue()


def from_csv(text: str, name: str = "custom") -> Schedule:
    """Parse :func:`to_csv` output (row w = worker w's actions) and validate it."""
    rows = [_parse_row(r, w) for w, r in enumerate(csv.reader(io.StringIO(text))) if any(r)]
    return _build(name, rows, None, None)
