"""Speed of the pure parts at scale: generating, validating and simulating schedules.

For each schedule at p workers and m micro-batches (default 64 x 512), times separately:
the generator alone (``ScheduleSpec.build``; ``generate()`` also validates), the
validator (``validate``: structure check + deadlock-free execution order), ``simulate``
with uniform costs, and the timeline metrics (makespan, bubble, peak in-flight of worker 0).
Each is the median of ``--repeats`` runs in this process.

    .venv/bin/python benchmarks/bench_simulator.py --json runs/simulator.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from _common import median, table, write_json
from layerwise.schedules import Schedule, chunks_for, get, names, validate
from layerwise.simulate import Costs, simulate


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return median(times), out


def make(name: str, p: int, m: int) -> Schedule:
    """Return the generator's schedule with the schedule's default chunks, not validated."""
    return get(name).build(p, m, chunks_for(name, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", "-p", type=int, default=64)
    ap.add_argument("--microbatches", "-m", type=int, default=512)
    ap.add_argument("--schedules", nargs="+", default=list(names()), choices=names())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    p, m = args.workers, args.microbatches
    rows, results = [], []
    for name in args.schedules:
        t_gen, sched = timed(lambda name=name: make(name, p, m), args.repeats)
        t_val, _ = timed(lambda sched=sched: validate(sched), args.repeats)
        costs = Costs.uniform(sched.num_stages, forward=1.0, backward=2.0)
        t_sim, tl = timed(lambda sched=sched, costs=costs: simulate(sched, costs), args.repeats)
        t_met, _ = timed(
            lambda tl=tl: (tl.makespan(), tl.bubble_fraction(), tl.peak_inflight(0)), args.repeats
        )
        actions = sum(len(a) for a in sched.actions)
        results.append(
            {
                "schedule": name,
                "actions": actions,
                "generate_s": t_gen,
                "validate_s": t_val,
                "simulate_s": t_sim,
                "metrics_s": t_met,
                "makespan": tl.makespan(),
                "bubble": tl.bubble_fraction(),
            }
        )
        rows.append(
            [
                name,
                actions,
                f"{t_gen * 1e3:.1f}",
                f"{t_val * 1e3:.1f}",
                f"{t_sim * 1e3:.1f}",
                f"{t_met * 1e3:.1f}",
                f"{actions / t_sim / 1e3:.0f}",
                f"{tl.bubble_fraction():.4f}",
            ]
        )
    print(
        f"p = {p} workers, m = {m} micro-batches (each schedule's default chunks); "
        f"median of {args.repeats} runs\n"
    )
    print(
        table(
            [
                "schedule",
                "actions",
                "generate ms",
                "validate ms",
                "simulate ms",
                "metrics ms",
                "sim. k actions/s",
                "bubble (F=1, B=2)",
            ],
            rows,
        )
    )
    write_json(
        args.json,
        {"benchmark": "simulator", "config": {"workers": p, "microbatches": m}, "results": results},
    )


if __name__ == "__main__":
    main()
