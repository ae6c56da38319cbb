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
    args = get_args_parser().parse_args(
        [
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "--monitor-interval",
            str(monitor_interval),
            "-m",
            "layerwise",
            *argv,
        ]
    )
    try:
        run(args)
    except ChildFailedError as err:
        print(
            describe_failures({r: f.exitcode for r, f in err.failures.items()}),
            file=sys.stderr,
            flush=True,
        )
        return 1
    except KeyboardInterrupt:
        print("layerwise: interrupted; workers stopped", file=sys.stderr)
        return 130
    return 0


def describe_failures(exitcodes: dict[int, int]) -> str:
    """Say which workers died and how; a worker killed by a signal is named first, since
    the others usually exit because they lost it."""
    term = -signal.SIGTERM  # what the launcher itself sends to stop the survivors
    killed = sorted(r for r, code in exitcodes.items() if code < 0 and code != term)
    failed = sorted(r for r, code in exitcodes.items() if code >= 0)
    stopped = sorted(r for r, code in exitcodes.items() if code == term)
    parts = [f"worker {r} was killed by {signal.Signals(-exitcodes[r]).name}" for r in killed]
    parts += [f"worker {r} exited with code {exitcodes[r]}" for r in failed]
    if stopped:
        parts.append(
            f"worker{'s' if len(stopped) > 1 else ''} "
            f"{', '.join(map(str, stopped))} stopped by the launcher"
        )
    cause = (
        f"lost worker {killed[0]}"
        if killed
        else f"worker {failed[0]} failed"
        if failed
        else "workers stopped"
    )
    return (
        f"layerwise: {cause}: "
        + "; ".join(parts)
        + ". The remaining workers were stopped; each worker's own report is above."
    )
