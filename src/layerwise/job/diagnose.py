"""``layerwise diagnose``: where a finished run's time went, and what to change.

Reads ``config.json``, ``metrics.jsonl`` and ``timeline.json`` (the last step, measured, and
its simulated twin) from a run directory. Suggestions are ranked by the step time the
simulator predicts for them, using the stage times and hand-off latency the run measured.
A run without ``timeline.json`` has not finished: its report (``job.progress``) says what it
has done and how to finish it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from layerwise.job.progress import (
    health,
    progress,
    read_config,
    read_events,
    read_metrics,
    render_progress,
)
from layerwise.partition import partition
from layerwise.schedules import alternatives, chunks_for, generate, get, problems
from layerwise.simulate import Costs, measured_costs, simulate
from layerwise.timeline import Timeline, render_ascii


def _predict(name: str, p: int, m: int, v: int, fwd: list[float], bwd: list[float],
             latency: float) -> float:  # fmt: skip
    """Return the predicted step time of ``name`` with per-worker costs split into v chunks."""
    sched = generate(name, p, m, v)
    f = [fwd[s % p] / v for s in range(p * v)]
    b = [bwd[s % p] / v for s in range(p * v)]
    return simulate(sched, Costs.per_stage(f, b, comm_latency=latency)).makespan()


def suggestions(
    cfg: dict[str, Any], fwd: list[float], bwd: list[float], current: float, latency: float = 0.0
) -> list[dict[str, Any]]:
    """Alternatives with their predicted step time, fastest first."""
    p, m = int(cfg["workers"]), int(cfg["microbatches"])

    def predict(name: str, p_: int, m_: int, v: int, f: list[float], b: list[float]) -> float:
        return _predict(name, p_, m_, v, f, b, latency)

    out: list[dict[str, Any]] = []

    def add(change: str, predicted: float, why: str) -> None:
        out.append(
            {
                "change": change,
                "predicted_step_s": predicted,
                "speedup": current / predicted if predicted > 0 else 1.0,
                "why": why,
            }
        )

    if len(fwd) == p:
        batch = int(cfg["batch_size"])
        if 2 * m <= batch and batch % (2 * m) == 0:
            add(
                f"--microbatches {2 * m}",
                predict(cfg["schedule"], p, 2 * m, 1, [f / 2 for f in fwd], [b / 2 for b in bwd]),
                "smaller micro-batches shrink the fill and drain bubble (p-1)/(m+p-1)",
            )
        for name in _other_schedules(cfg["schedule"], p, m):
            if name == "auto":
                continue  # searched below for the measured costs, not the registry's equal ones
            add(f"--schedule {name}", predict(name, p, m, 1, fwd, bwd), get(name).description)
        searched = _searched(cfg, p, m, fwd, bwd, latency)
        if searched is not None and searched[0] < 0.99 * current:
            add(f"--schedule auto --memory-cap {searched[1]:g}", searched[0],
                "a schedule searched for these measured stage times, holding no more "
                "activations than the run's schedule")  # fmt: skip
        if not problems("interleaved-1f1b", p, m, 2) and _num_layers(cfg) >= 2 * p:
            add(
                "--schedule interleaved-1f1b --chunks 2",
                predict("interleaved-1f1b", p, m, 2, fwd, bwd),
                "two chunks per worker halve the bubble at twice the point-to-point traffic",
            )
        # rebalance: spread each stage's measured time evenly over its layers, re-partition
        layer_costs: list[float] = []
        sizes = _sizes(cfg, p)
        for s, n in enumerate(sizes):
            layer_costs += [(fwd[s] + bwd[s]) / n] * n
        part = partition(layer_costs, p)
        if part.sizes != sizes:
            per = part.stage_costs(layer_costs)
            ratio = [c / (fwd[s] + bwd[s]) if fwd[s] + bwd[s] else 1.0 for s, c in enumerate(per)]
            add(
                f"--balance {','.join(map(str, part.sizes))}",
                predict(
                    cfg["schedule"],
                    p,
                    m,
                    1,
                    [f * r for f, r in zip(fwd, ratio, strict=True)],
                    [b * r for b, r in zip(bwd, ratio, strict=True)],
                ),
                "rebalances layers by measured time so no stage waits on a slower one",
            )
        if cfg.get("recompute", cfg.get("checkpoint", "never")) == "never":
            add(
                "--recompute always (only if memory-bound)",
                predict(
                    cfg["schedule"], p, m, 1, fwd, [b + f for f, b in zip(fwd, bwd, strict=True)]
                ),
                "recomputing each forward during backward frees stashed activations but costs time",
            )
    return sorted(out, key=lambda s: s["predicted_step_s"])


def _searched(
    cfg: dict[str, Any], p: int, m: int, fwd: list[float], bwd: list[float], latency: float
) -> tuple[float, float] | None:
    """(predicted step, memory cap) of ``auto`` searched for the measured costs under the
    run's own peak activation memory; None where it does not apply."""
    from layerwise.schedules import synthesize

    try:
        current = generate(cfg["schedule"], p, m, 1)
    except ValueError:
        return None
    costs = Costs.per_stage(fwd, bwd, comm_latency=latency)
    now = simulate(current, costs)
    cap = max(now.peak_activation_memory(w) for w in range(p))
    try:
        found = synthesize(costs, p, m, cap, placement="looped", chunks=1, time_limit_s=1.0)
    except ValueError:
        return None
    return simulate(found, costs).makespan(), cap


