"""Measured step time of every schedule against the simulator's prediction.

Layers of fixed cost (``SleepLayer``: forward F ms, backward B ms, no CPU used) run on p
worker processes over gloo. For each schedule and micro-batch count the script reports the
median step time after a warm-up and the measured makespan (first action start to last
action end, without the step's set-up and loss broadcast), against three predictions:

- *nominal*: the simulator with the layers' nominal costs (F, B) and free messages;
- *before the run*: the simulator with costs measured **before** the run by
  ``Pipeline.calibrate``: one micro-batch through the stages one after another, so each
  stage's forward and backward (or I and W) and each message are seen alone. This is what a
  user can predict ahead of a run, and what the runtime has to match;
- *from the run*: the simulator with the costs the run actually had (``measured_costs``: each
  stage's mean action durations and the median hand-off latency), which separates "the
  layers did not take F and B" and "messages take time" from "the runtime left gaps".

    .venv/bin/python benchmarks/bench_schedules.py --json runs/schedules.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import layerwise as lw
from _common import SleepLayer, median, sleep_loss, table, timed_steps, write_json
from layerwise.job.launcher import run_workers
from layerwise.schedules import chunks_for, names
from layerwise.simulate import measured_costs


def chunks_of(schedule: str) -> int:
    """Return the stages per worker the schedule runs by default (its registry entry)."""
    return chunks_for(schedule, None)


def stage_costs(schedule: str, fwd_ms: float, bwd_ms: float) -> tuple[float, float]:
    """Per-stage (F, B) in ms: each worker's share is F and B, split over its chunks."""
    v = chunks_of(schedule)
    return fwd_ms / v, bwd_ms / v


def predict(schedule: str, p: int, m: int, fwd_ms: float, bwd_ms: float) -> lw.Timeline:
    f, b = stage_costs(schedule, fwd_ms, bwd_ms)
    sched = lw.generate(schedule, p, m, chunks_of(schedule))
    return lw.simulate(sched, lw.Costs.uniform(sched.num_stages, forward=f / 1e3, backward=b / 1e3))


def worker(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    results = []
    for schedule in args["schedules"]:
        for m in args["microbatches"]:
            f, b = stage_costs(schedule, args["fwd_ms"], args["bwd_ms"])
            layers = [SleepLayer(f, b) for _ in range(world * chunks_of(schedule))]
            pipe = lw.Pipeline(layers, schedule=schedule, microbatches=m, loss_fn=sleep_loss)
            x = torch.randn(m * args["rows"], args["width"])
            y = torch.randn(m * args["rows"], args["width"])
            before = pipe.calibrate(x, y)  # costs measured before the run
            timelines: list[lw.Timeline] = []

            def step(pipe: lw.Pipeline = pipe, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)

            def after(pipe: lw.Pipeline = pipe, timelines: list[lw.Timeline] = timelines) -> None:
                timelines.append(pipe.timeline())  # collective
                pipe.zero_grad()

            times = timed_steps(step, args["warmup"], args["steps"], after)
            if rank == 0:
                measured = timelines[args["warmup"] :]
                # the costs the run actually had: mean action durations, median hand-off
                costs = measured_costs(measured, pipe.schedule)
                sched = pipe.schedule
                results.append(
                    {
                        "schedule": schedule,
                        "microbatches": m,
                        "step_s": median(times),
                        "step_s_all": times,
                        "makespan_s": median([tl.makespan() for tl in measured]),
                        "bubble_measured": median([tl.bubble_fraction() for tl in measured]),
                        "from_run_s": lw.simulate(sched, costs).makespan(),
                        "before_run_s": lw.simulate(sched, before).makespan(),
                        "before_run_costs_ms": {
                            "F": [f * 1e3 for f in before.forward],
                            "B": [b * 1e3 for b in before.backward],
                            "latency": before.comm_latency * 1e3,
                        },
                        "peak_inflight_w0": measured[-1].peak_inflight(0),
                        "handoff_s": costs.comm_latency,
                    }
                )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", "-p", type=int, default=4)
    ap.add_argument("--microbatches", "-m", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--schedules", nargs="+", default=list(names()), choices=names())
    ap.add_argument("--fwd-ms", type=float, default=10.0, help="forward per worker (ms)")
    ap.add_argument("--bwd-ms", type=float, default=20.0, help="backward per worker (ms)")
    ap.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--width", type=int, default=8, help="activation width")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    p = args.workers
    config = {k: getattr(args, k) for k in ("schedules", "microbatches", "fwd_ms", "bwd_ms")}
    config.update(rows=args.rows, width=args.width, warmup=args.warmup, steps=args.steps)
    results = run_workers(worker, p, config, timeout_s=600)[0]
    rows = []
    for r in results:
        pred = predict(r["schedule"], p, r["microbatches"], args.fwd_ms, args.bwd_ms)
        r["predicted_s"] = pred.makespan()
        r["bubble_predicted"] = pred.bubble_fraction()
        rows.append(
            [
                r["schedule"],
                r["microbatches"],
                f"{r['predicted_s'] * 1e3:.1f}",
                f"{r['step_s'] * 1e3:.1f}",
                f"{r['step_s'] / r['predicted_s']:.3f}",
                f"{r['makespan_s'] * 1e3:.1f}",
                f"{r['makespan_s'] / r['predicted_s']:.3f}",
                f"{r['before_run_s'] * 1e3:.1f}",
                f"{r['step_s'] / r['before_run_s']:.3f}",
                f"{r['makespan_s'] / r['before_run_s']:.3f}",
                f"{r['from_run_s'] * 1e3:.1f}",
                f"{r['makespan_s'] / r['from_run_s']:.3f}",
                f"{r['before_run_costs_ms']['latency']:.2f} / {r['handoff_s'] * 1e3:.2f}",
                f"{r['bubble_predicted']:.3f} / {r['bubble_measured']:.3f}",
            ]
        )
    print(
        f"p = {p} workers, F = {args.fwd_ms:g} ms, B = {args.bwd_ms:g} ms per worker "
        f"(split over a worker's chunks); median of {args.steps} steps after {args.warmup} "
        f"warm-up\n"
    )
    print(
        table(
            [
                "schedule",
                "m",
                "predicted ms",
                "step ms",
                "step / pred",
                "makespan ms",
                "makespan / pred",
                "before-run pred ms",
                "step / before-run",
                "makespan / before-run",
                "from-run pred ms",
                "makespan / from-run",
                "hand-off before / in run ms",
                "bubble pred / meas",
            ],
            rows,
        )
    )
    write_json(
        args.json,
        {"benchmark": "schedules", "config": {**config, "workers": p}, "results": results},
    )


if __name__ == "__main__":
    main()
