"""layerwise against torch.distributed.pipelining on identical layers and settings.

Each row runs the same layers, partition, batch and micro-batch count through
``layerwise.Pipeline`` and through ``torch.distributed.pipelining`` (``PipelineStage`` + the
matching schedule class) in the same worker processes, alternating one step of each so that
both see the same machine load, and reports the median step times and their ratio (ours /
theirs: below 1 means layerwise is faster). Schedules and their torch counterparts:

    gpipe            ScheduleGPipe                   one stage per worker
    1f1b             Schedule1F1B                    one stage per worker
    interleaved-1f1b ScheduleInterleaved1F1B         two stages per worker, looped
    looped-bfs       ScheduleLoopedBFS               two stages per worker, looped
    interleaved-zb   ScheduleInterleavedZeroBubble   two, looped; backward split in I and W
    zb-v             ScheduleZBVZeroBubble           two, V (worker r: stages r, 2p-1-r); split
    dualpipe-v       ScheduleDualPipeV               two, V; split

With several stages per worker each library gets one ``PipelineStage`` per stage the worker
holds, with the same stage indices, as layerwise placed them. torch splits the backward
itself (``stage_backward_input`` / ``stage_backward_weight`` on the stage's graph), so the
zero-bubble stages need nothing more. A torch schedule that is not in the installed torch,
or that fails to build or to run here, gets its error in the row instead of a time.

- sleep rows (fixed-cost layers, p workers; a worker's F and B split over its stages):
  *nominal* = layerwise's schedule simulated with the layers' nominal costs and free
  messages; for GPipe and 1F1B that is (m + p - 1) * (F + B);
- GPT rows (a small decoder-only transformer, p = 2 on a 2-core machine; GPipe and 1F1B
  only): ideal = sum over stages of (F_s + B_s) + (m - 1) * max over stages of
  (F_s + B_s), with each stage's F and B measured on its own, one micro-batch at a time.

Both libraries use their own process group (same ranks) so their messages never mix; the
torch group waits at most ``--torch-timeout`` seconds, so a torch schedule that hangs ends
in an error row rather than stopping the run.

    .venv/bin/python benchmarks/bench_vs_torch.py -p 4 2 --json runs/vs_torch.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.pipelining.schedules as torch_schedules
from torch import nn
from torch.distributed.pipelining import PipelineStage

import layerwise as lw
from _common import SleepLayer, median, size_problem, sleep_loss, table, timed_steps, write_json
from layerwise.job.launcher import run_workers
from layerwise.models import gpt
from layerwise.schedules import chunks_for, names

# layerwise schedule -> the torch class that runs the same kind of schedule
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
    "interleaved-zb": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble",
    "dualpipe-v": "ScheduleDualPipeV",
}
DEFAULT_SCHEDULES = ("gpipe", "1f1b", "looped-bfs", "interleaved-zb", "zb-v", "dualpipe-v")
ERROR_CHARS = 300  # an error row keeps the first line of the message, this long at most


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


def default_rows(workers: list[int], m: int, gpt_p: int) -> list[Row]:
    mb4 = 4 * 2**20
    rows = []
    for p in workers:
        rows += [
            Row("sleep F=10ms B=20ms", "sleep", p, m, 10.0, 20.0),
            Row("sleep F=2ms B=4ms", "sleep", p, m, 2.0, 4.0),
            Row("sleep F=10ms B=20ms, 4 MB act.", "sleep", p, m, 10.0, 20.0, mb4),
            Row("sleep F=2ms B=4ms, 4 MB act.", "sleep", p, m, 2.0, 4.0, mb4),
        ]
    return [*rows, Row("GPT (d=128, 4 blocks, T=128)", "gpt", gpt_p, m)]


def gpt_config() -> gpt.GPTConfig:
    return gpt.GPTConfig(vocab_size=256, seq_len=128, d_model=128, n_layers=4, n_heads=4)


GPT_ROWS_PER_MB = 4


def make_case(row: Row, chunks: int) -> tuple[list[Any], Any, torch.Tensor, torch.Tensor]:
    """Return (layer specs, loss_fn, inputs, targets) for a row (same on every rank); sleep
    rows get one layer per stage, a worker's F and B split over its ``chunks`` stages."""
    m = row.microbatches
    if row.kind == "gpt":
        cfg = gpt_config()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (m * GPT_ROWS_PER_MB, cfg.seq_len), generator=g)
        targets = torch.randint(0, cfg.vocab_size, tokens.shape, generator=g)
        return list(gpt.gpt_layers(cfg)), gpt.loss_fn, tokens, targets
    width = max(1, row.act_bytes // 4)  # one row of float32 per micro-batch
    f, b = row.fwd_ms / chunks, row.bwd_ms / chunks
    layers = [SleepLayer(f, b) for _ in range(row.workers * chunks)]
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


@dataclass
class Theirs:
    """torch's side of a row: its schedule object and this rank's stage modules."""

    schedule: Any
    modules: list[nn.Module]
    holds_first: bool
    holds_last: bool


def build_theirs(
    name: str, pipe: lw.Pipeline, loss_fn: Any, m: int, group: dist.ProcessGroup
) -> Theirs:
    """Build torch's schedule on copies of this rank's layerwise stages (same stage indices,
    same layers and weights). Raises whatever torch raises for these sizes."""
    cls = getattr(torch_schedules, TORCH_SCHEDULES[name], None)
    if cls is None:
        raise RuntimeError(f"{TORCH_SCHEDULES[name]} is not in torch {torch.__version__}")
    num_stages = pipe.schedule.num_stages
    modules: list[nn.Module] = []
    stages = []
    for s in sorted(pipe.stages):
        module = nn.Sequential(*copy.deepcopy(list(pipe.stages[s].layers)))
        modules.append(module)
        stages.append(PipelineStage(module, s, num_stages, torch.device("cpu"), group=group))
    single = issubclass(cls, torch_schedules.PipelineScheduleSingle)
    if single and len(stages) != 1:
        raise RuntimeError(f"{cls.__name__} runs one stage per rank, got {len(stages)}")
    schedule = cls(stages[0] if single else stages, m, loss_fn=loss_fn)
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    return Theirs(schedule, modules, first, last)


def theirs_step(theirs: Theirs, x: Any, y: Any, failed: list[str]) -> None:
    """One torch step; an error is kept in ``failed`` rather than raised, so that every rank
    still reaches the step's timing collective (peers stuck in a receive time out there)."""
    if failed:
        return
    try:
        args = (x,) if theirs.holds_first else ()
        if theirs.holds_last:  # with V stages the first rank holds the last stage too
            theirs.schedule.step(*args, target=y, losses=[], return_outputs=False)
        else:
            theirs.schedule.step(*args, return_outputs=False)
    except Exception as e:
        failed.append(describe(e))
    for module in theirs.modules:
        module.zero_grad(set_to_none=True)


def describe(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    # a "|" would end the markdown cell the message goes in
    return f"{type(e).__name__}: {first}"[:ERROR_CHARS].replace("|", "/")


def agreed_error(mine: str | None) -> str | None:
    """Return every rank's error, if any rank has one (collective), so that every rank
    stops running torch's side at the same step. All of them: the rank that failed first
    names the cause, its peers only time out waiting for it."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ranks: dict[str, list[str]] = {}  # message -> the ranks that had it
    for r, e in enumerate(everyone):
        if e:
            ranks.setdefault(e, []).append(str(r))
    found = [f"rank{'s' * (len(rs) > 1)} {', '.join(rs)}: {e}" for e, rs in ranks.items()]
    return "; ".join(found) if found else None


@dataclass
class Groups:
    """Each library's process group over the same ranks, so their messages never mix.

    Kept from pair to pair; torch's is replaced after a failure, which may leave messages
    of the failed step behind in it."""

    ours: dist.ProcessGroup
    theirs: dist.ProcessGroup
    torch_timeout_s: float

    @staticmethod
    def new(world: int, torch_timeout_s: float) -> Groups:
        ours = dist.new_group(list(range(world)))
        return Groups(ours, Groups.new_theirs(world, torch_timeout_s), torch_timeout_s)

    @staticmethod
    def new_theirs(world: int, torch_timeout_s: float) -> dist.ProcessGroup:
        timeout = timedelta(seconds=torch_timeout_s)
        return dist.new_group(list(range(world)), timeout=timeout)


def run_pair(
    rank: int, row: Row, name: str, warmup: int, steps: int, groups: Groups
) -> dict[str, Any]:
    """Alternate steps of layerwise and torch on one row and schedule; return the figures."""
    p, m = row.workers, row.microbatches
    specs, loss_fn, x, y = make_case(row, chunks_for(name, None))
    pipe = lw.Pipeline(specs, schedule=name, microbatches=m, loss_fn=loss_fn, group=groups.ours)
    ours = functools.partial(
        ours_step, pipe, x if pipe.is_first else None, y if pipe.is_last else None
    )
    error: str | None = None
    theirs: Theirs | None = None
    try:
        theirs = build_theirs(name, pipe, loss_fn, m, groups.theirs)
    except Exception as e:
        error = describe(e)
    error = agreed_error(error)
    failed: list[str] = []
    t_ours: list[float] = []
    t_theirs: list[float] = []
    for i in range(warmup + steps):  # alternate, so both see the same machine load
        a = timed_steps(ours, 0, 1)
        b: list[float] = []
        if error is None and theirs is not None:
            step = functools.partial(
                theirs_step,
                theirs,
                x if theirs.holds_first else None,
                y if theirs.holds_last else None,
                failed,
            )
            b = timed_steps(step, 0, 1)
            error = agreed_error(failed[0] if failed else None)
        if i >= warmup:
            t_ours += a
            t_theirs += b
    ideal = ideal_step(row, rank, pipe, specs, x)
    pipe.close()
    if error is not None:  # every rank knows (agreed_error), so all make the new group
        groups.theirs = Groups.new_theirs(p, groups.torch_timeout_s)
    return {
        **asdict(row),
        "schedule": name,
        "torch_schedule": TORCH_SCHEDULES[name],
        "chunks": pipe.schedule.chunks,
        "ours_s": median(t_ours),
        "theirs_s": median(t_theirs) if error is None else None,
        "ours_all": t_ours,
        "theirs_all": t_theirs if error is None else [],
        "theirs_error": error,
        "ideal_s": ideal,
    }


def worker(
    rank: int,
    world: int,
    rows: list[dict[str, Any]],
    schedules: list[str],
    warmup: int,
    steps: int,
    torch_timeout_s: float,
) -> Any:
    torch.set_num_threads(1)
    groups = Groups.new(world, torch_timeout_s)
    results = []
    for rd in rows:
        row = Row(**rd)
        assert row.workers == world, "rows run in groups of equal worker counts"
        for name in row_schedules(row, schedules):
            result = run_pair(rank, row, name, warmup, steps, groups)
            if rank == 0:
                results.append(result)
            dist.barrier()
    return results


def row_schedules(row: Row, schedules: list[str]) -> list[str]:
    """The schedules a row runs: GPT rows only those with one stage per worker (its ideal
    step is theirs); those whose sizes the registry refuses run nowhere."""
    if row.kind == "gpt":
        schedules = [s for s in schedules if chunks_for(s, None) == 1]
    return [s for s in schedules if size_problem(s, row.workers, row.microbatches) is None]


def ideal_step(row: Row, rank: int, pipe: lw.Pipeline, specs: list[Any], x: torch.Tensor) -> float:
    """The nominal step of this row's layerwise schedule (collective over the row's ranks
    for GPT rows, which measure each stage alone)."""
    p, m = row.workers, row.microbatches
    if row.kind == "sleep":
        v = pipe.schedule.chunks
        costs = lw.Costs.uniform(
            pipe.schedule.num_stages, forward=row.fwd_ms / v / 1e3, backward=row.bwd_ms / v / 1e3
        )
        return lw.simulate(pipe.schedule, costs).makespan()
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
    module = nn.Sequential(*copy.deepcopy(list(pipe.stages[rank].layers)))
    f, b = stage_costs(module, value, head)
    per_stage: list[Any] = [None] * p
    dist.all_gather_object(per_stage, f + b, group=pipe.group)
    return float(sum(per_stage) + (m - 1) * max(per_stage))


def report_row(r: dict[str, Any]) -> list[Any]:
    ours, theirs, ideal = r["ours_s"], r["theirs_s"], r["ideal_s"]
    if theirs is None:
        torch_cells = [f"error: {r['theirs_error']}", "-", "-", "-"]
    else:
        fastest = min(r["ours_all"]) / min(r["theirs_all"])
        torch_cells = [
            f"{theirs * 1e3:.1f}",
            f"{ours / theirs:.3f}",
            f"{fastest:.3f}",
            f"{theirs / ideal:.3f}",
        ]
    return [
        r["label"],
        r["workers"],
        r["schedule"],
        r["torch_schedule"],
        f"{ideal * 1e3:.1f}",
        f"{ours * 1e3:.1f}",
        torch_cells[0],
        torch_cells[1],
        torch_cells[2],
        f"{ours / ideal:.3f}",
        torch_cells[3],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--workers", "-p", type=int, nargs="+", default=[4], help="workers for the sleep rows"
    )
    ap.add_argument("--gpt-workers", type=int, default=2, help="workers for the GPT row")
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument(
        "--rows",
        nargs="+",
        type=int,
        help="row numbers to run: 0-3 the sleep rows of the first -p, 4-7 of the second..., "
        "then the GPT row (default: all)",
    )
    ap.add_argument(
        "--schedules",
        nargs="+",
        default=list(DEFAULT_SCHEDULES),
        choices=[n for n in TORCH_SCHEDULES if n in names()],
        help=f"layerwise schedules to compare (default: {' '.join(DEFAULT_SCHEDULES)})",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--torch-timeout",
        type=float,
        default=60.0,
        help="seconds a torch step may wait on a peer before its row records an error",
    )
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    rows = default_rows(args.workers, args.microbatches, args.gpt_workers)
    if args.rows:
        rows = [rows[i] for i in args.rows]
    skipped = [
        [r.label, r.workers, s, problem]
        for r in rows
        for s in args.schedules
        if (problem := size_problem(s, r.workers, r.microbatches)) is not None
    ]
    results = []
    for p in sorted({r.workers for r in rows}, reverse=True):  # one process group per size
        same = [asdict(r) for r in rows if r.workers == p]
        results += run_workers(
            worker, p, same, args.schedules, args.warmup, args.steps, args.torch_timeout,
            timeout_s=600,
        )[0]  # fmt: skip
    print(
        f"m = {args.microbatches} micro-batches; median of {args.steps} steps after "
        f"{args.warmup} warm-up, alternating layerwise and torch steps; torch {torch.__version__}"
        f"\nnominal: layerwise's schedule simulated with the layers' costs, free messages "
        f"(GPT: ideal from each stage measured alone)\n"
    )
    print(
        table(
            [
                "row",
                "p",
                "schedule",
                "torch class",
                "nominal ms",
                "layerwise ms",
                "torch ms",
                "ours / theirs",
                "fastest step ours / theirs",
                "ours / nominal",
                "theirs / nominal",
            ],
            [report_row(r) for r in results],
        )
    )
    if skipped:
        print("\nSkipped (the registry refuses these sizes):\n")
        print(table(["row", "p", "schedule", "why"], skipped))
    write_json(
        args.json,
        {"benchmark": "vs_torch", "config": vars(args), "results": results, "skipped": skipped},
    )


if __name__ == "__main__":
    main()