def _other_schedules(current: str, p: int, m: int) -> list[str]:
    """Return the registered schedules to suggest instead of ``current`` on the same p
    stages: those that hold no more activations at peak, so that switching costs no memory
    (any of them if ``current`` is a reference such as naive)."""
    now = get(current)
    return [
        name
        for name in alternatives(tuple(range(p)), m)
        if name != now.name
        and (now.reference or get(name).max_inflight(p, m, 1) <= now.max_inflight(p, m, 1))
    ]


def _sizes(cfg: dict[str, Any], p: int) -> list[int]:
    from layerwise.partition import uniform

    sizes = cfg.get("stage_sizes")
    if sizes:
        return [int(x) for x in sizes]
    return uniform(_num_layers(cfg), p).sizes


def _num_layers(cfg: dict[str, Any]) -> int:
    """Return the number of layers the run's model was split into stages from (embedding and
    head included), asked of its model family; config.json files from before the ``model``
    field are GPT runs, and keys that are not TrainConfig fields are left out."""
    from dataclasses import fields

    from layerwise.job.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    run = TrainConfig(**{k: v for k, v in cfg.items() if k in known})
    return run.family().num_layers


def diagnose(run_dir: Path) -> dict[str, Any]:
    """Return the report of a run as a JSON-ready dict: where a finished run's time went, or
    (``finished`` False) what an unfinished one has done. Raises FileNotFoundError if
    ``run_dir`` is not a run directory."""
    cfg = read_config(run_dir)
    metrics, unreadable = read_metrics(run_dir)
    if not (run_dir / "timeline.json").exists():
        return progress(run_dir, cfg, metrics, unreadable)
    data = json.loads((run_dir / "timeline.json").read_text())
    measured = Timeline.from_json(data["measured"])
    stages = int(measured.meta.get("stages", measured.num_workers))
    schedule = generate(
        cfg["schedule"],
        int(cfg["workers"]),
        int(cfg["microbatches"]),
        chunks_for(cfg["schedule"], cfg.get("chunks") or None),
    )
    costs = measured_costs([measured], schedule)
    simulated = simulate(schedule, costs)
    fwd, bwd = list(costs.forward), list(costs.backward)
    totals = [f + b for f, b in zip(fwd, bwd, strict=True)]
    mean_total = statistics.fmean(totals) if totals else 0.0
    steps = [r["step_time"] for r in metrics if "step_time" in r]
    before = run_dir / "prediction.json"
    prediction = json.loads(before.read_text()) if before.exists() else None
    return {
        "run_dir": str(run_dir),
        "finished": True,
        "config": {
            k: cfg.get(k)
            for k in ("workers", "schedule", "microbatches", "chunks", "layers", "recompute")
        },
        "steps": len(metrics),
        "median_step_s": statistics.median(steps) if steps else None,
        "phases_s": step_phases(metrics),
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "final_val_loss": next((r["val_loss"] for r in reversed(metrics) if "val_loss" in r), None),
        "workers": [
            {
                "worker": w,
                "busy_s": measured.busy(w),
                "idle_s": measured.idle(w),
                "idle_fraction": measured.idle_fraction(w),
                "comm_wait_s": measured.comm_wait(w),
                "predicted_idle_fraction": simulated.idle_fraction(w),
            }
            for w in range(measured.num_workers)
        ],
        "stage_seconds": totals,
        "imbalance": max(totals) / mean_total if mean_total > 0 else 1.0,
        "handoff_latency_s": costs.comm_latency,
        "cores": measured.meta.get("cores"),
        "local_workers": measured.meta.get("local_workers"),
        "measured_bubble": measured.bubble_fraction(),
        "predicted_bubble": simulated.bubble_fraction(),
        "measured_step_s": measured.makespan(),
        "predicted_step_s": simulated.makespan(),
        "predicted_before_training_s": prediction["predicted_step_s"] if prediction else None,
        **health(metrics),
        "failures": failures(read_events(run_dir)),
        "suggestions": (
            suggestions(
                {**cfg, "stage_sizes": measured.meta.get("stage_sizes")},
                fwd,
                bwd,
                measured.makespan(),
                costs.comm_latency,
            )
            if stages == measured.num_workers
            else []
        ),
        "chart": render_ascii(measured, 80),
    }


def step_phases(metrics: list[dict[str, Any]]) -> dict[str, float] | None:
    """The first worker's median seconds per phase of a step (``Trainer.step``'s
    ``phases_s``), over the steps after the first (which meets the shapes), or None when the
    run's records have none."""
    records = [r["phases_s"] for r in metrics if "phases_s" in r]
    records = records[1:] or records
    if not records:
        return None
    return {k: statistics.median(r.get(k, 0.0) for r in records) for k in records[0]}


