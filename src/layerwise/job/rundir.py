"""What a training run leaves behind: metrics, timeline pictures and a summary."""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path
from typing import Any

import torch.distributed as dist

from layerwise.parallel.data import local_tensor
from layerwise.runtime.pipeline import Pipeline
from layerwise.schedules import Schedule
from layerwise.simulate import measured_costs, simulate
from layerwise.timeline import Timeline, render_png, write_chrome_trace


class RunLog:
    """Rank 0's writer for metrics.jsonl; a resumed run drops lines after its checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # lines past the checkpoint belong to a run that was lost
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) < resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


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
