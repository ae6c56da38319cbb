"""``layerwise diagnose RUN_A RUN_B``: why one run is slower per token than another.

Each run's median step is cut into parts that add up to it exactly, each computed by the
simulator from the stage times and hand-off the run measured (its last step's timeline):

- compute: the stages' own work, spread evenly over the workers, as if nothing waited;
- recomputation: the part of that work that recomputes forwards in backward;
- bubble: what the schedule's fill and drain add with perfectly even stages;
- stage imbalance: what the slowest stage adds beyond that;
- hand-off: what the measured latency of messages between workers adds;
- waiting for cores (when workers outnumber the machine's cores) or unexplained: the gap
  between the measured pipeline step and the simulator's;
- outside the pipeline: the optimizer, the gradient norm, logging.

Per token, the parts of run B minus those of run A add up to the measured difference, so the
slowdown is attributed to its causes with nothing left over but the named remainder.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerwise.job.progress import read_config, read_metrics
from layerwise.schedules import Schedule, chunks_for, generate, problems
from layerwise.simulate import Costs, measured_costs, simulate
from layerwise.timeline import Timeline

PARTS = ("compute", "recomputation", "bubble", "stage imbalance", "hand-off",
         "cores or unexplained", "outside the pipeline")  # fmt: skip


@dataclass
class RunParts:
    """One run's median step, cut into parts (seconds), and what they were computed from."""

    run_dir: str
    label: str
    tokens_per_step: int
    step_s: float  # median measured step, optimizer included
    parts: dict[str, float]
    measured_bubble: float
    predicted_bubble: float
    measured_pipeline_s: float
    predicted_pipeline_s: float
    workers_share_cores: bool
    schedule: Schedule
    costs: Costs


def _balanced(costs: Costs) -> Costs:
    n = costs.num_stages
    return Costs.per_stage(
        [statistics.fmean(costs.forward)] * n,
        [statistics.fmean(costs.backward)] * n,
        [statistics.fmean(costs.input_grad)] * n,
        [statistics.fmean(costs.weight_grad)] * n,
    )


def _work(schedule: Schedule, costs: Costs) -> float:
    """Busy time per worker if the stages' work were spread evenly over the workers."""
    m = schedule.num_microbatches
    return (
        m
        * sum(f + b for f, b in zip(costs.forward, costs.backward, strict=True))
        / (schedule.num_workers)
    )


def run_parts(run_dir: Path) -> RunParts:
    """Cut the median step of the finished run in ``run_dir`` into parts that add up to it."""
    cfg = read_config(run_dir)
    path = run_dir / "timeline.json"
    if not path.exists():
        raise ValueError(
            f"{run_dir} has not finished (no timeline.json): comparing needs two finished "
            f"runs; finish it with 'layerwise train --resume {run_dir}'"
        )
    measured = Timeline.from_json(json.loads(path.read_text())["measured"])
    metrics, _ = read_metrics(run_dir)
    steps = [r["step_time"] for r in metrics if "step_time" in r]
    p, m = int(cfg["workers"]), int(cfg["microbatches"])
    schedule = generate(cfg["schedule"], p, m, chunks_for(cfg["schedule"], cfg.get("chunks")))
    costs = measured_costs([measured], schedule)
    t_sim = simulate(schedule, costs).makespan()
    no_latency = Costs.per_stage(costs.forward, costs.backward, costs.input_grad,
                                 costs.weight_grad)  # fmt: skip
    t_sim0 = simulate(schedule, no_latency).makespan()
    t_even = simulate(schedule, _balanced(no_latency)).makespan()
    work = _work(schedule, costs)
    recompute = cfg.get("recompute", cfg.get("checkpoint", "never"))
    recomputed = {"always": m, "except_last": m - 1}.get(recompute, 0)
    redo = recomputed * sum(costs.forward) / p  # each recomputed forward, once more
    t_meas = measured.makespan()
    step = statistics.median(steps) if steps else t_meas
    parts = {
        "compute": work - redo,
        "recomputation": redo,
        "bubble": t_even - work,
        "stage imbalance": t_sim0 - t_even,
        "hand-off": t_sim - t_sim0,
        "cores or unexplained": t_meas - t_sim,
        "outside the pipeline": step - t_meas,
    }
    cores, local = measured.meta.get("cores"), measured.meta.get("local_workers")
    dp, tp = int(cfg.get("dp", 1)), int(cfg.get("tp", 1))
    label = f"{p} workers {schedule.name} m={m}" + (f" dp{dp} tp{tp}" if dp * tp > 1 else "")
    return RunParts(
        str(run_dir), label, int(cfg["batch_size"]) * int(cfg["seq_len"]), step, parts,
        measured.bubble_fraction(), simulate(schedule, costs).bubble_fraction(), t_meas, t_sim,
        bool(cores and local and local > cores), schedule, costs,
    )  # fmt: skip


