"""What a training run leaves behind: metrics, timeline pictures and a summary."""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from layerwise.parallel.data import local_tensor
from layerwise.runtime.pipeline import Pipeline
from layerwise.schedules import Schedule
from layerwise.simulate import measured_costs, simulate
from layerwise.timeline import Timeline, render_png, write_chrome_trace


class RunLog:
    """Rank 0's writer for metrics.jsonl.

    A resumed run redoes the steps after its checkpoint: their old lines move to
    ``metrics.replaced.jsonl`` (history is never dropped), and event lines stay. When the
    resume follows a lost worker, the first step written adds a ``recovered`` event: how long
    the job was down (from the loss to this step) and how many logged steps it redid.
    """

    def __init__(self, run_dir: Path, resume_step: int, restart: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.resume_step = resume_step
        self.pending: dict[str, Any] | None = None
        lines = [
            ln
            for ln in (self.path.read_text() if self.path.exists() else "").splitlines()
            if ln.strip()
        ]
        kept, replaced, steps = [], [], []
        for ln in lines:
            try:
                record = json.loads(ln)
            except ValueError:  # a line cut short by a crash
                replaced.append(ln)
                continue
            if "event" in record:
                kept.append(ln)
                if record["event"] == "worker_lost":
                    self.pending = record
                elif record["event"] == "recovered":
                    self.pending = None
                continue
            steps.append(record)
            (kept if record.get("step", 0) < resume_step else replaced).append(ln)
        self.last_step = max((r.get("step", -1) for r in steps if r.get("step", 0) < resume_step),
                             default=-1)  # fmt: skip
        if replaced:
            with (run_dir / "metrics.replaced.jsonl").open("a") as f:
                f.write("".join(ln + "\n" for ln in replaced))
        if restart and self.pending is None:  # torchrun restarted the job: no launcher said so
            self.pending = {
                "event": "worker_lost",
                "how": "torchrun restarted the job",
                "restart": restart,
                "time": max((r.get("time", 0.0) for r in steps), default=time.time()),
                "last_step": max((r.get("step", 0) for r in steps), default=None),
            }
            kept.append(json.dumps(self.pending))
        if len(kept) != len(lines):
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")

    def recovered(self) -> dict[str, Any] | None:
        """Write the ``recovered`` event of a restart that had no step left to run."""
        return self.write({"time": time.time()}, log_record=False) if self.pending else None

    def write(self, record: dict[str, Any], recovers: bool = True,
              log_record: bool = True) -> dict[str, Any] | None:  # fmt: skip
        """Append a step's record; return the ``recovered`` event it completes, if any
        (``recovers=False``: a step finished before the loss, logged late)."""
        record.setdefault("time", time.time())
        self.last_step = max(self.last_step, record.get("step", -1))
        if log_record:
            self.file.write(json.dumps(record) + "\n")
        event = None
        if self.pending is not None and recovers:
            last = self.pending.get("last_step")
            event = {
                "event": "recovered",
                "restart": self.pending.get("restart"),
                "recovery_s": round(record["time"] - self.pending["time"], 3),
                "resumed_at": self.resume_step,
                "steps_redone": 0 if last is None else max(0, last + 1 - self.resume_step),
            }
            self.file.write(json.dumps(event) + "\n")
            self.pending = None
        self.file.flush()
        return event


def simulated_twin(measured: Timeline, schedule: Schedule) -> Timeline:
    """Simulate the same schedule with the stage times and hand-off latency this step had."""
    costs = measured_costs([measured], schedule)
    twin = simulate(schedule, costs)
    twin.meta["costs"] = dataclasses.asdict(costs)
    return twin


def write_pictures(run_dir: Path, measured: Timeline, twin: Timeline) -> None:
    """timeline.json (for diagnose), timeline.png and trace.json: measured above simulated."""
    (run_dir / "timeline.json").write_text(
        json.dumps({"measured": measured.to_json(), "simulated": twin.to_json()})
    )
    render_png(
        [measured, twin],
        run_dir / "timeline.png",
        titles=["measured (last step)", "simulated with the measured stage times and hand-offs"],
    )
    write_chrome_trace([measured, twin], run_dir / "trace.json")


def write_summary(run_dir: Path, layout: str, record: dict[str, Any], pipe: Pipeline) -> None:
    """Gather each rank's peak resident memory and parameter count into summary.json
    (collective: every rank calls it)."""
    mine = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(local_tensor(p).numel() for p in pipe.parameters()),
        "stages": sorted(pipe.stages),
    }
    ranks: list[Any] = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = {"layout": layout, "final": record, "ranks": ranks}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
