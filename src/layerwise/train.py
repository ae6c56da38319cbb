"""The training job behind ``layerwise train``: a GPT decoder trained layer-wise across workers.

Runs on every rank (started by ``torchrun`` or by :mod:`layerwise.launcher`). Rank 0 shows
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

from layerwise import checkpoint as ckpt
from layerwise.data import Batcher, load_corpus, split
from layerwise.guard import StepGuard
from layerwise.models.gpt import GPTConfig, gpt_layers, loss_fn, tied_parameter_names
from layerwise.parallel.data import GradReducer
from layerwise.parallel.mesh import Layout, build_mesh, check_layout
from layerwise.parallel.tensor import tensor_parallel
from layerwise.parallel.zero import ShardedOptimizer
from layerwise.runtime.pipeline import Pipeline
from layerwise.runtime.transport import PeerError
from layerwise.simulate import measured_costs, simulate
from layerwise.timeline import Timeline, render_png, write_chrome_trace


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as config.json and reloaded by --resume."""

    workers: int = 4  # the pipeline degree (pp)
    dp: int = 1
    tp: int = 1
    zero: int = 0  # 1: shard optimizer state across data-parallel replicas
    schedule: str = "1f1b"
    microbatches: int = 8
    chunks: int | None = None
    balance: str = "params"
    checkpoint: str = "never"
    precision: str = "fp32"
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    tie_embeddings: bool = False
    run_dir: str = ""
    device: str = "cpu"
    data: str | None = None
    data_bytes: int = 4_000_000
    eval_interval: int = 50
    eval_batches: int = 4
    save_interval: int = 100
    max_nonfinite: int = 3
    timeout: float = 120.0

    def gpt(self) -> GPTConfig:
        return GPTConfig(
            seq_len=self.seq_len,
            d_model=self.d_model,
            n_layers=self.layers,
            n_heads=self.heads,
            tie_embeddings=self.tie_embeddings,
            seed=self.seed,
        )

    def parallel_layout(self) -> Layout:
        return Layout(dp=self.dp, pp=self.workers, tp=self.tp)

    def layout(self) -> dict[str, Any]:
        """The fields a resumed run must share with the saved one."""
        keys = (
            "workers",
            "dp",
            "tp",
            "zero",
            "schedule",
            "microbatches",
            "chunks",
            "layers",
            "d_model",
            "heads",
            "seq_len",
            "batch_size",
            "tie_embeddings",
            "balance",
        )
        return {k: getattr(self, k) for k in keys}


def parse_balance(text: str) -> str | list[int]:
    """'params' stays a mode; '2,2,1,1' becomes stage sizes."""
    return [int(x) for x in text.split(",")] if "," in text or text.isdigit() else text


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


def simulated_twin(measured: Timeline, pipe: Pipeline) -> Timeline:
    """Simulate the same schedule with the stage times and hand-off latency this step had."""
    costs = measured_costs([measured], pipe.schedule)
    twin = simulate(pipe.schedule, costs)
    twin.meta["costs"] = dataclasses.asdict(costs)
    return twin


class RunLog:
    """Rank 0's writer for metrics.jsonl; a resumed run drops lines after its checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # lines past the checkpoint belong to a run that was lost
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) < resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


@dataclass
class Groups:
    """This rank's place in the (dp, pp, tp) grid and the process groups along each axis."""

    layout: Layout
    rank: int
    dp_rank: int
    dp: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None
    tp: dist.ProcessGroup | None
    tp_mesh: Any


