"""What the training job prints: a progress bar on a terminal, plain lines in a log.

On a terminal, a tqdm bar redraws one line in place. Anywhere else (CI, ``nohup``, a file)
that redrawing would flood the log with carriage returns, so the job prints one line per
validation interval instead. Either way the run ends with one summary line and the next
commands to try.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO


class Console:
    """Rank 0's progress display for steps ``start`` .. ``total``."""

    def __init__(self, label: str, total: int, start: int, stream: TextIO | None = None,
                 tty: bool | None = None, unit: str = "byte") -> None:  # fmt: skip
        self.unit = unit  # what the loss is per: a byte, or a token of the run's tokenizer
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.label, self.total = label, total
        self.bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=label, unit="step",
                            dynamic_ncols=True, file=self.stream)  # fmt: skip
        else:
            self._line(f"{label}: steps {start + 1}..{total}")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        """Show one step: the bar advances; validation, skipped steps and spikes get lines."""
        n = record["step"] + 1
        if "val_loss" in record:
            self._line(
                f"step {n}/{self.total}: loss {record['loss']:.3f}, val loss "
                f"{record['val_loss']:.3f}, {record['tokens_per_s']:.0f} tok/s, "
                f"idle {100 * record['idle']:.0f}%"
            )
        for key in ("skipped", "spike"):
            if key in record:
                self._line(f"step {n}: {record[key]}")
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}",
                    "idle": f"{100 * record['idle']:.0f}%"}  # fmt: skip
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def finish(self, records: list[dict[str, Any]], run_dir: Path) -> None:
        """Close the bar; print the run's summary line and what to try next."""
        if self.bar is not None:
            self.bar.close()
        if not records:
            self._line(f"{self.label}: nothing to do (the run had already reached its steps)")
            return
        last = records[-1]
        val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
        speeds = sorted(r["tokens_per_s"] for r in records)
        val_text = f", validation loss {val:.3f}" if val is not None else ""
        self._line(
            f"done: {len(records)} steps to step {last['step'] + 1}; training loss "
            f"{last['loss']:.3f}{val_text} (nats per {self.unit}); {speeds[len(speeds) // 2]:.0f} "
            f"tokens/s (median); run directory {run_dir}"
        )
        self._line(f"next: layerwise diagnose {run_dir}   |   layerwise generate {run_dir}")


class Scalars:
    """TensorBoard event files beside metrics.jsonl, when ``tensorboard`` is installed."""

    def __init__(self, run_dir: Path) -> None:
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: metrics.jsonl holds the same numbers
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("loss", "val_loss", "grad_norm", "lr", "tokens_per_s", "idle", "step_time"):
            if key in record:
                self.writer.add_scalar(key, float(record[key]), record["step"] + 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
