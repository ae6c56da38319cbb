"""One rank's part of the training job: its place in the (dp, pp, tp) grid, its pipeline
stages and optimizer, the data it feeds, and its share of checkpoints (``job.train`` runs
the steps)."""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from layerwise.job import checkpoints as ckpt
from layerwise.job.autoschedule import adopt_searched
from layerwise.job.checks import parse_balance
from layerwise.job.config import TrainConfig
from layerwise.job.feed import Feed, make_feed
from layerwise.job.guard import StepGuard
from layerwise.parallel.data import GradReducer
from layerwise.parallel.mesh import Grid, build_mesh
from layerwise.parallel.zero import ShardedOptimizer
from layerwise.runtime.pipeline import Pipeline
from layerwise.schedules import alternatives, generate
from layerwise.simulate import simulate
from layerwise.timeline import Timeline

# What a training step's time is spent on, in order (``Trainer.step``'s ``phases_s``).
PHASES = ("pipeline", "pipeline edges", "loss mean", "gradient norm", "update", "timeline")


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


def attempt_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun's agent store, a view of it for this restart only. After torchrun
    restarts a job, the agent's store still holds the process-group keys of the attempt
    before (in torch 2.13), and the new workers would try to reach the dead ones' addresses."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"layerwise/attempt_{attempt}/", store)


def setup(cfg: TrainConfig) -> Groups:
    layout = cfg.grid()
    family = cfg.family()
    family.check(layout)
    if not dist.is_initialized():
        backend = "nccl" if cfg.device == "cuda" else "gloo"
        timeout = timedelta(seconds=cfg.timeout)
        store = attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout)  # fmt: skip
    rank, world = dist.get_rank(), dist.get_world_size()
    family.check(layout, world)
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, cores // local))  # workers on one machine share its cores
    if layout.dp == layout.tp == 1:  # a plain pipeline: the whole world is the pipeline
        return Groups(layout, rank, 0, None, None, None, None)
    mesh = build_mesh(layout, "cuda" if cfg.device == "cuda" else "cpu", cfg.timeout)
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
        self.done = 0  # steps whose update is applied (or skipped by the guard)
        self.feed: Feed | None = None
        self.val: list[tuple[Any, Any]] = []
        if self.pipe.is_first or self.pipe.is_last:  # only they touch tokens
            self.feed = make_feed(cfg, self.family)
            self.val = self.feed.validation(cfg.eval_batches)

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
        self.done = int(job["step"])
        return self.done

    def _mean_over_replicas(self, loss: float) -> float:
        if self.groups.layout.dp == 1:
            return loss
        mean = torch.tensor([loss], dtype=torch.float64, device=self.pipe.comm_device)
        dist.all_reduce(mean, group=self.groups.dp)
        return float(mean.item()) / self.groups.layout.dp

    def step(self, step: int) -> tuple[dict[str, Any], Timeline | None]:
        """Train on batch ``step``; return its record and, on the run's last step, its
        measured timeline; other steps gather only the pipeline's idle fraction for their
        record (one small all-gather, not every worker's events: only the run's last
        timeline is written).

        The record's ``phases_s`` cuts ``step_time`` into what this rank spent in each phase
        (they add up to it): the pipeline's actions (its timeline's span on this rank), the
        pipeline's edges (agreeing on shapes before, the gradients' all-reduce over replicas
        and the loss's hand-back after), the loss's mean over replicas, the gradient norm,
        the update (clipping and the optimizer), and gathering the timeline (or its idle)."""
        cfg, pipe = self.cfg, self.pipe
        marks = [time.perf_counter()]
        loss = pipe.train_step(*self._batch(step))
        marks.append(time.perf_counter())
        loss = self._mean_over_replicas(loss)
        marks.append(time.perf_counter())
        norm = global_grad_norm(pipe, self.groups)
        marks.append(time.perf_counter())
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
        self.done = step + 1
        pipe.zero_grad()
        marks.append(time.perf_counter())
        actions = Timeline(1, pipe.local_events()).makespan()  # this rank's actions' span
        measured = pipe.timeline() if step >= cfg.steps - 1 else None
        idle = measured.bubble_fraction() if measured is not None else pipe.bubble_fraction()
        marks.append(time.perf_counter())
        elapsed = marks[-1] - marks[0]
        spans = [b - a for a, b in itertools.pairwise(marks)]
        record.update(step_time=elapsed, tokens_per_s=cfg.batch_size * cfg.seq_len / elapsed,
                      idle=idle,
                      phases_s=dict(zip(PHASES, [min(actions, spans[0]),
                                                 max(0.0, spans[0] - actions), *spans[1:]],
                                        strict=True)))  # fmt: skip
        return record, measured

    def _batch(self, step: int) -> tuple[Any, Any]:
        """Batch ``step`` as this rank passes it to the pipeline: inputs on the first stage's
        worker, targets on the last's, None elsewhere; each replica gets its share."""
        x, y = (None, None)
        if self.feed is not None:
            x, y = self.feed.batch(step, self.groups.dp_rank, self.groups.layout.dp)
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
