"""Start worker processes through ``torch.distributed.run`` when not already under torchrun.

``layerwise train`` (and ``generate``) call :func:`relaunch` first: under ``torchrun`` it
returns immediately; otherwise it runs ``torchrun --standalone --nproc-per-node N -m
layerwise <same arguments>`` in this process and turns a failed worker into one line that
names it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence


def under_torchrun() -> bool:
    """Return True when this process is a worker started by torchrun / torch.distributed.run."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, argv: Sequence[str], monitor_interval: float = 0.5) -> int:
    """Run ``python -m layerwise <argv>`` on ``nproc`` local workers; return the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # share the cores between workers (and keep torchrun from warning that it does so)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args([
        "--standalone",
        "--nproc-per-node", str(nproc),
        "--monitor-interval", str(monitor_interval),
        "-m", "layerwise", *argv,
    ])
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = (f"killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exit code {failure.exitcode}")
        print(f"layerwise: worker {rank} failed first ({how}); the other workers were stopped. "
              f"See the lines above for each worker's own report.", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("layerwise: interrupted; workers stopped", file=sys.stderr)
        return 130
    return 0
