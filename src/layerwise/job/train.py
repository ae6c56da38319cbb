"""The training job behind ``layerwise train``: a model (a GPT decoder by default) trained
layer-wise across workers; the job knows the model only through its family's interface.

Runs on every rank (started by ``torchrun`` or by :mod:`layerwise.job.launcher`). Rank 0 shows
progress and writes the run directory: ``config.json``, ``metrics.jsonl``, ``timeline.json``,
``timeline.png`` (measured next to simulated), ``trace.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from layerwise.job import checkpoints as ckpt
from layerwise.job.autoschedule import adopt_saved, adopt_searched
from layerwise.job.checks import parse_balance
from layerwise.job.config import TrainConfig
from layerwise.job.console import Console, Scalars
from layerwise.job.data import Batcher, load_splits
from layerwise.job.guard import StepGuard
from layerwise.job.launcher import EXIT_PEER_LOST
from layerwise.job.rundir import (
    RunLog,
    simulated_twin,
    write_pictures,
    write_summary,
)
from layerwise.job.supervisor import note_lost_peer
from layerwise.parallel.data import GradReducer
from layerwise.parallel.mesh import Grid, build_mesh
from layerwise.parallel.zero import ShardedOptimizer
from layerwise.runtime.pipeline import Pipeline
from layerwise.runtime.transport import PeerError
from layerwise.schedules import alternatives, generate
from layerwise.simulate import simulate
from layerwise.timeline import Timeline


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def global_grad_norm(pipe: Pipeline, groups: Groups) -> float:
    """Return the L2 norm of the whole model's gradient: tensor-parallel shards summed,
    replicated copies and tied copies counted once, all pipeline stages included."""
    sharded = torch.zeros(1, dtype=torch.float64, device=pipe.comm_device)
    replicated = torch.zeros(1, dtype=torch.float64, device=pipe.comm_device)
    for p in pipe.parameters():
        if p.grad is None or not pipe.owns_tied_copy(p):
            continue
        g = p.grad.detach()
        if isinstance(g, DTensor):
            squares = g.to_local().double().pow(2).sum()
            if any(pl.is_shard() for pl in g.placements):
                sharded += squares
                continue
            replicated += squares
        else:
            replicated += g.double().pow(2).sum()
    total = sharded + replicated / groups.layout.tp  # each tp rank holds a replicated copy
    if groups.layout.tp > 1:
        dist.all_reduce(total, group=groups.tp)
    if groups.layout.pp > 1:
        dist.all_reduce(total, group=groups.pp)
    return float(total.sqrt().item())


@dataclass
class Groups:
    """This rank's place in the (dp, pp, tp) grid and the process groups along each axis."""

    layout: Grid
    rank: int
    dp_rank: int
    dp: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None
    tp: dist.ProcessGroup | None
    tp_mesh: Any


def _setup(cfg: TrainConfig) -> Groups:
    layout = cfg.grid()
    family = cfg.family()
    family.check(layout)
    if not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if cfg.device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    family.check(layout, world)
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, cores // local))  # workers on one machine share its cores
    if layout.dp == layout.tp == 1:  # a plain pipeline: the whole world is the pipeline
        return Groups(layout, rank, 0, None, None, None, None)
    mesh = build_mesh(layout, "cuda" if cfg.device == "cuda" else "cpu")
    return Groups(
        layout,
        rank,
        layout.coords(rank)[0],
        mesh["dp"].get_group(),
        mesh["pp"].get_group(),
        mesh["tp"].get_group(),
        mesh["tp"],
    )


def _build_pipeline(cfg: TrainConfig, groups: Groups) -> Pipeline:
    family = cfg.family()
    tp_mesh = groups.tp_mesh
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if cfg.device == "cuda"
        else torch.device("cpu")
    )
    return Pipeline(
        family.layers(),
        schedule=cfg.schedule,
        microbatches=cfg.microbatches,
        loss_fn=family.loss_fn,
        balance=parse_balance(cfg.balance),
        recompute=cfg.recompute,
        chunks=cfg.chunks,
        tied=family.tied_parameters(),
        loss_reduction=family.loss_reduction(),
        device=device,
        timeout=cfg.timeout,
        seed=cfg.seed,
        precision=cfg.precision,
        group=groups.pp,
        parallelize=None if tp_mesh is None else lambda i, m: family.parallelize(i, m, tp_mesh),
        grad_reducer=GradReducer(groups.dp) if groups.layout.dp > 1 and groups.dp else None,
    )


def _build_optimizer(
    cfg: TrainConfig, groups: Groups, params: list[torch.nn.Parameter]
) -> tuple[Any, torch.optim.Optimizer]:
    """Return (what steps, the torch optimizer whose state is checkpointed)."""

    def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        decay = [p for p in ps if p.dim() >= 2]  # matrices decay; norms and biases do not
        rest = [p for p in ps if p.dim() < 2]
        param_groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": rest, "weight_decay": 0.0}]  # fmt: skip
        return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.lr,
                                 betas=(0.9, 0.95))  # fmt: skip

    if cfg.zero and groups.layout.dp > 1:
        assert groups.dp is not None
        sharded = ShardedOptimizer(params, groups.dp, make)
        return sharded, sharded.inner
    opt = make(params)
    return opt, opt


