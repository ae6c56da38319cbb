"""``--schedule auto`` in the training job: a schedule searched for this run's own stages.

The pipeline starts with the registry's ``auto`` (equal stages), is calibrated on the first
batch, and then adopts the order :func:`layerwise.schedules.synthesize` finds for the
measured costs under ``--memory-cap``. The job's first rank searches and sends the result to
every other (a search with a time limit need not end the same way on every process), and
the order is kept as ``schedule.txt`` in the run directory, so that a resumed run goes on
with exactly the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from layerwise.runtime.pipeline import Pipeline
from layerwise.schedules import Schedule, from_text, synthesize, to_text
from layerwise.simulate import Costs

SCHEDULE_FILE = "schedule.txt"


def memory_cap(cap: float | None, workers: int, microbatches: int) -> float:
    """The cap to search under: the one given, or 1F1B's peak (the smaller of p and m)."""
    return cap if cap is not None else float(min(workers, microbatches))


def adopt_searched(pipe: Pipeline, costs: Costs, cap: float | None, run_dir: Path) -> Schedule:
    """Search a schedule for ``costs`` on the pipeline's stages, share it from the job's
    first rank, switch the pipeline to it and save it in ``run_dir`` (collective over the
    whole job: data-parallel replicas must run one order, or their gradient reductions,
    launched stage by stage, would be posted in different orders)."""
    sched = pipe.schedule
    box: list[Any] = [None]
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        found = synthesize(costs, sched.num_workers, sched.num_microbatches,
                           memory_cap(cap, sched.num_workers, sched.num_microbatches),
                           placement="looped", chunks=sched.chunks)  # fmt: skip
        box[0] = to_text(found)
        (run_dir / SCHEDULE_FILE).write_text(box[0])
    if distributed and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    chosen = from_text(box[0])
    pipe.reschedule(chosen)
    return chosen


def adopt_saved(pipe: Pipeline, run_dir: Path) -> Schedule | None:
    """Switch a resumed pipeline to the schedule its run searched before (collective); None
    when that order was searched for another layout (the run searches again)."""
    path = run_dir / SCHEDULE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} trained with --schedule auto but its {SCHEDULE_FILE} is missing; "
            f"start a new run"
        )
    chosen = from_text(path.read_text())
    now = pipe.schedule
    if (chosen.num_workers, chosen.num_microbatches, chosen.chunks) != (
        now.num_workers,
        now.num_microbatches,
        now.chunks,
    ):
        return None
    pipe.reschedule(chosen)
    return chosen
