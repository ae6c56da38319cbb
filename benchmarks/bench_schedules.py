"""Measured step time of every schedule against the simulator's prediction.

Layers of fixed cost (``SleepLayer``: forward F ms, backward B ms, no CPU used) run on p
worker processes over gloo. Every registered schedule runs (or those ``--schedules`` picks;
``new`` = the ones added with the V placement and split backward), with its own stages per
worker and placement from the registry; a worker's F and B are split over its stages. A
schedule whose sizes the registry refuses is listed as skipped, with the registry's message.

Split-backward schedules run once more per ``--wgrad-ms`` value: the layers' backward is
then I = B - W ms followed by W ms (per worker), so zero-bubble schedules are also measured
where W is not B/2. The other schedules run a full B and would give the same step again.

``auto`` is synthesized from this pipeline's own costs: a pipeline with auto's registry
schedule measures them (``Pipeline.calibrate``), ``synthesize(costs, p, m, memory_cap=p)``
searches for the order, and the pipeline runs that Schedule object; its before-run
prediction uses those same costs (the stages are the same).

For each case the script reports the median step time after a warm-up and the measured
makespan (first action start to last action end), against three predictions:

- *nominal*: the simulator with the layers' nominal costs (F, I, W) and free messages;
- *before the run*: the simulator with costs measured **before** the run by
  ``Pipeline.calibrate``: one micro-batch through the stages one after another, so each
  stage's forward and backward (or I and W) and each message are seen alone. This is what a
  user can predict ahead of a run, and what the runtime has to match; rows whose step is
  more than 5 % off it are flagged;
- *from the run*: the simulator with the costs the run actually had (``measured_costs``: each
  stage's mean action durations and the median hand-off latency), which separates "the
  layers did not take F and B" and "messages take time" from "the runtime left gaps".

    .venv/bin/python benchmarks/bench_schedules.py --json runs/schedules.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import layerwise as lw
from _common import (
    SCHEDULE_GROUPS,
    SleepLayer,
    median,
    pick_schedules,
    size_problem,
    sleep_loss,
    table,
    timed_steps,
    write_json,
)
from layerwise.job.launcher import run_workers
from layerwise.schedules import Schedule, chunks_for, get, names, stage_worker
from layerwise.simulate import measured_costs

AUTO = "auto"
FLAG_OVER = 0.05  # a step further than this from the before-run prediction is flagged


def case_list(
    schedules: list[str], microbatches: list[int], p: int, bwd_ms: float, wgrad_ms: list[float]
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Return the (schedule, m, W) cases to run and the skipped ones with the reason.

    The first W is every schedule's run; further W values only matter to schedules that
    split the backward, so only they run again."""
    if any(not 0 <= w <= bwd_ms for w in wgrad_ms):
        raise SystemExit(f"--wgrad-ms values must lie in [0, B = {bwd_ms:g}], got {wgrad_ms}")
    cases, skipped = [], []
    for i, wgrad in enumerate(wgrad_ms):
        for name in schedules:
            if i > 0 and not get(name).split_backward:
                continue
            for m in microbatches:
                problem = size_problem(name, p, m)
                if problem is not None:
                    if i == 0:  # once, not again for each W
                        skipped.append([name, str(m), problem])
                    continue
                cases.append({"schedule": name, "microbatches": m, "wgrad_ms": wgrad})
    return cases, skipped


def nominal_costs(schedule: Schedule, fwd_ms: float, bwd_ms: float, wgrad_ms: float) -> lw.Costs:
    """The layers' nominal per-stage costs (a worker's share split over its stages), free
    messages."""
    v = schedule.chunks
    return lw.Costs.uniform(
        schedule.num_stages,
        forward=fwd_ms / v / 1e3,
        backward=bwd_ms / v / 1e3,
        weight_grad=wgrad_ms / v / 1e3,
    )