def restoring_microbatches(slow: RunParts, target_bubble: float, batch: int) -> int | None:
    """The fewest micro-batches (dividing ``batch``) that bring ``slow``'s simulated bubble
    down to ``target_bubble`` with the same per-sequence costs; None if none does."""
    sched, costs = slow.schedule, slow.costs
    m0 = sched.num_microbatches
    name, p, v = sched.name, sched.num_workers, sched.chunks
    if simulate(sched, _balanced(costs)).bubble_fraction() <= target_bubble:
        return None  # nothing to restore
    for m in range(m0 + 1, batch + 1):
        if batch % m or problems(name, p, m, v):
            continue
        scale = m0 / m  # the same batch in more, smaller micro-batches
        scaled = Costs.per_stage([f * scale for f in costs.forward],
                                 [b * scale for b in costs.backward])  # fmt: skip
        if simulate(generate(name, p, m, v), _balanced(scaled)).bubble_fraction() <= target_bubble:
            return m
    return None


def compare(run_a: Path, run_b: Path) -> dict[str, Any]:
    """Return the side-by-side report of two finished runs as a JSON-ready dict."""
    a, b = run_parts(run_a), run_parts(run_b)
    per_token = {
        part: (b.parts[part] / b.tokens_per_step - a.parts[part] / a.tokens_per_step)
        for part in PARTS
    }
    measured = b.step_s / b.tokens_per_step - a.step_s / a.tokens_per_step
    batch = int(read_config(run_b)["batch_size"]) // int(read_config(run_b).get("dp", 1))
    fix = restoring_microbatches(b, a.predicted_bubble, batch)
    return {
        "runs": [
            {
                "run_dir": r.run_dir,
                "label": r.label,
                "step_s": r.step_s,
                "tokens_per_step": r.tokens_per_step,
                "parts_s": r.parts,
                "measured_bubble": r.measured_bubble,
                "predicted_bubble": r.predicted_bubble,
                "measured_pipeline_s": r.measured_pipeline_s,
                "predicted_pipeline_s": r.predicted_pipeline_s,
                "workers_share_cores": r.workers_share_cores,
            }
            for r in (a, b)
        ],
        "difference_per_token_s": measured,
        "attribution_per_token_s": per_token,
        "microbatches_restoring_bubble": fix,
    }


def render_comparison(report: dict[str, Any]) -> str:
    """The comparison as text: each part per token for both runs, and B minus A."""
    a, b = report["runs"]
    us = 1e6
    lines = [
        f"A: {a['run_dir']} ({a['label']}): {a['step_s'] * 1e3:.1f} ms per step, "
        f"{a['step_s'] / a['tokens_per_step'] * us:.2f} us per token",
        f"B: {b['run_dir']} ({b['label']}): {b['step_s'] * 1e3:.1f} ms per step, "
        f"{b['step_s'] / b['tokens_per_step'] * us:.2f} us per token",
        "",
        f"{'us per token':<22}{'A':>9}{'B':>9}{'B - A':>9}",
    ]
    for part in PARTS:
        va = a["parts_s"][part] / a["tokens_per_step"] * us
        vb = b["parts_s"][part] / b["tokens_per_step"] * us
        name = part
        if part == "cores or unexplained":
            shared = a["workers_share_cores"] or b["workers_share_cores"]
            name = "waiting for cores" if shared else "unexplained"
        lines.append(f"{name:<22}{va:>9.2f}{vb:>9.2f}{vb - va:>+9.2f}")
    total = report["difference_per_token_s"] * us
    lines.append(f"{'measured difference':<22}{'':>18}{total:>+9.2f}")
    lines.append("")
    for tag, r in (("A", a), ("B", b)):
        lines.append(
            f"{tag}: bubble measured {100 * r['measured_bubble']:.1f}%, predicted "
            f"{100 * r['predicted_bubble']:.1f}%; pipeline step measured "
            f"{r['measured_pipeline_s'] * 1e3:.1f} ms, predicted "
            f"{r['predicted_pipeline_s'] * 1e3:.1f} ms"
        )
    fix = report["microbatches_restoring_bubble"]
    if fix is not None:
        lines.append(f"B's bubble comes down to A's with --microbatches {fix} (simulated)")
    return "\n".join(lines)
