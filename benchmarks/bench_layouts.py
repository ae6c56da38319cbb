"""Every (dp, tp, pp) split of 8 CPU worker processes training one GPT, measured end to end.

For a fixed model and global batch, ``layerwise train`` runs once per layout (sequentially,
each a separate ``torch.distributed.run`` job). The script reports, per layout, the median
step time and tokens/s over the steps after a warm-up, the median idle fraction of rank 0's
pipeline, and the peak resident memory of the worker processes (max and mean over ranks,
from ``summary.json``). The micro-batch size is fixed (``--micro-batch`` sequences), so the
number of micro-batches per step is ``batch / (dp * micro_batch)``.

Next to the measurement it shows what ``layerwise plan --local`` predicts for the same
split (every dp x tp x pp, stages split by parameters as the job splits them; with more
workers than cores, from a probe of the machine under the job's load, see
``layerwise.planner.local_probe``). The planner is run (as the CLI, ``--json``) before and
after the training runs; the table shows the median of its runs.

    .venv/bin/python benchmarks/bench_layouts.py --json runs/bench_layouts/results.json

Runs are written to ``runs/bench_layouts/<layout>/`` (``--out``). Other helpers here
(``train_run``, ``plan_local``, ``write_corpus``) are reused by ``bench_local_planner.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import table, write_json

ROOT = Path(__file__).resolve().parent.parent
LAYERWISE = str(Path(sys.executable).parent / "layerwise")

# (dp, tp, pp), in the order of the results table
LAYOUTS = [
    (8, 1, 1),
    (4, 1, 2),
    (2, 1, 4),
    (1, 1, 8),
    (4, 2, 1),
    (2, 2, 2),
    (1, 2, 4),
    (2, 4, 1),
    (1, 4, 2),
    (1, 8, 1),
]


def write_corpus(path: Path, size: int = 1_000_000) -> Path:
    """Write the first ``size`` bytes of the default corpus (the standard library's source)
    to ``path`` once, so that each run loads a small file instead of walking the stdlib."""
    if not path.exists():
        from layerwise.job.data import load_corpus

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(load_corpus(None, size))
    return path


def train_run(flags: list[str], run_dir: Path, steps: int, skip: int) -> dict[str, Any]:
    """Run ``layerwise train <flags>`` into a fresh ``run_dir``; return the step statistics.

    ``--eval-interval`` and ``--save-interval`` are set past ``steps``, so only the last step
    evaluates and saves, and its ``step_time`` is taken before either.
    """
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    never = str(steps + 1000)
    where = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir
    cmd = [LAYERWISE, "train", *flags, "--steps", str(steps), "--eval-interval", never,
           "--save-interval", never, "--run-dir", str(where)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    summary = json.loads((run_dir / "summary.json").read_text())
    kept = [r for r in records if r["step"] >= skip]
    rss = [float(r["peak_rss_mib"]) for r in summary["ranks"]]
    times = [float(r["step_time"]) for r in kept]
    return {
        "command": " ".join(["layerwise", "train", *cmd[2:]]),
        "layout": summary["layout"],
        "steps_measured": len(kept),
        "step_time_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "tokens_per_s": statistics.median(float(r["tokens_per_s"]) for r in kept),
        "idle": statistics.median(float(r["idle"]) for r in kept),
        "peak_rss_max_mib": max(rss),
        "peak_rss_mean_mib": statistics.fmean(rss),
        "parameters_max": max(int(r["parameters"]) for r in summary["ranks"]),
        "final_loss": float(records[-1]["loss"]),
        "phases_s": {
            k: statistics.median(float(r["phases_s"][k]) for r in kept)
            for k in kept[0].get("phases_s", {})
        },
        "wall_s": wall,
    }


def plan_local(
    layers: int, hidden: int, heads: int, seq: int, micro_batch: int, global_batch: int,
    workers: int,
) -> tuple[list[str], list[dict[str, Any]]]:  # fmt: skip
    """Run ``layerwise plan --local --json``; return (the command, its rows)."""
    cmd = [LAYERWISE, "plan", "--local", "--json", "--layers", str(layers), "--hidden",
           str(hidden), "--heads", str(heads), "--seq", str(seq), "--micro-batch",
           str(micro_batch), "--global-batch", str(global_batch), "--workers",
           str(workers)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return ["layerwise", *cmd[1:]], json.loads(out.stdout)


def plan_repeated(plan: dict[str, int], repeats: int) -> tuple[list[str], list[list[dict]]]:
    """Run the planner ``repeats`` times (its block timing moves with the load of a shared
    machine); return the command and each run's rows."""
    runs = [plan_local(**plan) for _ in range(repeats)]
    return runs[0][0], [rows for _, rows in runs]


def predictions(runs: list[list[dict[str, Any]]]) -> dict[tuple[int, int, int], list[float]]:
    """(dp, tp, pp) -> the predicted step seconds of each planner run."""
    out: dict[tuple[int, int, int], list[float]] = {}
    for rows in runs:
        for r in rows:
            key = (int(r["dp"]), int(r.get("tp", 1)), int(r["pp"]))
            out.setdefault(key, []).append(float(r["step_time_s"]))
    return out


def block_times(runs: list[list[dict[str, Any]]]) -> str:
    """The planner's measured block forward/backward: median and range over its runs."""
    fwd = [1e3 * float(rows[0]["layer_forward_s"]) for rows in runs]
    bwd = [1e3 * float(rows[0]["layer_backward_s"]) for rows in runs]
    return (
        f"planner's block per micro-batch over {len(runs)} runs: forward median "
        f"{statistics.median(fwd):.2f} ms ({min(fwd):.2f}-{max(fwd):.2f}), backward median "
        f"{statistics.median(bwd):.2f} ms ({min(bwd):.2f}-{max(bwd):.2f})"
    )


def merged(paths: list[str]) -> dict[tuple[int, int, int], list[float]]:
    """(dp, tp, pp) -> the measured median step of each earlier run in ``paths``."""
    out: dict[tuple[int, int, int], list[float]] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            step = r.get("this_run_step_time_s", r["step_time_s"])
            if step is None:  # a --plan-only run measured nothing itself
                continue
            out.setdefault((r["dp"], r["tp"], r["pp"]), []).append(float(step))
    return out


def layout_ok(dp: int, tp: int, pp: int, args: argparse.Namespace) -> str | None:
    """Return why the layout cannot run this model, or None."""
    if args.heads % tp or args.d_model % tp:
        return f"tp={tp} does not divide heads={args.heads} / d_model={args.d_model}"
    if pp > args.layers + 2:
        return f"pp={pp} > {args.layers + 2} layers (blocks + embedding + head)"
    if args.batch_size % (dp * args.micro_batch):
        return f"batch {args.batch_size} is not a multiple of dp x micro-batch"
    if args.batch_size // (dp * args.micro_batch) < pp:
        return "fewer micro-batches than pipeline stages"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=8, help="worker processes (dp*tp*pp)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="global, sequences")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--plan-repeats", type=int, default=3, help="planner runs before and after")
    ap.add_argument("--only", nargs="*", default=None, help="layouts as dp,tp,pp (default all)")
    ap.add_argument("--out", default="runs/bench_layouts")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plan-only", action="store_true",
                    help="train nothing: run the planner 2 x --plan-repeats times against the "
                         "measured steps of the --merge files")  # fmt: skip
    ap.add_argument("--merge", nargs="*", default=[],
                    help="results of earlier runs of the same layouts (--json files): "
                         "the measured step is the median of those runs and this one")  # fmt: skip
    args = ap.parse_args()

    out = ROOT / args.out
    corpus = write_corpus(out / "corpus.txt")
    layouts = LAYOUTS if args.world == 8 else []
    if args.only:
        layouts = [tuple(int(x) for x in s.split(",")) for s in args.only]  # type: ignore[misc]
    layouts = [lt for lt in layouts if lt[0] * lt[1] * lt[2] == args.world]
    model = ["--layers", str(args.layers), "--d-model", str(args.d_model), "--heads",
             str(args.heads), "--seq-len", str(args.seq_len), "--batch-size",
             str(args.batch_size), "--data", str(corpus.relative_to(ROOT))]  # fmt: skip
    plan = {"layers": args.layers, "hidden": args.d_model, "heads": args.heads,
            "seq": args.seq_len, "micro_batch": args.micro_batch,
            "global_batch": args.batch_size, "workers": args.world}  # fmt: skip
    if args.plan_only and not args.merge:
        ap.error("--plan-only needs the measured runs to compare with: --merge FILE...")
    plan_cmd, before = plan_repeated(plan, args.plan_repeats)
    print(" ".join(plan_cmd))
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if args.plan_only:  # the last merged file's rows stand for this run's table columns
        last = {(r["dp"], r["tp"], r["pp"]): r
                for r in json.loads(Path(args.merge[-1]).read_text())["results"]}  # fmt: skip
        results = [dict(last[lt]) for lt in layouts if lt in last]
    for dp, tp, pp in [] if args.plan_only else layouts:
        why = layout_ok(dp, tp, pp, args)
        if why:
            print(f"skip dp{dp} tp{tp} pp{pp}: {why}")
            skipped.append({"dp": dp, "tp": tp, "pp": pp, "reason": why})
            continue
        m = args.batch_size // (dp * args.micro_batch)
        flags = ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--microbatches", str(m)]
        res = train_run(model + flags, out / f"dp{dp}_tp{tp}_pp{pp}", args.steps, args.skip)
        res.update(dp=dp, tp=tp, pp=pp, microbatches=m)
        results.append(res)
        print(f"dp{dp} tp{tp} pp{pp} m{m}: {res['step_time_s']:.3f} s/step, "
              f"{res['tokens_per_s']:.0f} tok/s, peak RSS max {res['peak_rss_max_mib']:.0f} MiB "
              f"({res['wall_s']:.0f} s)", flush=True)  # fmt: skip
    _, after = plan_repeated(plan, args.plan_repeats)
    pred = predictions(before + after)

    earlier = merged(args.merge)
    rows = []
    for r in results:
        runs = pred.get((r["dp"], r["tp"], r["pp"]))
        p = statistics.median(runs) if runs else None
        this = [] if args.plan_only else [r["step_time_s"]]
        r["this_run_step_time_s"] = None if args.plan_only else r["step_time_s"]
        r["runs_step_time_s"] = [*earlier.get((r["dp"], r["tp"], r["pp"]), []), *this]
        r["step_time_s"] = statistics.median(r["runs_step_time_s"])
        r["predicted_step_time_s"] = p
        r["predicted_runs_s"] = runs
        rows.append([
            f"({r['dp']}, {r['tp']}, {r['pp']})", r["microbatches"],
            f"{r['step_time_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['idle']:.0f}%",
            f"{r['peak_rss_max_mib']:.0f}", f"{r['peak_rss_mean_mib']:.0f}",
            f"{r['parameters_max'] / 1e3:.0f}k",
            f"{p:.3f} ({min(runs):.3f}-{max(runs):.3f})" if p and runs else "n/a (tp > 1)",
            f"{r['step_time_s'] / p:.2f}x" if p else "",
        ])  # fmt: skip
    headers = ["(dp, tp, pp)", "micro-batches", "step s (median)", "tokens/s", "idle",
               "peak RSS max MiB", "peak RSS mean MiB", "params/rank max",
               "planner s (range)", "measured / planner"]  # fmt: skip
    print()
    print(table(headers, rows))
    print()
    print(" ".join(plan_cmd))
    print(block_times(before + after))
    for key, what in (("step_time_s", "measured"), ("this_run_step_time_s", "this run alone")):
        ratios = [r[key] / r["predicted_step_time_s"] for r in results
                  if r["predicted_step_time_s"] and r[key]]  # fmt: skip
        if ratios and (key == "step_time_s" or args.merge):
            near = sum(1 for x in ratios if abs(x - 1) <= 0.15)
            print(f"{what}: {near} of {len(ratios)} layouts within 15 % of the planner's median "
                  f"(measured / planner {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if args.merge:
        runs = (
            f"{len(args.merge)} runs (--merge)"
            if args.plan_only
            else f"{1 + len(args.merge)} runs (this one and --merge)"
        )
        print(f"measured: median over {runs}")
    write_json(args.json, {"args": vars(args), "plan_command": " ".join(plan_cmd),
                           "plan_runs": before + after, "results": results,
                           "skipped": skipped})  # fmt: skip


if __name__ == "__main__":
    main()
