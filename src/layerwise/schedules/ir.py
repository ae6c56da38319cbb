"""The schedule IR: kinds of work, one action, a whole schedule, and the error they raise.

A schedule says, for every worker, the ordered list of work it does in one training step.
Each item is an :class:`Action`: a stage, a kind and a micro-batch, printed ``0F3`` (stage 0,
forward, micro-batch 3). Kinds:

- ``F``: forward of one micro-batch through one stage;
- ``B``: its full backward;
- ``I`` / ``W``: the backward split in two, input gradient first (what the previous stage
  waits for) and weight gradient later (which nobody waits for). Zero-bubble schedules use
  the freedom to place ``W`` in what would otherwise be idle time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

Kind = Literal["F", "B", "I", "W"]
KINDS: tuple[Kind, ...] = ("F", "B", "I", "W")
KIND_NAMES = {"F": "forward", "B": "backward", "I": "input-gradient", "W": "weight-gradient"}
_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")


class ScheduleError(ValueError):
    """A schedule that cannot run: names the worker, the position and the rule broken."""

    @staticmethod
    def at(worker: int, position: int, action: Action | None, rule: str) -> ScheduleError:
        """Return the error for ``rule`` broken at ``position`` of ``worker``'s list."""
        where = f"worker {worker}, position {position}"
        if action is not None:
            where += f" ({action})"
        return ScheduleError(f"{where}: {rule}")


class Action(NamedTuple):
    """One unit of work: ``kind`` of micro-batch ``microbatch`` through stage ``stage``.

    A named tuple rather than a dataclass: schedules of thousands of actions are validated
    and simulated by the planner, and tuples hash and compare in C (the search ran twice as
    long with a frozen dataclass)."""

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
    # (stage that stashes, later stage that pops): skip connections that cross stages
    # (layerwise.skips); each is one more message per micro-batch each way, sent directly
    skips: tuple[tuple[int, int], ...] = ()

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
        from layerwise.schedules.validate import execution_order  # it needs this class

        return tuple(execution_order(self))

    @cached_property
    def messages(self) -> int:
        """Point-to-point messages in one step: an activation for every forward whose next
        stage is on another worker, and a gradient for every backward (B or I) whose
        previous stage is; and both ways for every skip between stages on different workers.
        (A message of several tensors counts once.)"""
        sw, last = self.stage_worker, self.num_stages - 1
        count = 2 * self.num_microbatches * sum(sw[a] != sw[b] for a, b in self.skips)
        for acts in self.actions:
            for a in acts:
                forward = a.kind == "F" and a.stage < last and sw[a.stage + 1] != sw[a.stage]
                back = a.kind in ("B", "I") and a.stage > 0 and sw[a.stage - 1] != sw[a.stage]
                count += forward or back
        return count

    @cached_property
    def skip_sources(self) -> dict[int, tuple[int, ...]]:
        """Stage -> the earlier stages whose skips it pops (skips only)."""
        found: dict[int, tuple[int, ...]] = {}
        for a, b in self.skips:
            found[b] = (*found.get(b, ()), a)
        return found

    @cached_property
    def skip_targets(self) -> dict[int, tuple[int, ...]]:
        """Stage -> the later stages that pop what it stashes (skips only)."""
        found: dict[int, tuple[int, ...]] = {}
        for a, b in self.skips:
            found[a] = (*found.get(a, ()), b)
        return found

    def splits_backward(self, stage: int) -> bool:
        """Return True if ``stage`` runs its backward as I then W rather than one B."""
        return stage in self.split_stages

    def __str__(self) -> str:
        from layerwise.schedules.text import to_text  # it needs this class

        return to_text(self)


def size_problems(num_workers: int, num_microbatches: int, chunks: int = 1) -> list[str]:
    """Return what is wrong with these sizes for any schedule; empty if nothing."""
    problems = []
    if num_workers < 1:
        problems.append(f"num_workers must be >= 1, got {num_workers}")
    if num_microbatches < 1:
        problems.append(f"num_microbatches must be >= 1, got {num_microbatches}")
    if chunks < 1:
        problems.append(f"chunks (stages per worker) must be >= 1, got {chunks}")
    return problems


def check_sizes(num_workers: int, num_microbatches: int, chunks: int = 1) -> None:
    """Raise ValueError naming the first size that no schedule can have."""
    problems = size_problems(num_workers, num_microbatches, chunks)
    if problems:
        raise ValueError(problems[0])
