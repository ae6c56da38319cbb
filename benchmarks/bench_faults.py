"""A worker killed at a random moment, again and again: does the job finish by itself, and what
does each failure cost?

One uninterrupted ``layerwise train`` run is the reference. Then, for each trial, the same run
starts afresh, and at a moment drawn uniformly over the first 90 % of the reference's
training time (a run may go faster than the reference) one worker, drawn at random, gets
SIGKILL. Nobody acts after that. Per trial it reports whether the run completed every step,
the recovery time the job logged (from the first survivor's notice of the loss to the first
step after the restart), the steps it redid, the wall time lost against the reference, and
the largest difference between its final weights and the reference's
(zero when recovery is exact: fp32 on CPU, the same layout, redone from a checkpoint).

    .venv/bin/python benchmarks/bench_faults.py --trials 10 --json runs/faults.json
    .venv/bin/python benchmarks/bench_faults.py --dp 2 --workers 1 --trials 5 \
        --recover-from replica checkpoint      # healing in memory against a checkpoint restart

With several ``--recover-from`` values each trial kills the same worker at the same moment
in a run of each kind, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from layerwise.job.ckpt_files import newest_good

CORPUS = "".join(f"def h{i}(z):\n    return z * {i} - {i % 11}\n" for i in range(600))


def model_flags(args: argparse.Namespace, corpus: Path) -> list[str]:
    return ["--workers", str(args.workers), "--dp", str(args.dp), "--layers", "4",
            "--d-model", "64", "--heads", "4", "--seq-len", "32", "--batch-size", "8",
            "--microbatches", "4", "--steps", str(args.steps), "--save-interval",
            str(args.save_interval), "--eval-interval", str(args.steps), "--timeout",
            str(args.timeout),
            "--data", str(corpus)]  # fmt: skip


def workers_of(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True)
    pids = []
    for pid in out.stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if any(e.startswith(b"RANK=") for e in env):
            pids.append(int(pid))
    return pids


def first_step_time(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            return float(record["time"])
    return None


def run(flags: list[str], run_dir: Path, kill_after: float | None, victim: int | None
        ) -> dict[str, Any]:  # fmt: skip
    cmd = [sys.executable, "-m", "layerwise", "train", "--run-dir", str(run_dir), *flags]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    killed = False
    if kill_after is not None:
        while first_step_time(run_dir) is None and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(kill_after)
        pids = workers_of(proc.pid)
        if pids and proc.poll() is None:
            os.kill(pids[(victim or 0) % len(pids)], signal.SIGKILL)
            killed = True
    out, _ = proc.communicate(timeout=900)
    wall = time.time() - t0
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in records if "loss" in r})
    events = [r for r in records if "event" in r]
    recovered = [e for e in events if e["event"] == "recovered"]
    times = [r["time"] for r in records if "loss" in r]
    return {"exit": proc.returncode, "wall_s": wall, "killed": killed,
            "steps_done": len(steps), "recoveries": len(recovered),
            "recovery_s": [e["recovery_s"] for e in recovered],
            "steps_redone": sum(e["steps_redone"] for e in recovered),
            "train_s": max(times) - min(times), "tail": out[-1500:]}  # fmt: skip


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = newest_good(run_dir / "checkpoints").path
    assert newest is not None, f"{run_dir} has no checkpoint"
    dcp_to_torch_save(newest, run_dir / "final.pt")
    return dict(torch.load(run_dir / "final.pt")["model"])


def report(ref: dict[str, Any], rows: list[dict[str, Any]], steps: int) -> None:
    """The markdown table and the medians (also from a saved ``--json``: ``--report``)."""
    print(f"reference: {steps} steps in {ref['wall_s']:.1f}s wall "
          f"({ref['train_s']:.1f}s of training)\n")  # fmt: skip
    print("| trial | recovery from | worker killed | at (s into training) | completed "
          "| recovery (s) | steps redone | wall time lost (s) | max weight diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        done = "yes" if r["exit"] == 0 and r["steps_done"] == steps else "NO"
        victim = r["victim"] if r["killed"] else "none: the run had ended"
        print(f"| {r['trial']} | {r['how']} | {victim} | {r['kill_at_s']:.1f} | {done} | "
              f"{', '.join(f'{x:.1f}' for x in r['recovery_s']) or '-'} | {r['steps_redone']} | "
              f"{r['lost_s']:.1f} | {r['max_weight_diff']:.2g} |")  # fmt: skip
    for how in sorted({r["how"] for r in rows}):
        mine = [r for r in rows if r["how"] == how and r["killed"]]
        recov = [x for r in mine for x in r["recovery_s"]]
        if recov:
            lost = statistics.median(r["lost_s"] for r in mine)
            redone = statistics.median(r["steps_redone"] for r in mine)
            print(f"\n{how}, {len(mine)} runs with a worker killed: completed "
                  f"{sum(r['exit'] == 0 and r['steps_done'] == steps for r in mine)}/{len(mine)}; "
                  f"recovery median {statistics.median(recov):.1f}s (max {max(recov):.1f}s); "
                  f"wall time lost median {lost:.1f}s; steps redone median {redone}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="pipeline workers (pp)")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-interval", type=int, default=25)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--recover-from", nargs="+", default=["replica"],
                   choices=("replica", "checkpoint"))  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--report", type=Path, help="print the table of a saved --json and stop")
    args = p.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        report(saved["reference"], saved["trials"], args.steps)
        return
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    corpus = root / "corpus.py"
    corpus.write_text(CORPUS)
    flags = model_flags(args, corpus)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores; "
          f"{args.dp * args.workers} workers", flush=True)  # fmt: skip
    ref = run(flags, root / "reference", None, None)
    assert ref["exit"] == 0, ref["tail"]
    reference = final_weights(root / "reference")
    rows = []
    for trial in range(args.trials):
        # within the first 90 % of the reference's training: a run may go faster than it
        at = rng.uniform(0.0, 0.9 * ref["train_s"])
        victim = rng.randrange(args.dp * args.workers)
        for how in args.recover_from:
            run_dir = root / f"trial{trial}-{how}"
            row = run([*flags, "--recover-from", how], run_dir, at, victim)
            weights = final_weights(run_dir) if row["exit"] == 0 else {}
            diffs = [(w - reference[k]).abs().max().item() for k, w in weights.items()]
            row["max_weight_diff"] = max(diffs, default=float("nan"))
            # without replicas there is nothing to heal from: the restart uses the checkpoint
            how = how if args.dp > 1 else "checkpoint"
            row.update(trial=trial, how=how, victim=victim, kill_at_s=at,
                       lost_s=row["wall_s"] - ref["wall_s"])  # fmt: skip
            rows.append(row)
            print(f"trial {trial} ({how}): kill worker {victim} at {at:.1f}s into training; "
                  f"exit {row['exit']}, {row['steps_done']}/{args.steps} steps, recovery "
                  f"{row['recovery_s']}, {row['steps_redone']} redone, {row['lost_s']:+.1f}s, "
                  f"max weight diff {row['max_weight_diff']:.2g}", flush=True)  # fmt: skip
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}\n")
    report(ref, rows, args.steps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"reference": ref, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
