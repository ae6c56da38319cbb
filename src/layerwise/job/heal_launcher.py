"""The launcher that heals a data-parallel job in memory (the workers' side: ``job.heal``).

``torch.distributed.run`` stops every worker when one fails, which throws away the state a
surviving replica holds. For jobs with data-parallel replicas (and the optimizer state not
sharded by ZeRO) this launcher starts and watches the workers itself and hosts the store
they meet in. When a worker is lost, the others stay up; the launcher names the lost ones
(dead, or alive but silent while their peers report them), kills what is left of them,
opens a new generation of the rendezvous and starts replacements, which take their state
from a surviving replica. Up to ``--max-restarts`` times; then, or on any other error, it
stops every worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from layerwise.job.config import TrainConfig
from layerwise.job.heal import GENERATION_ENV, GENERATION_KEY, STORE_ENV
from layerwise.job.launcher import EXIT_PEER_LOST, Outcome, describe_failures, free_port
from layerwise.job.supervisor import (
    LOCK_ENV,
    PEER_NOTES,
    append_event,
    forget_lost_peers,
    lost_event,
    say_gave_up,
    say_interrupted,
)


def heals_in_memory(cfg: TrainConfig) -> bool:
    """Replicas that each hold every weight and optimizer state, and restarts allowed."""
    return cfg.recover_from == "replica" and cfg.dp > 1 and not cfg.zero and cfg.max_restarts > 0


class Workers:
    """The job's worker processes, by rank, started with the environment torchrun gives."""

    def __init__(self, cfg: TrainConfig, argv: list[str], store_port: int) -> None:
        self.cfg, self.argv, self.world = cfg, argv, cfg.grid().world
        self.env = dict(os.environ, WORLD_SIZE=str(self.world),
                        LOCAL_WORLD_SIZE=str(self.world), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(free_port()), **{LOCK_ENV: "1"},
                        **{STORE_ENV: f"127.0.0.1:{store_port}"})  # fmt: skip
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.world)))
        self.procs: dict[int, subprocess.Popen[Any]] = {}

    def start(self, rank: int, generation: int, extra: list[str]) -> None:
        env = dict(self.env, RANK=str(rank), LOCAL_RANK=str(rank),
                   **{GENERATION_ENV: str(generation)})  # fmt: skip
        cmd = [sys.executable, "-u", "-m", "layerwise.job.worker", *self.argv, *extra]
        self.procs[rank] = subprocess.Popen(cmd, env=env)

    def codes(self) -> dict[int, int | None]:
        return {r: p.poll() for r, p in self.procs.items()}

    def kill(self, ranks: list[int] | None = None, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; a worker still there 5 s later (a stopped one ignores all but
        SIGKILL) gets SIGKILL, so this never waits unbounded."""
        chosen = [self.procs[r] for r in (self.procs if ranks is None else ranks)]
        for proc in chosen:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in chosen:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _noted(run_dir: Path) -> set[int]:
    folder = run_dir / PEER_NOTES
    return {int(p.name[4:]) for p in folder.glob("rank*")} if folder.is_dir() else set()


def _lost(workers: Workers, run_dir: Path, timeout_s: float) -> dict[int, int]:
    """Once a loss shows (a dead worker, a survivor's note), wait for every live worker to
    report it: a survivor blocked on a peer that is itself waiting fails within the job's
    timeout. Workers dead, and those still silent then (hung), are lost: returns their exit
    codes (negative: a signal; the silent ones get SIGKILL here)."""
    deadline = time.monotonic() + timeout_s + 1.0
    while time.monotonic() < deadline:
        alive = {r for r, c in workers.codes().items() if c is None}
        if alive <= _noted(run_dir):
            break
        time.sleep(0.1)
    codes = workers.codes()
    silent = [r for r, c in codes.items() if c is None and r not in _noted(run_dir)]
    workers.kill(silent)
    return {r: c for r, c in workers.codes().items() if r in silent or c is not None}


def run_healing(cfg: TrainConfig, resume: str | None) -> int:
    """Run the job, healing lost workers from their replicas; return the exit code."""
    run_dir = Path(cfg.run_dir)
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=cfg.timeout))  # fmt: skip
    generation, restarts = 0, 0
    store.set(GENERATION_KEY, str(generation))
    forget_lost_peers(run_dir)
    workers = Workers(cfg, ["train", str(run_dir)], port)
    for rank in range(workers.world):
        workers.start(rank, generation, ["--resume", resume] if resume else [])
    try:
        while True:
            time.sleep(0.2)
            codes = workers.codes()
            if all(c == 0 for c in codes.values()):
                return 0
            if not any(c not in (None, 0) for c in codes.values()) and not _noted(run_dir):
                continue
            lost = _lost(workers, run_dir, cfg.timeout)
            lost_kind = all(c < 0 or c == EXIT_PEER_LOST for c in lost.values())
            if not lost_kind or restarts >= cfg.max_restarts:
                workers.kill()
                print(describe_failures(lost), file=sys.stderr, flush=True)
                return say_gave_up(restarts, cfg.max_restarts, run_dir) if lost_kind else 1
            restarts += 1
            event = lost_event(run_dir, Outcome(lost), restarts, cfg.max_restarts)
            event["workers"] = sorted(lost)
            event["healing"] = "replacements take their state from a surviving replica"
            append_event(run_dir, event)
            print(f"layerwise: worker {', '.join(map(str, sorted(lost)))} {event['how']}; "
                  f"starting a replacement that takes its state from a surviving replica "
                  f"(restart {restarts} of {cfg.max_restarts})", flush=True)  # fmt: skip
            generation += 1
            store.set(GENERATION_KEY, str(generation))
            for rank in sorted(lost):
                workers.start(rank, generation, [])
    except KeyboardInterrupt:
        workers.kill(sig=signal.SIGINT)
        return say_interrupted(run_dir)
    finally:
        workers.kill()