def _setup(cfg: TrainConfig) -> Groups:
    layout = cfg.parallel_layout()
    gpt = cfg.gpt()
    check_layout(layout, None, gpt.n_heads, gpt.d_model, gpt.ff_dim, gpt.num_layers_total)
    if not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if cfg.device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    check_layout(layout, world, gpt.n_heads, gpt.d_model, gpt.ff_dim, gpt.num_layers_total)
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


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the training job on this rank; return the final metrics."""
    groups = _setup(cfg)
    rank = groups.rank
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed + rank)
    gpt = cfg.gpt()
    tp_mesh = groups.tp_mesh
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if cfg.device == "cuda"
        else torch.device("cpu")
    )
    pipe = Pipeline(
        gpt_layers(gpt),
        schedule=cfg.schedule,
        microbatches=cfg.microbatches,
        loss_fn=loss_fn,
        balance=parse_balance(cfg.balance),
        checkpoint=cfg.checkpoint,
        chunks=cfg.chunks,
        tied=tied_parameter_names(gpt),
        device=device,
        timeout=cfg.timeout,
        seed=cfg.seed,
        precision=cfg.precision,
        group=groups.pp,
        parallelize=(lambda i, m: tensor_parallel(m, tp_mesh)) if tp_mesh is not None else None,
        grad_reducer=GradReducer(groups.dp) if groups.layout.dp > 1 and groups.dp else None,
    )
    params = list(pipe.parameters())

    def make_optimizer(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        groups_ = [
            {"params": [p for p in ps if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups_ if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))

    if cfg.zero and groups.layout.dp > 1:
        assert groups.dp is not None
        sharded = ShardedOptimizer(params, groups.dp, make_optimizer)
        opt, inner = sharded, sharded.inner
    else:
        opt = inner = make_optimizer(params)
    start = 0
    if resume:
        path = ckpt.latest(run_dir / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}")
        extra = ckpt.load(path, pipe.module(), inner)
        start = int(extra["step"])
        torch.set_rng_state(extra["rng"])
    batcher = val = None
    if pipe.is_first or pipe.is_last:
        tokens = torch.frombuffer(
            bytearray(load_corpus(cfg.data, cfg.data_bytes)), dtype=torch.uint8
        ).long()
        train_tokens, val_tokens = split(tokens, 0.1)
        batcher = Batcher(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
        val = Batcher(val_tokens, cfg.batch_size, cfg.seq_len, cfg.seed).eval_batches(
            cfg.eval_batches
        )
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.json").exists():
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log = RunLog(run_dir, start) if rank == 0 else None
    bar = _progress(cfg, start) if rank == 0 else None
    guard = StepGuard(max_nonfinite=cfg.max_nonfinite, warmup=cfg.warmup)
    record: dict[str, Any] = {}
    measured = None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        x, y = (
            batcher.get_batch(step, groups.dp_rank, groups.layout.dp)
            if batcher is not None
            else (None, None)
        )
        loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
        if groups.layout.dp > 1:  # each replica saw its share of the batch: report the mean
            mean = torch.tensor([loss], dtype=torch.float64, device=pipe.comm_device)
            dist.all_reduce(mean, group=groups.dp)
            loss = float(mean.item()) / groups.layout.dp
        norm = global_grad_norm(pipe, groups)
        record = {"step": step, "loss": loss, "grad_norm": norm, "lr": lr_at(cfg, step)}
        record.update(guard.check(step, loss, norm))  # the same verdict on every rank
        if "skipped" not in record:
            scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
            for group in opt.param_groups:
                group["lr"] = record["lr"]
            for p in params:
                if p.grad is not None and scale < 1.0:
                    p.grad.mul_(scale)
            opt.step()
        pipe.zero_grad()
        measured = pipe.timeline()
        elapsed = time.perf_counter() - t0
        record.update(
            step_time=elapsed,
            tokens_per_s=cfg.batch_size * cfg.seq_len / elapsed,
            idle=measured.bubble_fraction(),
        )
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_interval == 0 or last:
            losses = [
                pipe.evaluate(vx if pipe.is_first else None, vy if pipe.is_last else None)
                for vx, vy in (val or [(None, None)] * cfg.eval_batches)
            ]
            record["val_loss"] = sum(losses) / len(losses)
        if (step + 1) % cfg.save_interval == 0 or last:
            ckpt.save(
                run_dir / "checkpoints",
                step + 1,
                pipe.module(),
                inner,
                {"step": step + 1, "rng": torch.get_rng_state()},
            )
        if log is not None and bar is not None:
            log.write(record)
            _update_progress(bar, record)
    if bar is not None:
        bar.close()
    if measured is not None:
        measured.meta["stage_sizes"] = pipe.partition.sizes
        measured.meta["cores"] = os.cpu_count() or 1
        measured.meta["local_workers"] = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        twin = simulated_twin(measured, pipe)
        if rank == 0:
            _write_pictures(run_dir, measured, twin)
    _write_summary(run_dir, cfg, record, pipe)
    return record


def _write_summary(run_dir: Path, cfg: TrainConfig, record: dict[str, Any], pipe: Pipeline) -> None:
    """Gather each rank's peak resident memory and parameter count into summary.json."""
    import resource

    mine = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for p in pipe.parameters()
        ),
        "stages": sorted(pipe.stages),
    }
    ranks: list[Any] = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = {"layout": str(cfg.parallel_layout()), "final": record, "ranks": ranks}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _write_pictures(run_dir: Path, measured: Timeline, twin: Timeline) -> None:
    (run_dir / "timeline.json").write_text(
        json.dumps({"measured": measured.to_json(), "simulated": twin.to_json()})
    )
    render_png(
        [measured, twin],
        run_dir / "timeline.png",
        titles=["measured (last step)", "simulated with the measured stage times and hand-offs"],
    )
    write_chrome_trace([measured, twin], run_dir / "trace.json")


def _layout_label(cfg: TrainConfig) -> str:
    layout = cfg.parallel_layout()
    if layout.world == layout.pp:
        return f"{layout.pp} workers {cfg.schedule}"
    return f"dp{layout.dp} pp{layout.pp} tp{layout.tp} {cfg.schedule}"


def _progress(cfg: TrainConfig, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps,
        initial=start,
        desc=_layout_label(cfg),
        unit="step",
        dynamic_ncols=True,
    )


def _update_progress(bar: Any, record: dict[str, Any]) -> None:
    post = {
        "loss": f"{record['loss']:.3f}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
        "idle": f"{100 * record['idle']:.0f}%",
    }
    if "val_loss" in record:
        bar.write(f"step {record['step'] + 1}: val loss {record['val_loss']:.3f}")
    for key in ("skipped", "spike"):
        if key in record:
            bar.write(f"step {record['step'] + 1}: {record[key]}")
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def main_worker(cfg: TrainConfig, resume: bool) -> int:
    """Entry point on one rank: train, and turn a lost peer into a one-line error."""
    try:
        train(cfg, resume)
    except PeerError as err:
        print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {err}", flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