def render_phases(phases: dict[str, float]) -> str:
    """One line: each phase's median seconds and its share of their sum."""
    total = sum(phases.values()) or 1.0
    parts = ", ".join(f"{k} {v:.4f}s ({100 * v / total:.0f}%)" for k, v in phases.items())
    return f"where a step went (first worker, median per step): {parts}"


def failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each lost worker with its recovery, from the job's events, in one line each."""
    out = []
    recovered = {e.get("restart"): e for e in events if e.get("event") == "recovered"}
    for e in (e for e in events if e.get("event") == "worker_lost"):
        back = recovered.get(e.get("restart"))
        how = "not recovered"
        if back:
            how = (f"recovered in {back['recovery_s']:.1f}s from step {back['resumed_at']}, "
                   f"{back['steps_redone']} logged step(s) redone")  # fmt: skip
        source = "a surviving replica" if "healing" in e else "the newest checkpoint"
        out.append({**e, "recovery": back, "what": (
            f"{', '.join(map(str, e.get('workers', [])))} ({e.get('how')}) after step "
            f"{e.get('last_step')}: {how}" + (f", from {source}" if back else ""))})  # fmt: skip
    return out


def render(report: dict[str, Any]) -> str:
    """Return the report as text for a terminal."""
    if not report.get("finished", True):
        return render_progress(report)
    c = report["config"]
    lines = [
        f"run {report['run_dir']}: {c['workers']} workers, {c['schedule']}, "
        f"{c['microbatches']} micro-batches, {report['steps']} steps, final loss "
        f"{report['final_loss']:.3f}"
        + (f", val {report['final_val_loss']:.3f}" if report["final_val_loss"] else ""),
        "",
        "last step, measured ('~' = waiting on a peer, '.' = idle):",
        report["chart"],
        "",
        f"{'worker':<8}{'busy s':>9}{'idle s':>9}{'idle %':>8}{'predicted':>11}{'comm wait s':>13}",
    ]
    for w in report["workers"]:
        lines.append(
            f"{w['worker']:<8}{w['busy_s']:>9.4f}{w['idle_s']:>9.4f}"
            f"{100 * w['idle_fraction']:>7.1f}%"
            f"{100 * w['predicted_idle_fraction']:>10.1f}%{w['comm_wait_s']:>13.4f}"
        )
    lines += [
        "",
        f"stage imbalance (slowest stage / mean): {report['imbalance']:.2f}"
        + ("  <- uneven stages: rebalance" if report["imbalance"] > 1.15 else ""),
        f"bubble: measured {100 * report['measured_bubble']:.1f}%, predicted "
        f"{100 * report['predicted_bubble']:.1f}%; step {report['measured_step_s']:.4f}s measured, "
        f"{report['predicted_step_s']:.4f}s predicted from the measured stage times and hand-offs",
        f"hand-off between workers (data ready to use): {1e3 * report['handoff_latency_s']:.2f} ms",
    ]
    gap = (
        report["measured_step_s"] / report["predicted_step_s"]
        if report["predicted_step_s"]
        else 1.0
    )
    cores, local = report.get("cores"), report.get("local_workers")
    oversubscribed = bool(cores and local and local > cores)
    if gap > 1.1 and oversubscribed:
        lines.append(
            f"  measured step is {gap:.2f}x the prediction: {local} workers share {cores} cores "
            f"on this machine, so busy workers wait for a core; the simulator gives each "
            f"worker its own (on this machine, fewer workers may be faster)"
        )
    elif gap > 1.1:
        lines.append(
            f"  measured step is {gap:.2f}x the prediction: time goes to communication "
            f"or contention the schedule does not show (see comm wait)"
        )
    before = report.get("predicted_before_training_s")
    if before and report["median_step_s"]:
        shared = (
            f"; {local} workers share {cores} cores here, which the calibration (each stage "
            f"timed alone) cannot see"
            if oversubscribed
            else ""
        )
        lines.append(
            f"predicted before training (calibrate): {before:.4f}s per step; median step "
            f"measured {report['median_step_s']:.4f}s ({report['median_step_s'] / before:.2f}x, "
            f"including the optimizer and logging{shared})"
        )
    if report.get("phases_s"):
        lines.append(render_phases(report["phases_s"]))
    lines.append(
        f"non-finite steps: {report['nonfinite_steps'] or 'none'}; loss spikes: "
        f"{[s['step'] for s in report['loss_spikes']] or 'none'}"
    )
    for f in report.get("failures", []):
        lines.append(f"lost worker {f['what']}")
    if report["suggestions"]:
        lines += ["", "suggestions (predicted by the simulator from the measured stage times):"]
        for i, s in enumerate(report["suggestions"], 1):
            lines.append(
                f"  {i}. {s['change']:<42} step {s['predicted_step_s']:.4f}s "
                f"({s['speedup']:.2f}x): {s['why']}"
            )
    return "\n".join(lines)