class Trainer:
    """One rank's part of the job: its pipeline stages, optimizer, and (on the first and
    last pipeline workers) the data."""

    def __init__(self, cfg: TrainConfig, groups: Groups) -> None:
        self.cfg, self.groups = cfg, groups
        self.run_dir = Path(cfg.run_dir)
        self.family = cfg.family()
        self.pipe = _build_pipeline(cfg, groups)
        self.params = list(self.pipe.parameters())
        self.opt, self.inner = _build_optimizer(cfg, groups, self.params)
        self.guard = StepGuard(max_nonfinite=cfg.max_nonfinite, warmup=cfg.warmup)
        self.batcher: Batcher | None = None
        self.val: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.pipe.is_first or self.pipe.is_last:  # only they touch tokens
            # validation holds out whole files, drawn from the same corpus (job.data)
            train_text, val_text = load_splits(cfg.data, cfg.data_bytes, 0.1)
            train_tokens, val_tokens = (torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
                                        for b in (train_text, val_text))  # fmt: skip
            self.batcher = Batcher(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
            val = Batcher(val_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
            self.val = [(vx, self.family.lm_targets(vx, vy))
                        for vx, vy in val.eval_batches(cfg.eval_batches)]  # fmt: skip

    def resume(self, required: bool) -> int:
        """Load the newest whole checkpoint, whatever layout wrote it; return the step to
        continue from (0 when there is none and ``required`` is False)."""
        ckpt_dir = self.run_dir / "checkpoints"
        choice = ckpt.agreed_checkpoint(ckpt_dir)
        say = print if self.groups.rank == 0 else (lambda *a, **k: None)
        for line in choice.rejected:
            say(f"layerwise: {line}", flush=True)
        if choice.path is None:
            if required:
                raise FileNotFoundError(
                    f"no complete checkpoint in {ckpt_dir}; start the run again without --resume"
                )
            say("layerwise: no checkpoint to resume from; starting at step 0", flush=True)
            return 0
        job, own = ckpt.load(choice.path, self.pipe.module(), self.inner)
        saved = ckpt.saved_info(choice.path).get("layout", {})
        now = layout_info(self.cfg)
        moved = f"; saved by {describe_layout(saved)}" if saved and saved != now else ""
        say(
            f"layerwise: resuming at step {job['step']} from {choice.path.name} on "
            f"{describe_layout(now)}{moved}",
            flush=True,
        )
        if own is not None and saved.get("world") == now["world"]:
            torch.set_rng_state(own["rng"])
        else:  # another layout: each rank's generator starts from the step, as at step 0
            torch.manual_seed(self.cfg.seed + self.groups.rank + 7919 * int(job["step"]))
        self.guard.ema = job["guard"]["ema"]
        self.guard.nonfinite_in_row = job["guard"]["nonfinite_in_row"]
        return int(job["step"])

    def _mean_over_replicas(self, loss: float) -> float:
        if self.groups.layout.dp == 1:
            return loss
        mean = torch.tensor([loss], dtype=torch.float64, device=self.pipe.comm_device)
        dist.all_reduce(mean, group=self.groups.dp)
        return float(mean.item()) / self.groups.layout.dp

    def step(self, step: int) -> tuple[dict[str, Any], Timeline]:
        """Train on batch ``step``; return its record and measured timeline."""
        cfg, pipe = self.cfg, self.pipe
        t0 = time.perf_counter()
        loss = pipe.train_step(*self._batch(step))
        loss = self._mean_over_replicas(loss)
        norm = global_grad_norm(pipe, self.groups)
        record: dict[str, Any] = {"step": step, "loss": loss, "grad_norm": norm,
                                  "lr": lr_at(cfg, step)}  # fmt: skip
        record.update(self.guard.check(step, loss, norm))  # the same verdict on every rank
        if "skipped" not in record:
            scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
            for group in self.opt.param_groups:
                group["lr"] = record["lr"]
            for p in self.params:
                if p.grad is not None and scale < 1.0:
                    p.grad.mul_(scale)
            self.opt.step()
        pipe.zero_grad()
        measured = pipe.timeline()
        elapsed = time.perf_counter() - t0
        record.update(step_time=elapsed, tokens_per_s=cfg.batch_size * cfg.seq_len / elapsed,
                      idle=measured.bubble_fraction())  # fmt: skip
        return record, measured

    def _batch(self, step: int) -> tuple[Any, Any]:
        """Batch ``step`` as this rank passes it to the pipeline: inputs on the first stage's
        worker, targets on the last's, None elsewhere; each replica gets its share."""
        x, y = (None, None)
        if self.batcher is not None:
            x, y = self.batcher.get_batch(step, self.groups.dp_rank, self.groups.layout.dp)
            y = self.family.lm_targets(x, y)
        pipe = self.pipe
        return (x if pipe.is_first else None), (y if pipe.is_last else None)

    def predict(self) -> dict[str, Any]:
        """Before training: calibrate the pipeline on the first batch and predict a step of
        this schedule and of the others that use the same stages (collective)."""
        pipe = self.pipe
        costs = pipe.calibrate(*self._batch(0))
        if self.cfg.schedule == "auto":  # now that the costs are known, search for them
            adopt_searched(pipe, costs, self.cfg.memory_cap, self.run_dir)
        sched = pipe.schedule
        others = {}
        for name in alternatives(sched.stage_worker, sched.num_microbatches):
            alt = generate(name, sched.num_workers, sched.num_microbatches, sched.chunks)
            others[name] = simulate(alt, costs).makespan()
        return {
            "schedule": sched.name,
            "microbatches": sched.num_microbatches,
            "predicted_step_s": simulate(sched, costs).makespan(),
            "stage_forward_s": list(costs.forward),
            "stage_backward_s": list(costs.backward),
            "handoff_s": costs.comm_latency,
            "same_stages_other_schedules_s": others,
            "how": "Pipeline.calibrate before the first step: one micro-batch through the "
            "stages one after another, then the simulator",
        }

    def validation_loss(self) -> float:
        pipe = self.pipe
        batches = self.val or [(None, None)] * self.cfg.eval_batches
        losses = [pipe.evaluate(vx if pipe.is_first else None, vy if pipe.is_last else None)
                  for vx, vy in batches]  # fmt: skip
        return sum(losses) / len(losses)

    def save(self, step: int) -> str | None:
        """Save step ``step`` (collective); return why it failed, if the run goes on without
        it (``--on-save-error continue``). Raises SaveError otherwise."""
        job = {
            "step": step,
            "guard": {"ema": self.guard.ema, "nonfinite_in_row": self.guard.nonfinite_in_row},
        }
        info = {"layout": layout_info(self.cfg), "architecture": self.cfg.architecture()}
        try:
            ckpt.save(
                self.run_dir / "checkpoints",
                step,
                self.pipe.module(),
                self.inner,
                job,
                {"rng": torch.get_rng_state()},
                info,
            )
        except ckpt.SaveError as err:
            if self.cfg.on_save_error != "continue":
                raise
            return str(err)
        return None


def layout_info(cfg: TrainConfig) -> dict[str, Any]:
    """How a run is laid out over its workers: free to change between a save and a resume."""
    grid = cfg.grid()
    return {
        "dp": grid.dp,
        "pp": grid.pp,
        "tp": grid.tp,
        "world": grid.world,
        "zero": cfg.zero,
        "schedule": cfg.schedule,
        "microbatches": cfg.microbatches,
        "chunks": cfg.chunks,
        "balance": cfg.balance,
    }


def describe_layout(layout: dict[str, Any]) -> str:
    zero = " zero1" if layout.get("zero") else ""
    return (
        f"dp{layout.get('dp')} pp{layout.get('pp')} tp{layout.get('tp')}{zero} "
        f"{layout.get('schedule')} m={layout.get('microbatches')}"
    )


def train(cfg: TrainConfig, resume: bool | str = False) -> dict[str, Any]:
    """Run (or continue) the training job on this rank; return the final metrics.

    ``resume``: False starts at step 0; "required" (or True) continues from the newest whole
    checkpoint and fails without one; "if-any" continues when there is one (a restart)."""
    if resume is True:
        resume = "required"
    groups = _setup(cfg)
    rank = groups.rank
    torch.manual_seed(cfg.seed + rank)
    trainer = Trainer(cfg, groups)
    start = trainer.resume(required=resume == "required") if resume else 0
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
    console = Console(_layout_label(cfg), cfg.steps, start) if rank == 0 else None
    scalars = Scalars(run_dir) if rank == 0 else None
    records: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    measured = None
    for step in range(start, cfg.steps):
        record, measured = trainer.step(step)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_interval == 0 or last:
            record["val_loss"] = trainer.validation_loss()
        if (step + 1) % cfg.save_interval == 0 or last:
            unsaved = trainer.save(step + 1)
            if unsaved is not None:
                record["unsaved"] = unsaved
                if rank == 0:
                    print(
                        f"layerwise: {unsaved}; training goes on (--on-save-error continue)",
                        flush=True,
                    )
        records.append(record)
        if log is not None and console is not None and scalars is not None:
            event = log.write(record)
            if event is not None:
                print(
                    f"layerwise: recovered {event['recovery_s']:.1f}s after the loss; resumed at "
                    f"step {event['resumed_at']}, {event['steps_redone']} logged step(s) redone",
                    flush=True,
                )
            scalars.write(record)
            console.step(record)
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
