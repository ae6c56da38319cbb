"""The shapes of the last few steps, remembered alike by every worker of a pipeline.

Training with variable-length batches (bucketed, or a few lengths in turn) changes the
micro-batches' shapes from one step to the next. Each new set of shapes costs a broadcast
of the step's plan and one metadata message per stream; a set seen a few steps ago costs
neither, and only a small number (its position in this history) travels. Every worker
learns every step's plan, so every worker's history is the same, and each forgets the same
shapes at the same step: the metadata caches on both ends of a stream stay in step, and
stay bounded however many lengths a run sees.
"""

from __future__ import annotations

from typing import Any

PLANS_KEPT = 8  # step plans remembered; older ones' metadata is forgotten


class PlanHistory:
    """The last ``capacity`` distinct step plans (lists of per-micro-batch (rows, shape
    signature)), most recent last."""

    def __init__(self, capacity: int = PLANS_KEPT) -> None:
        self.capacity = capacity
        self.plans: list[list[Any]] = []

    def code(self, plan: list[Any]) -> int:
        """What the first worker sends: 0 for the last step's plan, k for the k-th remembered
        one (1 is the oldest), -1 for a plan the others must be sent."""
        if self.plans and plan == self.plans[-1]:
            return 0
        return self.plans.index(plan) + 1 if plan in self.plans else -1

    def lookup(self, code: int) -> list[Any]:
        """The plan ``code`` names (not -1)."""
        return self.plans[-1] if code == 0 else self.plans[code - 1]

    def use(self, plan: list[Any]) -> bool:
        """Make ``plan`` the most recent; return True if an old plan was forgotten."""
        if plan in self.plans:
            self.plans.remove(plan)
        self.plans.append(plan)
        if len(self.plans) <= self.capacity:
            return False
        del self.plans[0]
        return True

    def signatures(self) -> set[Any]:
        """The micro-batch shape signatures of every remembered plan."""
        return {sig for plan in self.plans for _, sig in plan}
