"""Starting worker processes: the job's launcher and the test harness, in one place.

- :func:`relaunch` starts a job's workers through ``torch.distributed.run`` (what
  ``torchrun`` runs): ``layerwise train`` and ``generate`` call it when they are not already
  under ``torchrun``, and it turns a failed worker into one line that names it. Workers start
  at an explicit internal entry, :mod:`layerwise.job.worker`.
- :func:`run_workers` runs a function on N spawned local processes joined in one process
  group, for tests, examples and benchmarks on one machine.
"""

from __future__ import annotations

import os
import queue as queue_module
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def under_torchrun() -> bool:
    """Return True when this process is a worker started by torchrun / torch.distributed.run."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


EXIT_PEER_LOST = 75  # a worker lost a peer (died or hung): a restart may succeed


@dataclass
class Outcome:
    """How one start of a job's workers ended: each failed worker's exit code (negative: the
    signal that killed it), or ``interrupted`` when the launcher itself got SIGINT/SIGTERM."""

    exitcodes: dict[int, int] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.exitcodes and not self.interrupted

    @property
    def lost_worker(self) -> bool:
        """A worker was killed by a signal not sent by the launcher, or a worker lost a peer:
        a failure the job may survive by restarting (an error in the code would recur)."""
        return any(
            (c < 0 and c != -signal.SIGTERM) or c == EXIT_PEER_LOST for c in self.exitcodes.values()
        )


def launch(nproc: int, argv: Sequence[str], monitor_interval: float = 0.5) -> Outcome:
    """Run ``python -m layerwise.job.worker <argv>`` on ``nproc`` local workers once."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the job reports failures itself, in one line; torch's agent would add a page of logs
    for name in list(logging.root.manager.loggerDict):  # each module sets its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # a worker that does not stop within 5 s of SIGTERM (a hung or stopped one) is killed
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")
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
            "layerwise.job.worker",
            *argv,
        ]
    )
    try:
        run(args)
    except ChildFailedError as err:
        codes = {r: f.exitcode for r, f in err.failures.items()}
        if any(c == -signal.SIGINT for c in codes.values()):  # Ctrl-C reached the workers
            return Outcome(codes, interrupted=True)
        return Outcome(codes)
    except (KeyboardInterrupt, SignalException):
        return Outcome(interrupted=True)
    return Outcome()


def relaunch(nproc: int, argv: Sequence[str], monitor_interval: float = 0.5) -> int:
    """Run the workers once; turn a failure into one line that names the worker, and
    return the exit code (130 after Ctrl-C)."""
    outcome = launch(nproc, argv, monitor_interval)
    if outcome.interrupted:
        print("layerwise: interrupted; workers stopped", file=sys.stderr, flush=True)
        return 130
    if outcome.exitcodes:
        print(describe_failures(outcome.exitcodes), file=sys.stderr, flush=True)
        return 1
    return 0


def describe_failures(exitcodes: dict[int, int]) -> str:
    """Say which workers died and how; a worker killed by a signal is named first, since
    the others usually exit because they lost it."""
    term = -signal.SIGTERM  # what the launcher itself sends to stop the survivors
    killed = sorted(r for r, code in exitcodes.items() if code < 0 and code != term)
    failed = sorted(r for r, code in exitcodes.items() if code >= 0)
    stopped = sorted(r for r, code in exitcodes.items() if code == term)
    parts = [f"worker {r} was killed by {signal.Signals(-exitcodes[r]).name}" for r in killed]
    parts += [
        f"worker {r} lost a peer" if exitcodes[r] == EXIT_PEER_LOST
        else f"worker {r} exited with code {exitcodes[r]}"
        for r in failed
    ]  # fmt: skip
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


def free_port() -> int:
    """Return a TCP port that was free a moment ago on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    backend: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    queue: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    # the workers share this machine's cores, as the job's workers do (job/trainer.py): more
    # threads each would only contend, and their spinning idle threads steal the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
        result = fn(rank, world, *args)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerError(RuntimeError):
    """One or more workers raised; the message holds their tracebacks."""


def run_workers(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    allow_exit: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; return results by rank.

    ``fn`` must be importable (defined at module level). Raises WorkerError with every
    failing worker's traceback if any worker fails; with ``allow_exit``, a worker that died
    without reporting gets ``None`` as its result instead (for tests that kill workers).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, backend, timeout_s, fn, args, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    # read while the workers run: a large result blocks its sender until it is read
    deadline = time.monotonic() + timeout_s * 3
    while len(results) + len(failures) < world and time.monotonic() < deadline:
        try:
            rank, ok, value = queue.get(timeout=0.5)
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs):
                try:  # a result may have landed between the check and the timeout
                    rank, ok, value = queue.get(timeout=2.0)
                except queue_module.Empty:
                    break
            else:
                continue
        (results if ok else failures)[rank] = value
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world) if r not in results and r not in failures]
    for r in missing:
        if allow_exit:
            results[r] = None
        else:
            failures[r] = f"exited with code {procs[r].exitcode} without a result"
    if failures:
        raise WorkerError("\n".join(f"--- worker {r} ---\n{failures[r]}" for r in sorted(failures)))
    return [results[r] for r in range(world)]
