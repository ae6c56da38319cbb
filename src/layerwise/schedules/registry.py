"""One registry of schedules: what every tool needs to know about a schedule, declared once.

Each schedule is a :class:`ScheduleSpec` registered next to its generator (see
``generators.py`` and ``zero_bubble.py``): its name and aliases, how many stages a worker
holds and where they go, the sizes it needs and the error it gives otherwise, whether it
splits the backward, and how many activations a worker holds at peak. The command line, the
planner, the diagnosis and the training job read these entries instead of naming schedules,
so a new schedule is a generator plus one ``register(ScheduleSpec(...))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from layerwise.schedules.ir import Schedule, ScheduleError, size_problems
from layerwise.schedules.validate import validate

Placement = Literal["looped", "v"]
PLACEMENTS: tuple[Placement, ...] = ("looped", "v")
# (workers p, micro-batches m, stages per worker v, worker w) -> activations w holds at peak
PeakInflight = Callable[[int, int, int, int], int]


def stage_worker(placement: Placement, num_workers: int, chunks: int) -> tuple[int, ...]:
    """Return the stage -> worker map of ``placement`` for p workers holding v stages each.

    ``looped``: stage s on worker s mod p, so the stages go down the workers v times.
    ``v``: down the workers and back up, so with two chunks worker w holds stages w and
    2p-1-w: the first and the last stage share a worker (V-shape schedules); more chunks
    continue the zig-zag.
    """
    p = num_workers
    if placement == "looped":
        return tuple(s % p for s in range(p * chunks))
    return tuple(s % p if (s // p) % 2 == 0 else p - 1 - s % p for s in range(p * chunks))


@dataclass(frozen=True)
class Constraint:
    """A condition a schedule puts on (p workers, m micro-batches, v stages per worker), and
    the error message it gives when the condition fails."""

    rule: str  # the condition in short, for help text: "m % p == 0"
    holds: Callable[[int, int, int], bool]
    message: Callable[[int, int, int], str]  # says what is wrong and which sizes would do

    def problem(self, p: int, m: int, v: int) -> str | None:
        """Return the error message if (p, m, v) breaks the condition, else None."""
        return None if self.holds(p, m, v) else self.message(p, m, v)

    def check(self, p: int, m: int, v: int) -> None:
        """Raise ValueError with the message if (p, m, v) breaks the condition."""
        problem = self.problem(p, m, v)
        if problem is not None:
            raise ValueError(problem)


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything the tools need to know about one schedule."""

    name: str  # lower case, words joined by '-'
    generator: Callable[..., Schedule]  # (p, m) with one stage per worker, else (p, m, v)
    description: str  # one line: what it does and what it costs
    peak_inflight: PeakInflight  # as Timeline.peak_inflight counts: (stage, micro-batch) sets
    aliases: tuple[str, ...] = ()
    chunks_default: int = 1  # stages per worker when none is asked for
    chunks_allowed: tuple[int, int | None] = (1, 1)  # (least, most); None: no upper bound
    placement: Placement = "looped"
    constraints: tuple[Constraint, ...] = ()
    split_backward: bool = False  # runs each backward as I then W
    reference: bool = False  # a point of comparison, never offered as an alternative
    interleaves: str | None = None  # the one-stage schedule this one runs with v stages

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"schedule {self.name!r}: placement must be one of {PLACEMENTS}, "
                f"not {self.placement!r}"
            )
        if not self.allows_chunks(self.chunks_default):
            raise ValueError(
                f"schedule {self.name!r}: default chunks {self.chunks_default} is not among "
                f"the allowed {self.allowed_chunks()}"
            )

    @property
    def multi_chunk(self) -> bool:
        """Whether a worker may hold more than one stage (the generator then takes v)."""
        least, most = self.chunks_allowed
        return most is None or most > 1 or least > 1

    def allows_chunks(self, chunks: int) -> bool:
        """Return whether a worker may hold ``chunks`` stages."""
        least, most = self.chunks_allowed
        return chunks >= least and (most is None or chunks <= most)

    def allowed_chunks(self) -> str:
        """Return the allowed stages per worker in words: '1', '>= 1', '2..4'."""
        least, most = self.chunks_allowed
        if most is None:
            return f">= {least}"
        return str(least) if least == most else f"{least}..{most}"

    def chunks_problem(self, chunks: int) -> str | None:
        """Return the error for a worker holding ``chunks`` stages, or None if allowed."""
        if self.allows_chunks(chunks):
            return None
        allowed = self.allowed_chunks()
        stages = "one stage" if allowed == "1" else f"{allowed} stages"
        return (
            f"schedule {self.name!r} runs {stages} per worker; "
            f"chunks must be {allowed}, got {chunks}"
        )

    def stage_worker(self, num_workers: int, chunks: int) -> tuple[int, ...]:
        """Return the stage -> worker map this schedule's generator must produce."""
        return stage_worker(self.placement, num_workers, chunks)

    def problems(self, num_workers: int, num_microbatches: int, chunks: int) -> list[str]:
        """Return why this schedule cannot be built with these sizes; empty if it can."""
        p, m, v = num_workers, num_microbatches, chunks
        found = size_problems(p, m, v)
        if found:
            return found
        chunks_problem = self.chunks_problem(v)
        if chunks_problem is not None:
            return [chunks_problem]
        return [msg for c in self.constraints if (msg := c.problem(p, m, v)) is not None]

    def build(self, num_workers: int, num_microbatches: int, chunks: int) -> Schedule:
        """Return the generator's schedule as it comes, neither checked nor validated."""
        if self.multi_chunk:
            return self.generator(num_workers, num_microbatches, chunks)
        return self.generator(num_workers, num_microbatches)

    def max_inflight(self, num_workers: int, num_microbatches: int, chunks: int) -> int:
        """Return the most activations any worker holds at once."""
        p, m, v = num_workers, num_microbatches, chunks
        return max(self.peak_inflight(p, m, v, w) for w in range(p))


