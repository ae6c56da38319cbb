"""layerwise against torch.distributed.pipelining on identical layers and settings.

Each row runs the same layers, partition, batch and micro-batch count through
``layerwise.Pipeline`` and through ``torch.distributed.pipelining`` (``PipelineStage`` +
``ScheduleGPipe`` / ``Schedule1F1B``) in the same worker processes, alternating one step of
each so that both see the same machine load, and reports the median step times, their
ratio (ours / theirs: below 1 means layerwise is faster) and each against the ideal step:

- sleep rows (fixed-cost layers, p workers): ideal = (m + p - 1) * (F + B), the step of a
  perfect GPipe or 1F1B with free communication;
- GPT rows (a small decoder-only transformer, p = 2 on a 2-core machine): the same formula
  with each stage's F and B measured on its own, one micro-batch at a time, outside any
  pipeline: ideal = sum over stages of (F_s + B_s) + (m - 1) * max over stages of (F_s + B_s).

Both libraries use their own process group (same ranks) so their messages never mix.

    .venv/bin/python benchmarks/bench_vs_torch.py --json runs/vs_torch.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import layerwise as lw
from _common import SleepLayer, median, sleep_loss, table, timed_steps, write_json
from layerwise.job.launcher import run_workers
from layerwise.models import gpt

TORCH_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


@dataclass
class Row:
    """One benchmark row: a kind of model and its settings."""

    label: str
    kind: str  # "sleep" or "gpt"
    workers: int
    microbatches: int
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    act_bytes: int = 64  # bytes of one micro-batch's activation (sleep rows)


def default_rows(p: int, m: int, gpt_p: int) -> list[Row]:
    mb4 = 4 * 2**20
    return [
        Row("sleep F=10ms B=20ms", "sleep", p, m, 10.0, 20.0),
        Row("sleep F=2ms B=4ms", "sleep", p, m, 2.0, 4.0),
        Row("sleep F=10ms B=20ms, 4 MB act.", "sleep", p, m, 10.0, 20.0, mb4),
        Row("sleep F=2ms B=4ms, 4 MB act.", "sleep", p, m, 2.0, 4.0, mb4),
        Row("GPT (d=128, 4 blocks, T=128)", "gpt", gpt_p, m),
    ]


def gpt_config() -> gpt.GPTConfig:
    return gpt.GPTConfig(vocab_size=256, seq_len=128, d_model=128, n_layers=4, n_heads=4)


GPT_ROWS_PER_MB = 4


def make_case(row: Row) -> tuple[list[Any], Any, torch.Tensor, torch.Tensor]:
    """Return (layer specs, loss_fn, inputs, targets) for a row (same on every rank)."""
    m = row.microbatches
    if row.kind == "gpt":
        cfg = gpt_config()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (m * GPT_ROWS_PER_MB, cfg.seq_len), generator=g)
        targets = torch.randint(0, cfg.vocab_size, tokens.shape, generator=g)
        return list(gpt.gpt_layers(cfg)), gpt.loss_fn, tokens, targets
    width = max(1, row.act_bytes // 4)  # one row of float32 per micro-batch
    layers = [SleepLayer(row.fwd_ms, row.bwd_ms) for _ in range(row.workers)]
    x = torch.randn(m, width)
    y = torch.zeros(m, 1)
    return layers, sleep_loss, x, y


def build(spec: Any) -> nn.Module:
    return spec if isinstance(spec, nn.Module) else spec()


def stage_costs(stage: nn.Module, x: Any, head: Any, reps: int = 10) -> tuple[float, float]:
    """Median forward and backward time of one micro-batch through ``stage`` alone."""
    fw, bw = [], []
    for _ in range(reps + 1):
        inp = x.detach().requires_grad_(x.is_floating_point())
        t0 = time.perf_counter()
        out = stage(inp)
        root = head(out) if head is not None else out
        t2 = time.perf_counter()
        root.backward(None if head is not None else torch.ones_like(out))
        t3 = time.perf_counter()
        fw.append(t2 - t0)  # the loss counts as part of the last stage's forward
        bw.append(t3 - t2)
        stage.zero_grad(set_to_none=True)
    return median(fw[1:]), median(bw[1:])


def ours_step(pipe: lw.Pipeline, x: Any, y: Any) -> None:
    pipe.train_step(x, y)
    pipe.zero_grad()


def theirs_step(sched: Any, module: nn.Module, x: Any, y: Any) -> None:
    if x is not None:
        sched.step(x, return_outputs=False)
    elif y is not None:
        sched.step(target=y, losses=[], return_outputs=False)
    else:
        sched.step(return_outputs=False)
    module.zero_grad(set_to_none=True)


def worker(rank: int, world: int, rows: list[dict[str, Any]], warmup: int, steps: int) -> Any:
    torch.set_num_threads(1)
    results = []
    for rd in rows:
        row = Row(**rd)
        p = row.workers
        assert p == world, "rows run in groups of equal worker counts"
        ours_group = dist.new_group(list(range(p)))
        theirs_group = dist.new_group(list(range(p)))
        specs, loss_fn, x, y = make_case(row)
        m = row.microbatches
        ideal: float | None = None
        for name, torch_schedule in TORCH_SCHEDULES.items():
            pipe = lw.Pipeline(
                specs, schedule=name, microbatches=m, loss_fn=loss_fn, group=ours_group
            )
            # torch gets the very same layers: same partition, a copy of the same weights
            module = nn.Sequential(*copy.deepcopy(list(pipe.stages[rank].layers)))
            stage = PipelineStage(module, rank, p, torch.device("cpu"), group=theirs_group)
            sched = torch_schedule(stage, m, loss_fn=loss_fn)
            first, last = rank == 0, rank == p - 1

            ours = functools.partial(ours_step, pipe, x if first else None, y if last else None)
            theirs = functools.partial(
                theirs_step, sched, module, x if first else None, y if last else None
            )
            t_ours: list[float] = []
            t_theirs: list[float] = []
            for i in range(warmup + steps):  # alternate, so both see the same machine load
                a = timed_steps(ours, 0, 1)
                b = timed_steps(theirs, 0, 1)
                if i >= warmup:
                    t_ours += a
                    t_theirs += b
            if ideal is None:  # once per row
                ideal = ideal_step(row, rank, module, pipe, specs, x)
            if rank == 0:
                results.append(
                    {
                        **asdict(row),
                        "schedule": name,
                        "ours_s": median(t_ours),
                        "theirs_s": median(t_theirs),
                        "ours_all": t_ours,
                        "theirs_all": t_theirs,
                        "ideal_s": ideal,
                    }
                )
            dist.barrier(group=ours_group)
    return results


def ideal_step(
    row: Row, rank: int, module: nn.Module, pipe: lw.Pipeline, specs: list[Any], x: torch.Tensor
) -> float:
    """The ideal step of a GPipe/1F1B pipeline for this row (collective over the row's ranks)."""
    p, m = row.workers, row.microbatches
    if row.kind == "sleep":
        return (m + p - 1) * (row.fwd_ms + row.bwd_ms) / 1e3
    # measure each stage alone on one micro-batch; only the first stage has real inputs, so
    # every stage receives the previous stages' output for micro-batch 0, computed here
    mb = x[: x.shape[0] // m]
    value: Any = mb
    with torch.no_grad():
        for s in range(rank):
            for i in pipe.partition.ranges[s]:
                value = build(specs[i])(value)
    head = None
    if rank == p - 1:
        tgt = torch.zeros(mb.shape, dtype=torch.long)
        head = lambda out: gpt.loss_fn(out, tgt)  # noqa: E731
    f, b = stage_costs(module, value, head)
    costs: list[Any] = [None] * p
    dist.all_gather_object(costs, f + b, group=pipe.group)
    return float(sum(costs) + (m - 1) * max(costs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", "-p", type=int, default=4, help="workers for the sleep rows")
    ap.add_argument("--gpt-workers", type=int, default=2, help="workers for the GPT row")
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument("--rows", nargs="+", type=int, help="row numbers to run (default: all)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    rows = default_rows(args.workers, args.microbatches, args.gpt_workers)
    if args.rows:
        rows = [rows[i] for i in args.rows]
    results = []
    for p in sorted({r.workers for r in rows}, reverse=True):  # one process group per size
        same = [asdict(r) for r in rows if r.workers == p]
        results += run_workers(worker, p, same, args.warmup, args.steps, timeout_s=600)[0]
    out = []
    for r in results:
        out.append(
            [
                r["label"],
                r["workers"],
                r["schedule"],
                f"{r['ideal_s'] * 1e3:.1f}",
                f"{r['ours_s'] * 1e3:.1f}",
                f"{r['theirs_s'] * 1e3:.1f}",
                f"{r['ours_s'] / r['theirs_s']:.3f}",
                f"{r['ours_s'] / r['ideal_s']:.3f}",
                f"{r['theirs_s'] / r['ideal_s']:.3f}",
            ]
        )
    print(
        f"m = {args.microbatches} micro-batches; median of {args.steps} steps after "
        f"{args.warmup} warm-up, alternating layerwise and torch steps; torch {torch.__version__}\n"
    )
    print(
        table(
            [
                "row",
                "p",
                "schedule",
                "ideal ms",
                "layerwise ms",
                "torch ms",
                "ours / theirs",
                "ours / ideal",
                "theirs / ideal",
            ],
            out,
        )
    )
    write_json(args.json, {"benchmark": "vs_torch", "config": vars(args), "results": results})


if __name__ == "__main__":
    main()
