"""``layerwise simulate``: predict each worker's busy and idle time for a schedule."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from layerwise.cli.schedule_flags import chunks_help, schedule_help, schedule_options
from layerwise.schedules import (
    Schedule,
    ScheduleError,
    chunks_for,
    from_csv,
    from_text,
    generate,
    get,
    names,
    problems,
    specs,
)
from layerwise.simulate import Costs, simulate
from layerwise.timeline import Timeline, render_ascii, render_png, write_chrome_trace


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="predict each worker's busy and idle time for a schedule",
        description="Simulate one step of a pipeline schedule and show where workers idle.",
    )
    p.add_argument("--workers", "-p", type=int, default=4, help="pipeline workers (default 4)")
    p.add_argument(
        "--microbatches", "-m", type=int, default=8, help="micro-batches per step (default 8)"
    )
    p.add_argument("--schedule", "-s", default="1f1b", help=schedule_help(), **schedule_options())
    p.add_argument("--chunks", "-v", type=int, default=None, help=chunks_help())
    p.add_argument(
        "--fwd", type=float, default=1.0, help="forward time of a worker's layers (default 1)"
    )
    p.add_argument("--bwd", type=float, default=2.0, help="backward time (default 2)")
    p.add_argument(
        "--wgrad",
        type=float,
        default=None,
        help="weight-gradient part of the backward, for the schedules that split it ("
        + ", ".join(s.name for s in specs() if s.split_backward)
        + "; default bwd/2)",
    )
    p.add_argument(
        "--comm", type=float, default=0.0, help="time to send one activation (default 0)"
    )
    p.add_argument("--width", type=int, default=96, help="chart width in characters")
    p.add_argument("--png", help="write a Gantt chart PNG here")
    p.add_argument("--trace", help="write a Chrome/Perfetto trace JSON here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--compare", action="store_true", help="compare every registered schedule side by side"
    )
    p.add_argument("--schedule-file", help="simulate a schedule from a text/CSV file instead")
    p.set_defaults(func=run_simulate)


# The narrowest chart that still shows each worker's row and the time axis's end label.
MIN_WIDTH = 20
SCHEDULE_FILE_FORMS = (
    "text ('worker 0: 0F0 0B0 ...', as to_text writes) or CSV (one row per worker)"
)


def check_flags(args: argparse.Namespace) -> None:
    """Raise ValueError, naming the flag and what to give instead, for sizes and times that
    cannot describe a step: counts below 1, stage times that are not positive, a weight
    gradient that is not a part of the backward, a chart too narrow to draw."""
    for flag, value in (("--workers", args.workers), ("--microbatches", args.microbatches)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--fwd", args.fwd), ("--bwd", args.bwd)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{flag} {value:g}: a stage's compute time must be a positive number of "
                f"time units, such as 1"
            )
    if not (math.isfinite(args.comm) and args.comm >= 0):
        raise ValueError(f"--comm {args.comm:g}: the send time must be 0 or more")
    if args.wgrad is not None and not (0 < args.wgrad < args.bwd):
        raise ValueError(
            f"--wgrad {args.wgrad:g}: the weight-gradient part of the backward must be more "
            f"than 0 and less than --bwd {args.bwd:g} (the input gradient is the rest); "
            f"leave it out for bwd/2 = {args.bwd / 2:g}"
        )
    if args.width < MIN_WIDTH:
        raise ValueError(
            f"--width {args.width} is too narrow to draw a chart; use at least {MIN_WIDTH} "
            f"characters"
        )


def _is_text(data: bytes) -> bool:
    """Return whether ``data`` is UTF-8 without NUL bytes (NUL, though valid UTF-8, marks a
    binary file and never appears in a schedule)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def read_schedule_file(path: str) -> Schedule:
    """Return the validated schedule in the text or CSV file ``path``; raise
    FileNotFoundError or ValueError naming the file and what is wrong with it."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"--schedule-file {path!r} {what}; give a schedule file in {SCHEDULE_FILE_FORMS}"
        )
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read --schedule-file {path!r} ({err.strerror or err})") from None
    if not _is_text(data):
        raise ValueError(
            f"--schedule-file {path!r} is not a schedule text/CSV file (it holds binary "
            f"data); give a file in {SCHEDULE_FILE_FORMS}"
        )
    text = data.decode("utf-8")
    try:
        return from_text(text) if "worker" in text else from_csv(text)
    except ScheduleError as err:
        raise ValueError(f"--schedule-file {path!r}: {err}") from None


def _simulate_one(name: str, args: argparse.Namespace, chunks: int | None) -> Timeline:
    schedule = generate(name, args.workers, args.microbatches, chunks_for(name, chunks))
    return _simulate_schedule(schedule, args)


def _compare_chunks(name: str, chunks: int | None) -> int | None:
    """Return --chunks for the schedules that allow it, and None (their own) for the rest."""
    return chunks if chunks is not None and get(name).allows_chunks(chunks) else None


def _comparable(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Return the registered schedules these sizes suit, and why each other one is left out."""
    kept, left_out = [], {}
    for name in names():
        found = problems(name, args.workers, args.microbatches, _compare_chunks(name, args.chunks))
        if found:
            left_out[name] = "; ".join(found)
        else:
            kept.append(name)
    return kept, left_out


