"""Run a function on N local worker processes joined in a gloo (or NCCL) process group.

For tests, examples and benchmarks on one machine; real jobs use ``torchrun`` or
``layerwise train``, which goes through ``torch.distributed.run``.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


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
