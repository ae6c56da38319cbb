"""The training job behind ``layerwise train``: a model (a GPT decoder by default) trained
layer-wise across workers; the job knows the model only through its family's interface.

Runs on every rank (started by ``torchrun`` or by :mod:`layerwise.job.launcher`). Rank 0 shows
progress and writes the run directory: ``config.json``, ``metrics.jsonl``, ``timeline.json``,
``timeline.png`` (measured next to simulated), ``trace.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from layerwise.job import checkpoints as ckpt
from layerwise.job.autoschedule import adopt_saved
from layerwise.job.config import TrainConfig
from layerwise.job.console import Console, Scalars
from layerwise.job.heal import HealLink, Snapshot, recover
from layerwise.job.launcher import EXIT_PEER_LOST
from layerwise.job.rundir import (
    RunLog,
    simulated_twin,
    write_pictures,
    write_summary,
)
from layerwise.job.supervisor import note_lost_peer
from layerwise.job.trainer import Groups, Trainer, describe_layout, layout_info, setup
from layerwise.runtime.transport import PeerError

__all__ = ["Groups", "Trainer", "describe_layout", "layout_info", "train", "train_worker"]


def train(cfg: TrainConfig, resume: bool | str = False) -> dict[str, Any]:
    """Run (or continue) the training job on this rank; return the final metrics.

    ``resume``: False starts at step 0; "required" (or True) continues from the newest whole
    checkpoint and fails without one; "if-any" continues when there is one (a restart)."""
    if resume is True:
        resume = "required"
    link = HealLink.from_env(cfg.device)  # started by the launcher that heals in memory

    def build() -> Trainer:
        groups = setup(cfg)
        torch.manual_seed(cfg.seed + groups.rank)
        return Trainer(cfg, groups)

    if link is not None and link.generation > 0:  # a replacement: state from a replica
        healed = recover(link, None, build, cfg.timeout)
        trainer, start, unlogged = cast(Trainer, healed[0]), healed[1], healed[2]
    else:
        if link is not None:
            link.connect(cfg.timeout)
        trainer = build()
        start = trainer.resume(required=resume == "required") if resume else 0
        unlogged = None
    rank = trainer.groups.rank
    run_dir = trainer.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.json").exists():
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    kept = start > 0 and cfg.schedule == "auto" and adopt_saved(trainer.pipe, run_dir)
    if start == 0 or (cfg.schedule == "auto" and not kept):
        prediction = trainer.predict()
        if rank == 0:
            (run_dir / "prediction.json").write_text(json.dumps(prediction, indent=2))
            print(describe_prediction(prediction), flush=True)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun's own
    log = RunLog(run_dir, start, restarted) if rank == 0 else None
    unit = "byte" if cfg.tokenizer is None else "token"
    console = Console(_layout_label(cfg), cfg.steps, start, unit=unit) if rank == 0 else None
    scalars = Scalars(run_dir) if rank == 0 else None
    records: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    measured = None
    last_record: dict[str, Any] | None = None  # of step trainer.done - 1, should a loss follow

    def show(record: dict[str, Any], recovers: bool = True) -> None:
        """Log a step (first rank): metrics.jsonl, TensorBoard, the console."""
        if log is None or console is None or scalars is None:
            return
        event = log.write(record, recovers)
        if event is not None:
            print(f"layerwise: recovered {event['recovery_s']:.1f}s after the loss; resumed at "
                  f"step {event['resumed_at']}, {event['steps_redone']} logged step(s) redone",
                  flush=True)  # fmt: skip
        scalars.write(record)
        console.step(record)

    if unlogged is not None and log is not None and unlogged["step"] > log.last_step:
        show(unlogged, recovers=False)  # a replaced first rank: the step its peer finished
    step = start
    while step < cfg.steps:
        lost: tuple[str, int | None, bool] | None = None
        try:
            record, timeline = trainer.step(step)
            measured = timeline if timeline is not None else measured
            last_record = record
            _validate(trainer, step, record)
            records.append(record)
            show(record)  # before the checkpoint: a step saved is a step logged
            _save(trainer, step, record)
        except (PeerError, RuntimeError) as err:
            if link is None or not lost_connection(err) or isinstance(err, ckpt.SaveError):
                raise
            lost = (str(err).splitlines()[0][:200], getattr(err, "peer_rank", None),
                    lost_connection(err, "timeout"))  # fmt: skip
        if lost is None:
            step += 1
            continue
        # outside the handler (its traceback would hold the trainer): stay alive, a
        # replacement joins, and this worker's state may be the one it takes
        print(f"[rank {rank}] {lost[0]}; waiting for a replacement", flush=True)
        note_lost_peer(run_dir, rank, lost[1], lost[2])
        snapshot = Snapshot.of(trainer, last_record)
        del trainer  # with it the broken group's handles: its connections close now
        gc.collect()
        healed = recover(link, snapshot, build, cfg.timeout)
        trainer, step, unlogged = cast(Trainer, healed[0]), healed[1], healed[2]
        last_record = None
        if log is not None:
            log.file.close()
            log = RunLog(run_dir, step)
            if unlogged is not None and unlogged["step"] > log.last_step:
                show(unlogged, recovers=False)  # finished before the loss, never logged
    if log is not None and start >= cfg.steps:
        log.recovered()  # lost after its last step: the restart had nothing left to do
    if measured is not None:
        pipe = trainer.pipe
        measured.meta["stage_sizes"] = pipe.partition.sizes
        measured.meta["cores"] = os.cpu_count() or 1
        measured.meta["local_workers"] = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        twin = simulated_twin(measured, pipe.schedule)
        if rank == 0:
            write_pictures(run_dir, measured, twin)
    write_summary(run_dir, str(cfg.grid()), record, trainer.pipe)
    if console is not None and scalars is not None:
        scalars.close()
        console.finish(records, run_dir)
    return record


def _validate(trainer: Trainer, step: int, record: dict[str, Any]) -> None:
    """The validation loss after ``step``, when it is due (collective)."""
    cfg = trainer.cfg
    if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
        record["val_loss"] = trainer.validation_loss()


def _save(trainer: Trainer, step: int, record: dict[str, Any]) -> None:
    """The checkpoint after ``step``, when it is due (collective)."""
    cfg = trainer.cfg
    if (step + 1) % cfg.save_interval == 0 or step + 1 == cfg.steps:
        unsaved = trainer.save(step + 1)
        if unsaved is not None:
            record["unsaved"] = unsaved
            if trainer.groups.rank == 0:
                print(f"layerwise: {unsaved}; training goes on (--on-save-error continue)",
                      flush=True)  # fmt: skip


def describe_prediction(prediction: dict[str, Any]) -> str:
    """One line: the step the simulator predicts from the costs measured before training."""
    others = ", ".join(
        f"{name} {t:.3f}s"
        for name, t in prediction["same_stages_other_schedules_s"].items()
        if name != prediction["schedule"]
    )
    return (
        f"predicted step {prediction['predicted_step_s']:.3f}s ({prediction['schedule']}, from "
        f"the stages measured before training; hand-off "
        f"{1e3 * prediction['handoff_s']:.2f} ms)"
        + (f"; on the same stages {others}" if others else "")
    )


def _layout_label(cfg: TrainConfig) -> str:
    layout = cfg.grid()
    if layout.world == layout.pp:
        return f"{layout.pp} workers {cfg.schedule}"
    return f"dp{layout.dp} pp{layout.pp} tp{layout.tp} {cfg.schedule}"


def lost_connection(err: RuntimeError, how: str = "any") -> bool:
    """Whether a collective failed because a peer died or stopped answering (gloo and NCCL
    report it as a RuntimeError, in torch 2.x often a DistError); ``how="timeout"``: only
    a peer that stopped answering."""
    text = str(err).lower()
    timeout = "timeout" in text or "timed out" in text or ("no " in text and " within " in text)
    if how == "timeout":
        return timeout
    marks = ("connection reset", "connection closed", "broken pipe")
    return timeout or isinstance(err, dist.DistError) or any(m in text for m in marks)


def train_worker(cfg: TrainConfig, resume: bool | str) -> int:
    """Entry point on one rank: train; a lost peer exits with EXIT_PEER_LOST (the launcher
    restarts the job), a reason to stop (a failed save, diverged training, a checkpoint that
    does not fit) with one line and code 1 (a restart would meet it again)."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        train(cfg, resume)
    except PeerError as err:
        print(f"[rank {rank}] {err}", flush=True)
        note_lost_peer(Path(cfg.run_dir), rank, err.peer_rank, lost_connection(err, "timeout"))
        return EXIT_PEER_LOST
    except (ckpt.SaveError, FloatingPointError, FileNotFoundError, ValueError) as err:
        if rank == 0:  # every rank meets the same reason; one says it
            print(f"layerwise: {err}", flush=True)
        return 1
    except RuntimeError as err:
        if not lost_connection(err):
            raise
        # a collective (data-parallel reduction, gradient norm) lost its peer
        print(
            f"[rank {rank}] lost a peer in a collective: {str(err).splitlines()[0][:200]}",
            flush=True,
        )
        note_lost_peer(Path(cfg.run_dir), rank, None, lost_connection(err, "timeout"))
        return EXIT_PEER_LOST
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
