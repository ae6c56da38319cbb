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
        "--fwd",
        type=times,
        default=(1.0,),
        help="forward time of a worker's layers (default 1), or one time per stage such as "
        "1,1,2,1 (uneven stages)",
    )
    p.add_argument(
        "--bwd", type=times, default=(2.0,), help="backward time (default 2), or one per stage"
    )
    p.add_argument(
        "--wgrad",
        type=times,
        default=None,
        help="weight-gradient part of the backward, for the schedules that split it ("
        + ", ".join(s.name for s in specs() if s.split_backward)
        + "; default bwd/2)",
    )
    p.add_argument(
        "--comm", type=float, default=0.0, help="time to send one activation (default 0)"
    )
    p.add_argument(
        "--memory-cap",
        type=float,
        default=None,
        help="most activation memory a worker may hold, in micro-batches through one whole "
        "stage (a chunk of a two-chunk placement counts one half); for --schedule auto, and "
        "marks the schedules over it in --compare (default for auto: 1F1B's, p)",
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


def times(text: str) -> tuple[float, ...]:
    """Parse one time, or one per stage separated by commas ('1,1,2,1')."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a time such as 1.5, or one per stage such as 1,1,2,1"
        ) from None
    return values


def check_flags(args: argparse.Namespace) -> None:
    """Raise ValueError, naming the flag and what to give instead, for sizes and times that
    cannot describe a step: counts below 1, stage times that are not positive, a weight
    gradient that is not a part of the backward, a chart too narrow to draw."""
    for flag, value in (("--workers", args.workers), ("--microbatches", args.microbatches)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for flag, values in (("--fwd", args.fwd), ("--bwd", args.bwd)):
        for value in values:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{flag} {value:g}: a stage's compute time must be a positive number of "
                    f"time units, such as 1"
                )
    lengths = {len(v) for v in (args.fwd, args.bwd, args.wgrad or ()) if len(v) > 1}
    if len(lengths) > 1:
        raise ValueError(
            "--fwd, --bwd and --wgrad give different numbers of stages "
            f"({', '.join(str(n) for n in sorted(lengths))}); give one time per stage in each"
        )
    if args.memory_cap is not None and not args.memory_cap > 0:
        raise ValueError(f"--memory-cap {args.memory_cap:g} must be more than 0")
    if not (math.isfinite(args.comm) and args.comm >= 0):
        raise ValueError(f"--comm {args.comm:g}: the send time must be 0 or more")
    if args.wgrad is not None:
        bwd = args.bwd * len(args.wgrad) if len(args.bwd) == 1 else args.bwd
        for w, b in zip(args.wgrad, bwd, strict=False):
            if not (0 < w < b):
                raise ValueError(
                    f"--wgrad {w:g}: the weight-gradient part of the backward must be more "
                    f"than 0 and less than --bwd {b:g} (the input gradient is the rest); "
                    f"leave it out for bwd/2 = {b / 2:g}"
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
    if name == "auto":  # searched for the costs given, not the registry's equal stages
        return _simulate_schedule(auto_schedule(args, chunks), args)
    schedule = generate(name, args.workers, args.microbatches, chunks_for(name, chunks))
    return _simulate_schedule(schedule, args)


def auto_schedule(args: argparse.Namespace, chunks: int | None) -> Schedule:
    """The schedule ``auto`` finds for the given stage costs under ``--memory-cap`` (default
    1F1B's peak: the smaller of p and m)."""
    from layerwise.schedules import synthesize

    given = {len(v) for v in (args.fwd, args.bwd, args.wgrad or ()) if len(v) > 1}
    v = min(given) // args.workers if given else chunks_for("auto", chunks)
    if given and min(given) % args.workers:
        raise ValueError(
            f"{min(given)} stage times cannot be shared by {args.workers} workers; give a "
            f"multiple of {args.workers}"
        )
    cap = args.memory_cap if args.memory_cap is not None else min(args.workers, args.microbatches)
    costs = stage_costs(args, args.workers * v, v)
    return synthesize(costs, args.workers, args.microbatches, cap)


def _compare_chunks(name: str, chunks: int | None) -> int | None:
    """Return --chunks for the schedules that allow it, and None (their own) for the rest."""
    return chunks if chunks is not None and get(name).allows_chunks(chunks) else None


def _comparable(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Return the registered schedules these sizes suit, and why each other one is left out."""
    kept, left_out = [], {}
    given = {len(v) for v in (args.fwd, args.bwd, args.wgrad or ()) if len(v) > 1}
    for name in names():
        chunks = _compare_chunks(name, args.chunks)
        found = problems(name, args.workers, args.microbatches, chunks)
        stages = args.workers * chunks_for(name, chunks)
        if given and stages not in given:
            found.append(f"it has {stages} stages, not the {min(given)} times given")
        if found:
            left_out[name] = "; ".join(found)
        else:
            kept.append(name)
    return kept, left_out


def stage_costs(args: argparse.Namespace, num_stages: int, chunks: int) -> Costs:
    """The costs of each stage: one time per stage as given, or a worker's share (one
    time) cut into its ``chunks`` stages."""

    def per_stage(values: tuple[float, ...], flag: str) -> list[float]:
        if len(values) == 1:  # a worker's whole share of the model; a chunk is 1/v of it
            return [values[0] / chunks] * num_stages
        if len(values) != num_stages:
            raise ValueError(
                f"{flag} gives {len(values)} stage times but the schedule has {num_stages} "
                f"stages; give {num_stages} times, or one for every stage"
            )
        return list(values)

    fwd, bwd = per_stage(args.fwd, "--fwd"), per_stage(args.bwd, "--bwd")
    wgrad = None if args.wgrad is None else per_stage(args.wgrad, "--wgrad")
    return Costs.per_stage(fwd, bwd, None, wgrad, comm_latency=args.comm)


def _simulate_schedule(schedule: Schedule, args: argparse.Namespace) -> Timeline:
    tl = simulate(schedule, stage_costs(args, schedule.num_stages, schedule.chunks))
    tl.meta["chunks"] = schedule.chunks
    tl.meta["messages"] = schedule.messages
    return tl


def _metrics(tl: Timeline, ideal: float) -> dict[str, object]:
    s = tl.summary()
    s["schedule"] = tl.meta["schedule"]
    s["chunks"] = tl.meta.get("chunks", 1)
    s["ideal"] = ideal
    s["slowdown"] = tl.makespan() / ideal if ideal > 0 else 1.0
    s["messages"] = tl.meta.get("messages", 0)
    return s


def run_simulate(args: argparse.Namespace) -> int:
    """Print the Gantt chart and metrics of one schedule, or a comparison of all; return
    the exit code. Raise ValueError (or FileNotFoundError) on input that cannot be run."""
    check_flags(args)
    per_worker = len(args.fwd) == 1 and len(args.bwd) == 1
    # the ideal step: every worker busy all the time with its share of the work
    ideal = (
        args.microbatches * (sum(args.fwd) + sum(args.bwd)) / (1 if per_worker else args.workers)
    )
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
            f"{args.workers} workers, {args.microbatches} micro-batches, "
            f"F={','.join(f'{x:g}' for x in args.fwd)} B={','.join(f'{x:g}' for x in args.bwd)}"
            f"; ideal step {ideal:g}"
        )
        print(
            f"{'schedule':<18}{'step':>8}{'x ideal':>9}{'bubble':>9}{'worst idle':>12}"
            f"{'peak act.':>11}{'peak mem.':>11}{'messages':>10}"
        )
        for r in rows:
            workers = r["workers"]
            assert isinstance(workers, list)
            memory = max(w["peak_activation_memory"] for w in workers)
            over = args.memory_cap is not None and memory > args.memory_cap + 1e-9
            print(
                f"{r['schedule']:<18}{r['makespan']:>8.3g}{r['slowdown']:>9.3f}"
                f"{100 * r['bubble_fraction']:>8.1f}%"  # type: ignore[operator]
                f"{100 * max(w['idle_fraction'] for w in workers):>11.1f}%"
                f"{max(w['peak_inflight'] for w in workers):>11}"
                f"{memory:>11.3g}{r['messages']:>10}" + ("  over the cap" if over else "")
            )
        for name, why in left_out.items():
            print(f"({name} left out: {why})")
        return 0
    if args.schedule_file:
        schedule = read_schedule_file(args.schedule_file)
        tl = _simulate_schedule(schedule, args)
        work = sum(args.fwd) + sum(args.bwd)
        ideal = schedule.num_microbatches * work / (1 if per_worker else schedule.num_workers)
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
