"""Step health: skip non-finite steps, stop after too many in a row, flag loss spikes."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepGuard:
    """Judges each step's loss and gradient norm before the optimizer may use them."""

    max_nonfinite: int = 3
    spike_ratio: float = 1.5
    warmup: int = 0
    ema_decay: float = 0.9
    nonfinite_in_row: int = 0
    ema: float | None = None

    def check(self, step: int, loss: float, grad_norm: float) -> dict[str, str]:
        """Return notes for the step's record: ``skipped`` means do not step the optimizer.

        Raises FloatingPointError after ``max_nonfinite`` non-finite steps in a row.
        """
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.max_nonfinite:
                raise FloatingPointError(
                    f"{self.nonfinite_in_row} non-finite steps in a row (last: step {step}, "
                    f"loss {loss}, gradient norm {grad_norm}); try a lower --lr or --precision fp32"
                )
            return {"skipped": f"non-finite loss ({loss}) or gradient norm ({grad_norm})"}
        self.nonfinite_in_row = 0
        notes = {}
        if self.ema is not None and step > self.warmup and loss > self.spike_ratio * self.ema:
            notes["spike"] = (
                f"loss {loss:.3f} is {loss / self.ema:.1f}x its running mean {self.ema:.3f}"
            )
        self.ema = (
            loss if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        )
        return notes
