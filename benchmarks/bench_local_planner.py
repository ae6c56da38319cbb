"""``layerwise plan --local`` against measured ``layerwise train`` step times on this CPU.

The base case is ``layerwise train``'s default job (4 pipeline workers, 1F1B, 8
micro-batches, ``--layers 4 --d-model 128 --heads 4 --seq-len 128 --batch-size 32``); the
variants change one thing each: 2 workers, the GPipe schedule, 4 micro-batches. Each is
trained for ``--steps`` steps (sequentially) and the median step time after ``--skip``
warm-up steps is set against the planner's prediction for the same pipeline (dp = 1,
pp = workers, micro-batch = batch / micro-batches sequences).

``plan --local`` has no schedule option (``predict_local`` always simulates 1F1B) and no
stage balance option (it gives every worker ``layers / pp`` transformer blocks and leaves out
the embedding, the output layer, the loss and the optimizer step). For the GPipe variant the
table therefore shows the 1F1B prediction, marked as such: the planner's simulator gives
GPipe and 1F1B the same makespan for equal stages without a memory limit, so it is also
what the planner would say if it could be asked.

    .venv/bin/python benchmarks/bench_local_planner.py --json runs/bench_local_planner/results.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _common import table, write_json
from bench_layouts import ROOT, block_times, plan_repeated, predictions, train_run, write_corpus

BASE: dict[str, Any] = {"workers": 4, "schedule": "1f1b", "microbatches": 8}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("--workers 2", {"workers": 2}),
    ("--schedule gpipe", {"schedule": "gpipe"}),
    ("--microbatches 4", {"microbatches": 4}),
]
MODEL = {"layers": 4, "d_model": 128, "heads": 4, "seq_len": 128, "batch_size": 32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--plan-repeats", type=int, default=3, help="planner runs before and after")
    ap.add_argument("--out", default="runs/bench_local_planner")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    out = ROOT / args.out
    corpus = write_corpus(ROOT / "runs/bench_layouts/corpus.txt")
    results: list[dict[str, Any]] = []
    plans: dict[tuple[int, int], list[list[dict[str, Any]]]] = {}
    plan_cmds: dict[tuple[int, int], str] = {}
    cases = [(name, {**BASE, **change}) for name, change in VARIANTS]

    def plan_for(cfg: dict[str, Any]) -> None:
        key = (cfg["workers"], MODEL["batch_size"] // cfg["microbatches"])
        plan = {"layers": MODEL["layers"], "hidden": MODEL["d_model"], "heads": MODEL["heads"],
                "seq": MODEL["seq_len"], "micro_batch": key[1],
                "global_batch": MODEL["batch_size"], "workers": key[0]}  # fmt: skip
        cmd, runs = plan_repeated(plan, args.plan_repeats)
        plans.setdefault(key, []).extend(runs)
        plan_cmds[key] = " ".join(cmd)

    for _, cfg in cases:  # the planner before the runs (once per distinct question)
        if (cfg["workers"], MODEL["batch_size"] // cfg["microbatches"]) not in plans:
            plan_for(cfg)
    for name, cfg in cases:
        flags = [
            s for k, v in {**MODEL, **cfg}.items() for s in (f"--{k.replace('_', '-')}", str(v))
        ]
        flags += ["--data", str(corpus.relative_to(ROOT))]
        res = train_run(flags, out / name.strip("-").replace(" ", "_"), args.steps, args.skip)
        res.update(variant=name, **cfg)
        results.append(res)
        print(f"{name}: {res['step_time_s']:.3f} s/step ({res['wall_s']:.0f} s)", flush=True)
    for key in list(plans):  # and after them
        plan_for({"workers": key[0], "microbatches": MODEL["batch_size"] // key[1]})

    rows = []
    for r in results:
        key = (r["workers"], MODEL["batch_size"] // r["microbatches"])
        runs = predictions(plans[key]).get((1, 1, r["workers"]), [])
        p = statistics.median(runs) if runs else None
        r["plan_command"] = plan_cmds[key]
        r["predicted_step_time_s"] = p
        r["predicted_runs_s"] = runs
        r["predicted_block_ms"] = block_times(plans[key])
        note = "1F1B (no schedule option)" if r["schedule"] != "1f1b" else ""
        rows.append([
            r["variant"], r["workers"], r["schedule"], r["microbatches"],
            f"{r['step_time_s']:.3f} ({r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f})",
            f"{100 * r['idle']:.0f}%",
            f"{p:.3f} ({min(runs):.3f}-{max(runs):.3f})" if p else "n/a",
            f"{r['step_time_s'] / p:.2f}" if p else "", note,
        ])  # fmt: skip
    headers = ["variant", "workers", "schedule", "micro-batches",
               "measured s/step median (min-max)", "idle", "planner s (range)",
               "measured / planner", "planner note"]  # fmt: skip
    print()
    print(table(headers, rows))
    print()
    for key, cmd in plan_cmds.items():
        print(cmd)
        print("  " + block_times(plans[key]))
    for r in results:
        print(r["command"])
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
