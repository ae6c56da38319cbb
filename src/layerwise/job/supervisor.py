"""A training job that heals itself, and the guards around it.

:func:`supervise` starts the workers and, when one is lost (killed, crashed, or hung past
``--timeout``, which its peers report), starts them again from the newest whole checkpoint,
up to ``--max-restarts`` times, re-laid out over the workers it can get. It writes what
happened to ``metrics.jsonl`` (``"event": "worker_lost"``; the resumed job adds
``"recovered"`` with the time it took and the steps redone) and says it on the console.

Around it: a run directory takes one live job at a time (:class:`RunLock`), workers follow
their launcher when it dies (:func:`follow_parent`), and Ctrl-C stops every worker quietly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from layerwise.job.config import TrainConfig, check_config
from layerwise.job.launcher import Outcome, describe_failures, launch

PEER_NOTES = ".lost-peers"  # a folder where workers name the peer they lost
LOCK_ENV = "LAYERWISE_RUN_LOCKED"  # set for the workers of a launcher that holds the lock


class RunLock:
    """An exclusive lock on a run directory, held while the job lives (the kernel drops it
    when the holder dies, however it dies)."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.file: IO[str] | None = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            self.file = None
            raise ValueError(
                f"{run_dir} is in use by a live job (process {holder}); wait for it to end or "
                f"stop it, or give another --run-dir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def follow_parent(interval_s: float = 0.5) -> None:
    """Stop this worker soon after the process that started it dies (``kill -9`` or the OOM
    killer on the launcher): an orphan would go on training, unsupervised, into the run
    directory a resumed job is about to use."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print("layerwise: the launcher is gone; this worker stops", flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def quiet_interrupts() -> None:
    """Ctrl-C ends a worker at once and without a traceback: the launcher says it once.
    (A Python handler would wait for a blocked receive to return.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def note_lost_peer(run_dir: Path, rank: int, peer: int | None, timed_out: bool) -> None:
    """Leave, for the launcher, which peer this worker lost (when known) and whether it
    stopped answering (a timeout) rather than dropping its connection (a death)."""
    try:
        folder = run_dir / PEER_NOTES
        folder.mkdir(exist_ok=True)
        (folder / f"rank{rank}").write_text(
            json.dumps({"peer": peer, "timed_out": timed_out, "time": time.time()})
        )
    except OSError:
        pass  # only a hint for the report


def forget_lost_peers(run_dir: Path) -> None:
    """Drop notes left by a job before this one (one that gave up, or was stopped): a new
    start must not read them as a loss of its own."""
    _peer_notes(run_dir)


def _peer_notes(run_dir: Path) -> list[dict[str, Any]]:
    """What the workers noted about the peers they lost; the notes are then removed."""
    folder = run_dir / PEER_NOTES
    notes = []
    for path in sorted(folder.glob("rank*")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            notes.append(json.loads(path.read_text()))
        path.unlink(missing_ok=True)
    return notes


def _children() -> list[int]:
    """This process's child processes (Linux: from /proc; elsewhere none are found)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name (field 2) may hold spaces; the parent pid follows its ')'
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(stat.parent.name))
    return found


class Reaper:
    """Once a worker has noted a lost peer, the job's step is lost: workers still alive a
    few seconds later (a hung one, a stopped one, one blocked on it) are killed, so the
    restart does not wait on torch's 30 s shutdown grace for each."""

    def __init__(self, run_dir: Path, grace_s: float = 3.0) -> None:
        self.folder, self.grace = run_dir / PEER_NOTES, grace_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def __enter__(self) -> Reaper:
        forget_lost_peers(self.folder.parent)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=2)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            if self.folder.is_dir() and any(self.folder.iterdir()):
                if self.stop.wait(self.grace):
                    return
                for pid in _children():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                return


def _last_step(run_dir: Path) -> int | None:
    from layerwise.job.progress import read_metrics

    records, _ = read_metrics(run_dir)
    return max((r["step"] for r in records), default=None)


def lost_event(run_dir: Path, outcome: Outcome, restart: int, limit: int) -> dict[str, Any]:
    """The ``worker_lost`` record: which worker, how, when, and the last step logged."""
    codes = outcome.exitcodes
    killed = sorted(r for r, c in codes.items() if c < 0 and c != -signal.SIGTERM)
    notes = _peer_notes(run_dir)
    named = sorted({n["peer"] for n in notes if isinstance(n.get("peer"), int)})
    hung = any(n.get("timed_out") for n in notes)
    workers = killed or named or sorted(codes)
    if hung:  # its peers timed out on it; then the launcher's SIGTERM (or SIGKILL) ended it
        workers = named or [r for r in workers if codes.get(r, 0) < 0] or workers
        how = "stopped answering (its peers timed out) and was stopped"
    elif killed:
        how = f"killed by {signal.Signals(-codes[killed[0]]).name}"
    else:
        how = "lost (its peers lost the connection)" if named else "failed"
    return {
        "event": "worker_lost",
        "workers": workers,
        "how": how,
        # when a survivor noticed the loss: the launcher hears of it only after stopping them
        "time": min((n["time"] for n in notes if "time" in n), default=time.time()),
        "last_step": _last_step(run_dir),
        "restart": restart,
        "max_restarts": limit,
    }


def available_workers(cfg: TrainConfig) -> int:
    """How many workers this host can run now: its GPUs for ``cuda``; on CPU, any number."""
    if cfg.device == "cuda":
        import torch

        return int(torch.cuda.device_count())
    return cfg.grid().world


def refit(cfg: TrainConfig, workers: int) -> TrainConfig | None:
    """The layout for at most ``workers`` workers: unchanged when they suffice; otherwise the
    valid (dp, pp) with the most workers (the deeper pipeline on a tie, which keeps each
    worker's share of the model smallest), tensor parallelism kept. None if none runs."""
    if cfg.grid().world <= workers:
        return cfg
    best: tuple[int, int, TrainConfig] | None = None
    for dp in range(1, workers // cfg.tp + 1):
        for pp in range(1, workers // (cfg.tp * dp) + 1):
            trial = dataclasses.replace(cfg, dp=dp, workers=pp, zero=cfg.zero if dp > 1 else 0)
            try:
                check_config(trial)
            except ValueError:
                continue
            key = (dp * pp, pp)
            if best is None or key > best[:2]:
                best = (*key, trial)
    return None if best is None else best[2]


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Add a job event (a lost worker) to metrics.jsonl, beside the steps' records."""
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(event) + "\n")


def say_interrupted(run_dir: Path) -> int:
    print(f"layerwise: interrupted; every worker stopped. The run resumes from its last "
          f"checkpoint with: layerwise train --resume {run_dir}",
          file=sys.stderr, flush=True)  # fmt: skip
    return 130


def say_gave_up(restarts: int, limit: int, run_dir: Path) -> int:
    print(f"layerwise: gave up after {restarts} restart(s) (--max-restarts {limit}); continue "
          f"with: layerwise train --resume {run_dir}", file=sys.stderr, flush=True)  # fmt: skip
    return 1


def supervise(cfg: TrainConfig, resume: bool) -> int:
    """Run the job until it finishes, restarting it after each lost worker (see the module's
    docstring); return the exit code: 0, 1 (failed or gave up), 130 (interrupted)."""
    run_dir = Path(cfg.run_dir)
    os.environ[LOCK_ENV] = "1"
    mode = "required" if resume else None
    from layerwise.job.heal_launcher import heals_in_memory, run_healing

    if heals_in_memory(cfg):  # replicas hold the state: heal without the disk
        return run_healing(cfg, mode)
    restarts = 0
    while True:
        argv = ["train", str(run_dir), *(["--resume", mode] if mode else [])]
        with Reaper(run_dir):
            outcome = launch(cfg.grid().world, argv)
        if outcome.ok:
            return 0
        if outcome.interrupted:
            return say_interrupted(run_dir)
        if not outcome.lost_worker or restarts >= cfg.max_restarts:
            print(describe_failures(outcome.exitcodes), file=sys.stderr, flush=True)
        if not outcome.lost_worker:
            return 1
        if restarts >= cfg.max_restarts:
            return say_gave_up(restarts, cfg.max_restarts, run_dir)
        restarts += 1
        event = lost_event(run_dir, outcome, restarts, cfg.max_restarts)
        available = available_workers(cfg)
        fitted = refit(cfg, available)
        if fitted is None:
            print(
                f"layerwise: no layout of this model runs on the {available} workers left; stopped",
                file=sys.stderr,
                flush=True,
            )
            return 1
        if fitted is not cfg:
            event["relaid_out"] = {"from": str(cfg.grid()), "to": str(fitted.grid())}
            cfg = fitted
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        append_event(run_dir, event)
        where = f"; now on {cfg.grid()}" if "relaid_out" in event else ""
        print(
            f"layerwise: worker {', '.join(map(str, event['workers']))} {event['how']}; "
            f"restarting from the newest checkpoint (restart {restarts} of "
            f"{cfg.max_restarts}){where}",
            flush=True,
        )
        mode = "if-any"
