"""Text and CSV forms of a schedule, so one can be written by hand or kept in a file.

Text::

    # schedule=1f1b microbatches=2 placement=0,1
    worker 0: 0F0 0F1 0B0 0B1
    worker 1: 1F0 1B0 1F1 1B1

CSV: one row per worker, one action per cell. Both parse back through :func:`validate`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from layerwise.schedules.ir import Action, Schedule, ScheduleError
from layerwise.schedules.validate import validate


def to_text(schedule: Schedule) -> str:
    """Return a text form: a header line, then ``worker N: 0F0 0F1 0B0 ...`` per worker."""
    header = (
        f"# schedule={schedule.name} microbatches={schedule.num_microbatches} "
        f"placement={','.join(map(str, schedule.stage_worker))}"
    )
    rows = [f"worker {w}: " + " ".join(map(str, acts)) for w, acts in enumerate(schedule.actions)]
    return "\n".join([header, *rows]) + "\n"


def _placement_of(rows: Sequence[Sequence[Action]]) -> list[int]:
    """Return the stage->worker map the rows imply: each stage on the worker that runs it."""
    owner: dict[int, int] = {}
    for w, row in enumerate(rows):
        for pos, a in enumerate(row):
            if owner.setdefault(a.stage, w) != w:
                raise ScheduleError.at(
                    w, pos, a, f"stage {a.stage} already appears on worker {owner[a.stage]}"
                )
    missing = sorted(set(range(max(owner) + 1)) - set(owner))
    if missing:
        raise ScheduleError(f"stages {missing} appear on no worker")
    return [owner[s] for s in range(len(owner))]


def _build(
    name: str, rows: Sequence[Sequence[Action]], m: int | None, placement: Sequence[int] | None
) -> Schedule:
    """Return the validated schedule of ``rows``; m and placement are inferred when None."""
    all_actions = [a for row in rows for a in row]
    if not all_actions:
        raise ScheduleError("schedule is empty")
    schedule = Schedule(
        name=name,
        num_microbatches=m if m is not None else max(a.microbatch for a in all_actions) + 1,
        stage_worker=tuple(placement if placement is not None else _placement_of(rows)),
        actions=tuple(tuple(row) for row in rows),
    )
    validate(schedule)
    return schedule


def _parse_row(items: Iterable[str], worker: int, lineno: int) -> list[Action]:
    """Return the actions of one worker's row; raise ScheduleError naming the line, the
    worker and the position of a token that is not an action."""
    row = []
    for i, tok in enumerate(t.strip() for t in items if t.strip()):
        try:
            row.append(Action.parse(tok))
        except ValueError as err:
            raise ScheduleError(f"line {lineno}: worker {worker}, position {i}: {err}") from None
    return row


def _whole_number(text: str, what: str, lineno: int) -> int:
    """Return ``text`` as an int; raise ScheduleError naming the line if it is not one."""
    try:
        return int(text)
    except ValueError:
        raise ScheduleError(f"line {lineno}: {what} must be a whole number, got {text!r}") from None


def _header(
    line: str, lineno: int, name: str, m: int | None, placement: list[int] | None
) -> tuple[str, int | None, list[int] | None]:
    """Return (name, micro-batches, placement) as the ``key=value`` fields of the ``#`` line
    set them; a comment without such fields changes nothing."""
    fields = dict(f.split("=", 1) for f in line[1:].split() if "=" in f)
    if "microbatches" in fields:
        m = _whole_number(fields["microbatches"], "microbatches", lineno)
    if "placement" in fields:
        placement = [
            _whole_number(x, "each placement entry", lineno) for x in fields["placement"].split(",")
        ]
    return fields.get("schedule", name), m, placement


def from_text(text: str) -> Schedule:
    """Parse :func:`to_text` output (or hand-written rows ``worker N: ...``) and validate it.
    Raises ScheduleError naming the line of anything that does not parse."""
    name, m, placement = "custom", None, None
    rows: dict[int, list[Action]] = {}
    first_line: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            name, m, placement = _header(line, lineno, name, m, placement)
            continue
        if not line:
            continue
        head, sep, body = line.partition(":")
        if not sep or not head.strip().lower().startswith("worker"):
            raise ScheduleError(f"line {lineno}: expected 'worker N: 0F0 0F1 ...', got {raw!r}")
        worker = _whole_number(head.strip()[len("worker") :].strip(), "the worker number", lineno)
        if worker in first_line:
            raise ScheduleError(
                f"line {lineno}: worker {worker} already has a row (line {first_line[worker]}); "
                f"give each worker one line"
            )
        first_line[worker] = lineno
        rows[worker] = _parse_row(body.split(), worker, lineno)
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
    """Parse :func:`to_csv` output (row w = worker w's actions) and validate it. Raises
    ScheduleError naming the line of a cell that is not an action."""
    reader = csv.reader(io.StringIO(text))
    rows: list[list[Action]] = []
    for r in reader:
        if any(cell.strip() for cell in r):
            rows.append(_parse_row(r, len(rows), reader.line_num))
    return _build(name, rows, None, None)