def _simulate_schedule(schedule: Schedule, args: argparse.Namespace) -> Timeline:
    v = schedule.chunks
    # --fwd/--bwd describe one worker's whole share of the model; a chunk is 1/v of it
    wgrad = None if args.wgrad is None else args.wgrad / v
    costs = Costs.uniform(
        schedule.num_stages, args.fwd / v, args.bwd / v, wgrad, comm_latency=args.comm
    )
    tl = simulate(schedule, costs)
    tl.meta["chunks"] = v
    return tl


def _metrics(tl: Timeline, ideal: float) -> dict[str, object]:
    s = tl.summary()
    s["schedule"] = tl.meta["schedule"]
    s["chunks"] = tl.meta.get("chunks", 1)
    s["ideal"] = ideal
    s["slowdown"] = tl.makespan() / ideal if ideal > 0 else 1.0
    return s


def run_simulate(args: argparse.Namespace) -> int:
    """Print the Gantt chart and metrics of one schedule, or a comparison of all; return
    the exit code. Raise ValueError (or FileNotFoundError) on input that cannot be run."""
    check_flags(args)
    ideal = args.microbatches * (args.fwd + args.bwd)
    if args.compare:
        kept, left_out = _comparable(args)
        rows = [
            _metrics(_simulate_one(n, args, _compare_chunks(n, args.chunks)), ideal) for n in kept
        ]
        if args.json:
            print(
                json.dumps(
                    {
                        "workers": args.workers,
                        "microbatches": args.microbatches,
                        "schedules": rows,
                        "left_out": left_out,
                    }
                )
            )
            return 0
        print(
            f"{args.workers} workers, {args.microbatches} micro-batches, F={args.fwd:g} "
            f"B={args.bwd:g}; ideal step {ideal:g}"
        )
        print(
            f"{'schedule':<18}{'step':>8}{'x ideal':>9}{'bubble':>9}{'worst idle':>12}"
            f"{'peak act.':>11}"
        )
        for r in rows:
            workers = r["workers"]
            assert isinstance(workers, list)
            print(
                f"{r['schedule']:<18}{r['makespan']:>8.3g}{r['slowdown']:>9.3f}"
                f"{100 * r['bubble_fraction']:>8.1f}%"  # type: ignore[operator]
                f"{100 * max(w['idle_fraction'] for w in workers):>11.1f}%"
                f"{max(w['peak_inflight'] for w in workers):>11}"
            )
        for name, why in left_out.items():
            print(f"({name} left out: {why})")
        return 0
    if args.schedule_file:
        schedule = read_schedule_file(args.schedule_file)
        tl = _simulate_schedule(schedule, args)
        ideal = schedule.num_microbatches * (args.fwd + args.bwd)
    else:
        tl = _simulate_one(args.schedule, args, args.chunks)
    if args.png:
        render_png([tl], args.png, titles=[f"{tl.meta['schedule']} (simulated)"])
    if args.trace:
        write_chrome_trace([tl], args.trace)
    m = _metrics(tl, ideal)
    if args.json:
        print(json.dumps(m))
        return 0
    print(
        render_ascii(
            tl,
            args.width,
            title=(
                f"{tl.meta['schedule']}: {tl.num_workers} workers, "
                f"{tl.meta['microbatches']} micro-batches "
                f"(F=forward, B=backward, I/W=input/weight gradient, '.'=idle)"
            ),
        )
    )
    print(
        f"step {tl.makespan():.4g} = {m['slowdown']:.3f} x ideal ({ideal:g}); "
        f"bubble {100 * tl.bubble_fraction():.1f}% of worker time"
    )
    print(
        "peak in-flight activations per worker: "
        + " ".join(str(tl.peak_inflight(w)) for w in range(tl.num_workers))
    )
    for path in (args.png, args.trace):
        if path:
            print(f"wrote {path}")
    return 0