def synthesized(
    make_layers: Callable[[], list[SleepLayer]], m: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[Schedule, lw.Costs]:
    """Return ``auto``'s schedule for these layers' measured costs, and those costs.

    Collective. The costs come from a pipeline running auto's registry schedule (one stage
    per worker, split backward), so I and W are each measured. The first rank searches and
    sends the result to the others: every worker must run the very same order, and the
    search may stop on a time limit, where machines (and processes) differ."""
    # imported here: a checkout without auto still runs every other schedule
    from layerwise.schedules import synthesize

    seed = lw.Pipeline(make_layers(), schedule=AUTO, microbatches=m, loss_fn=sleep_loss)
    costs = seed.calibrate(x, y)
    seed.close()
    p = seed.num_workers
    found: list[Any] = [None]
    if dist.get_rank() == 0:
        found[0] = synthesize(costs, p, m, memory_cap=p)
    dist.broadcast_object_list(found, src=0)
    return found[0], costs


def run_case(world: int, case: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Run one (schedule, m, W) case on every rank; return its figures (rank 0's are used)."""
    name, m, wgrad = case["schedule"], case["microbatches"], case["wgrad_ms"]
    fwd, bwd = args["fwd_ms"], args["bwd_ms"]
    v = chunks_for(name, None)

    def make_layers() -> list[SleepLayer]:
        return [
            SleepLayer.with_split(fwd / v, (bwd - wgrad) / v, wgrad / v) for _ in range(world * v)
        ]

    x = torch.randn(m * args["rows"], args["width"])
    y = torch.randn(m * args["rows"], args["width"])
    if name == AUTO:
        found, before = synthesized(make_layers, m, x, y)
        pipe = lw.Pipeline(make_layers(), schedule=found, microbatches=m, loss_fn=sleep_loss)
    else:
        pipe = lw.Pipeline(make_layers(), schedule=name, microbatches=m, loss_fn=sleep_loss)
        before = pipe.calibrate(x, y)  # costs measured before the run
    timelines: list[lw.Timeline] = []

    def step() -> None:
        pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)

    def after() -> None:
        timelines.append(pipe.timeline())  # collective
        pipe.zero_grad()

    times = timed_steps(step, args["warmup"], args["steps"], after)
    pipe.close()
    measured = timelines[args["warmup"] :]
    sched = pipe.schedule
    # the costs the run actually had: mean action durations, median hand-off
    costs = measured_costs(measured, sched)
    nominal = lw.simulate(sched, nominal_costs(sched, fwd, bwd, wgrad))
    return {
        **case,
        "chunks": sched.chunks,
        "placement": placement_of(sched),
        "split_backward": bool(sched.split_stages),
        "step_s": median(times),
        "step_s_all": times,
        "makespan_s": median([tl.makespan() for tl in measured]),
        "bubble_measured": median([tl.bubble_fraction() for tl in measured]),
        "nominal_s": nominal.makespan(),
        "bubble_nominal": nominal.bubble_fraction(),
        "from_run_s": lw.simulate(sched, costs).makespan(),
        "before_run_s": lw.simulate(sched, before).makespan(),
        "before_run_costs_ms": {
            "F": [f * 1e3 for f in before.forward],
            "B": [b * 1e3 for b in before.backward],
            "I": [i * 1e3 for i in before.input_grad],
            "W": [w * 1e3 for w in before.weight_grad],
            "latency": before.comm_latency * 1e3,
        },
        "peak_inflight_w0": measured[-1].peak_inflight(0),
        "handoff_s": costs.comm_latency,
    }


def worker(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    results = []
    for case in args["cases"]:
        row = run_case(world, case, args)
        if rank == 0:
            results.append(row)
    return results


def placement_of(schedule: Schedule) -> str:
    """Return "v" or "looped" (what a synthesized schedule chose; one stage: "looped")."""
    v = schedule.chunks
    return (
        "v"
        if v > 1 and schedule.stage_worker == stage_worker("v", schedule.num_workers, v)
        else "looped"
    )


def case_name(r: dict[str, Any]) -> str:
    w = f", W={r['wgrad_ms']:g}" if r["split_backward"] else ""
    return f"{r['schedule']} (m={r['microbatches']}{w})"


def flag(ratio: float) -> str:
    return f"**off by {abs(ratio - 1) * 100:.1f} %**" if abs(ratio - 1) > FLAG_OVER else "ok"


def report_row(r: dict[str, Any]) -> list[Any]:
    ratio = r["step_s"] / r["before_run_s"]
    return [
        r["schedule"],
        f"{r['chunks']} {r['placement']}",
        r["microbatches"],
        f"{r['wgrad_ms']:g}" if r["split_backward"] else "-",
        f"{r['nominal_s'] * 1e3:.1f}",
        f"{r['before_run_s'] * 1e3:.1f}",
        f"{r['step_s'] * 1e3:.1f}",
        f"{ratio:.3f}",
        flag(ratio),
        f"{r['step_s'] / r['nominal_s']:.3f}",
        f"{r['makespan_s'] / r['before_run_s']:.3f}",
        f"{r['from_run_s'] * 1e3:.1f}",
        f"{r['makespan_s'] / r['from_run_s']:.3f}",
        f"{r['before_run_costs_ms']['latency']:.2f} / {r['handoff_s'] * 1e3:.2f}",
        f"{r['bubble_nominal']:.3f} / {r['bubble_measured']:.3f}",
    ]


HEADERS = [
    "schedule",
    "stages/worker",
    "m",
    "W ms",
    "nominal ms",
    "before-run pred ms",
    "step ms",
    "step / before-run",
    "within 5 %",
    "step / nominal",
    "makespan / before-run",
    "from-run pred ms",
    "makespan / from-run",
    "hand-off before / in run ms",
    "bubble nominal / meas",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", "-p", type=int, default=4)
    ap.add_argument("--microbatches", "-m", type=int, nargs="+", default=[8])
    ap.add_argument(
        "--schedules",
        nargs="+",
        default=["all"],
        choices=[*SCHEDULE_GROUPS, *names()],
        help="registered names, 'all' (default) or 'new' (the schedules added with the V "
        "placement and split backward, auto included when registered)",
    )
    ap.add_argument("--fwd-ms", type=float, default=10.0, help="forward per worker (ms)")
    ap.add_argument("--bwd-ms", type=float, default=20.0, help="backward per worker (ms)")
    ap.add_argument(
        "--wgrad-ms",
        type=float,
        nargs="+",
        help="W per worker (ms; I = B - W): one run per value, the first for every schedule, "
        "the others for split-backward schedules only (default: B/2, then 0.3 B)",
    )
    ap.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--width", type=int, default=8, help="activation width")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    p = args.workers
    wgrad_ms = args.wgrad_ms or [args.bwd_ms / 2, 0.3 * args.bwd_ms]
    schedules = pick_schedules(args.schedules)
    cases, skipped = case_list(schedules, args.microbatches, p, args.bwd_ms, wgrad_ms)
    config: dict[str, Any] = {
        "schedules": schedules,
        "microbatches": args.microbatches,
        "fwd_ms": args.fwd_ms,
        "bwd_ms": args.bwd_ms,
        "wgrad_ms": wgrad_ms,
        "rows": args.rows,
        "width": args.width,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    results = run_workers(worker, p, {**config, "cases": cases}, timeout_s=600)[0] if cases else []
    print(
        f"p = {p} workers, F = {args.fwd_ms:g} ms, B = {args.bwd_ms:g} ms per worker (split "
        f"over a worker's stages; split backward: I = B - W, then W); median of {args.steps} "
        f"steps after {args.warmup} warm-up\n"
    )
    print(table(HEADERS, [report_row(r) for r in results]))
    flagged = [r for r in results if abs(r["step_s"] / r["before_run_s"] - 1) > FLAG_OVER]
    print(
        f"\n{len(results) - len(flagged)} of {len(results)} rows within 5 % of the "
        f"before-run prediction"
        + (": off are " + ", ".join(case_name(r) for r in flagged) if flagged else "")
    )
    if skipped:
        print("\nSkipped (the registry refuses these sizes):\n")
        print(table(["schedule", "m", "why"], skipped))
    write_json(
        args.json,
        {
            "benchmark": "schedules",
            "config": {**config, "workers": p},
            "results": results,
            "skipped": [{"schedule": s, "microbatches": int(m), "why": w} for s, m, w in skipped],
        },
    )


if __name__ == "__main__":
    main()