_SPECS: dict[str, ScheduleSpec] = {}
_ALIASES: dict[str, str] = {}  # alias -> name


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _resolve(name: str) -> str | None:
    key = _key(name)
    key = _ALIASES.get(key, key)
    return key if key in _SPECS else None


def register(spec: ScheduleSpec) -> ScheduleSpec:
    """Add ``spec`` to the registry and return it; raise ValueError if its name or one of
    its aliases is already taken."""
    if spec.name != _key(spec.name):
        raise ValueError(f"schedule name {spec.name!r} must be written {_key(spec.name)!r}")
    taken = [n for n in (spec.name, *map(_key, spec.aliases)) if _resolve(n) is not None]
    if taken:
        owners = ", ".join(f"{n!r} (schedule {_resolve(n)!r})" for n in taken)
        raise ValueError(
            f"cannot register schedule {spec.name!r}: {owners} already registered; "
            f"pick another name or unregister the other first"
        )
    _SPECS[spec.name] = spec
    _ALIASES.update({_key(a): spec.name for a in spec.aliases})
    return spec


def unregister(name: str) -> ScheduleSpec:
    """Remove the schedule ``name`` (and its aliases) and return its entry."""
    spec = get(name)
    del _SPECS[spec.name]
    for alias in spec.aliases:
        _ALIASES.pop(_key(alias), None)
    return spec


def get(name: str) -> ScheduleSpec:
    """Return the entry of ``name``, an alias, or either with '_' for '-'; raise ValueError
    listing the known names if there is none."""
    key = _resolve(name)
    if key is None:
        aliases = ", ".join(f"{a} = {n}" for a, n in _ALIASES.items())
        raise ValueError(
            f"unknown schedule {name!r}; choose one of {', '.join(names())}"
            + (f" (aliases: {aliases})" if aliases else "")
        )
    return _SPECS[key]


def names() -> tuple[str, ...]:
    """Return the registered names, in the order they were registered."""
    return tuple(_SPECS)


def specs() -> tuple[ScheduleSpec, ...]:
    """Return the registered entries, in the order they were registered."""
    return tuple(_SPECS.values())


def generators() -> dict[str, Callable[..., Schedule]]:
    """Return each registered name's generator (unchecked; :func:`generate` validates)."""
    return {s.name: s.generator for s in _SPECS.values()}


def chunks_for(name: str, chunks: int | None) -> int:
    """Return the stages per worker to use: ``chunks``, or the schedule's default if None;
    raise ValueError naming the allowed values if the schedule does not allow ``chunks``."""
    spec = get(name)
    if chunks is None:
        return spec.chunks_default
    problem = spec.chunks_problem(chunks)
    if problem is not None:
        raise ValueError(problem)
    return chunks


def problems(
    name: str, num_workers: int, num_microbatches: int, chunks: int | None = None
) -> list[str]:
    """Return why ``name`` cannot be built with these sizes (chunks None: its default)."""
    spec = get(name)
    v = spec.chunks_default if chunks is None else chunks
    return spec.problems(num_workers, num_microbatches, v)


def generate(
    name: str, num_workers: int, num_microbatches: int, chunks: int | None = None
) -> Schedule:
    """Build and validate the named schedule; ``chunks`` (stages per worker) None means the
    schedule's default. Raises ValueError with the schedule's own message when the sizes do
    not suit it, and ScheduleError if the generator breaks its registry entry."""
    spec = get(name)
    v = chunks_for(spec.name, chunks)
    found = spec.problems(num_workers, num_microbatches, v)
    if found:
        raise ValueError("; ".join(found))
    schedule = spec.build(num_workers, num_microbatches, v)
    _check_declared(spec, schedule, num_workers, v)
    validate(schedule)
    return schedule


def _check_declared(spec: ScheduleSpec, schedule: Schedule, num_workers: int, v: int) -> None:
    """Raise ScheduleError if the generator's schedule contradicts its registry entry: the
    planner and the runtime trust the placement and split the entry declares."""
    expected = spec.stage_worker(num_workers, v)
    if schedule.stage_worker != expected:
        raise ScheduleError(
            f"the {spec.name} generator put stages on workers {list(schedule.stage_worker)}, "
            f"but its registry entry declares the {spec.placement} placement {list(expected)}; "
            f"make the two agree"
        )
    if bool(schedule.split_stages) != spec.split_backward:
        raise ScheduleError(
            f"the {spec.name} generator {'splits' if schedule.split_stages else 'keeps'} the "
            f"backward, but its registry entry says split_backward={spec.split_backward}"
        )


def alternatives(stage_worker: Sequence[int], num_microbatches: int) -> list[str]:
    """Return the registered schedules, references left out, that can run a step on these
    stages: their placement gives the same stage -> worker map and their sizes suit them.

    A schedule that interleaves another is left out with one stage per worker, where the
    schedule it interleaves is offered instead (as the planner maps vpp = 1)."""
    p = max(stage_worker) + 1
    v = len(stage_worker) // p
    return [
        s.name
        for s in _SPECS.values()
        if not s.reference
        and not (s.interleaves and v == 1)
        and s.allows_chunks(v)
        and s.stage_worker(p, v) == tuple(stage_worker)
        and not s.problems(p, num_microbatches, v)
    ]


def interleaved_form(name: str) -> str | None:
    """Return the registered schedule that runs ``name`` with several stages per worker
    (interleaved-1f1b for 1f1b), or None if there is none or ``name`` is unknown."""
    base = _resolve(name)
    return next((s.name for s in _SPECS.values() if base and s.interleaves == base), None)
