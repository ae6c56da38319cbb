"""``auto`` against the best registered schedule that fits the same memory cap, in simulation.

A grid of settings: p workers (2 to 16), m micro-batches (p to 4p, at most 64), one or two
stages per worker, cost profiles (equal stages, a heavy last stage as with an output layer,
a heavy first stage as with an embedding, uneven stages, W far from B/2, costly hand-offs,
uneven activation sizes) and caps (tight: half of 1F1B's peak; 1F1B's peak; loose: twice
it; never below the smallest cap any schedule can meet). For each setting:

- ``auto``'s simulated step, its peak activation memory and whether it exceeds the cap
  (it must never), and its generation time (one core, a machine shared with others);
- with ``--unseeded``, ``auto`` without the registered schedules as seeds (its rules and
  local search alone, to see what they find by themselves);
- every registered schedule that can run the stage count (``problems(p, m, v)`` empty),
  simulated with the same costs; it *fits* when its peak activation memory on every worker
  is at most the cap; the best fitting one is the comparison.

Summary: the share of settings (with at least one fitting schedule) where ``auto`` is no
worse than the best fitting one, the worst ratio ``auto / best``, the same where the best
fitting one is not the ``naive`` reference (under tight caps it is often the only one that
fits), the same for ``auto`` without seeds, and the longest generation time at p = 16,
m = 64. The full grid takes about 4 minutes on one core (twice that with ``--unseeded``).

    .venv/bin/python benchmarks/bench_auto.py --json runs/auto.json [--unseeded]
    .venv/bin/python benchmarks/bench_auto.py --reduced   # a quick check of the script
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from _common import table, write_json
from layerwise.schedules import generate, names
from layerwise.schedules.auto import NAME, search, smallest_cap
from layerwise.schedules.registry import get
from layerwise.simulate import Costs, simulate

SLACK = 1e-9  # relative: sums of sizes such as 1/3 round


@dataclass(frozen=True)
class Setting:
    p: int
    m: int
    v: int
    profile: str
    cap_name: str
    cap: float
    costs: Costs
    sizes: tuple[float, ...]


def profile_costs(name: str, p: int, v: int) -> tuple[Costs, tuple[float, ...]]:
    """Return the stages' costs (a stage is 1/v of a worker's share) and activation sizes."""
    n = p * v
    f, b = [1.0 / v] * n, [2.0 / v] * n
    wgrad: list[float] | None = None
    latency, sizes = 0.0, [p / n] * n
    if name == "heavy-last":  # an output layer on the last stage
        f[-1], b[-1] = 3 * f[-1], 3 * b[-1]
    elif name == "heavy-first":  # an embedding and a larger first block
        f[0], b[0] = 2 * f[0], 2 * b[0]
        sizes[0] *= 1.5
    elif name == "uneven":
        rng = random.Random(1000 * p + 10 * v + n)
        scale = [rng.uniform(0.6, 1.6) for _ in range(n)]
        f = [x * s for x, s in zip(f, scale, strict=True)]
        b = [x * s * rng.uniform(0.8, 1.2) for x, s in zip(b, scale, strict=True)]
    elif name == "small-w":  # W = 0.2 B: little to fill bubbles with
        wgrad = [0.2 * x for x in b]
    elif name == "large-w":  # W = 0.7 B
        wgrad = [0.7 * x for x in b]
    elif name == "costly-handoff":
        latency = 0.5 / v
    elif name == "uneven-sizes":
        sizes = [(p / n) * (1.4 if s % 2 == 0 else 0.6) for s in range(n)]
    costs = Costs.per_stage(f, b, weight_grad=wgrad, comm_latency=latency)
    return costs, tuple(sizes)


PROFILES = (
    "uniform", "heavy-last", "heavy-first", "uneven", "small-w", "large-w",
    "costly-handoff", "uneven-sizes",
)  # fmt: skip


def grid(reduced: bool) -> Iterator[Setting]:
    shapes = [(p, m, 1) for p in (2, 4, 8, 16) for m in (p, 2 * p, 4 * p) if m <= 64]
    shapes += [(p, m, 2) for p in (2, 4, 8) for m in (2 * p, 4 * p)]
    if reduced:
        shapes = [(4, 8, 1), (8, 16, 1), (4, 8, 2)]
    profiles = PROFILES[:3] if reduced else PROFILES
    for p, m, v in shapes:
        for profile in profiles:
            costs, sizes = profile_costs(profile, p, v)
            base = float(min(p, m))  # 1F1B's peak with equal sizes
            least = min(smallest_cap(p, v, pl, sizes) for pl in ("looped", "v"))
            tight = max(math.ceil(base / 2), least)  # what some schedule can meet
            for cap_name, cap in (("tight", tight), ("1f1b", base), ("loose", 2 * base)):
                yield Setting(p, m, v, profile, cap_name, float(cap), costs, sizes)


def peak(schedule: Any, costs: Costs, sizes: tuple[float, ...]) -> tuple[float, float]:
    """Return (simulated step, peak activation memory over the workers)."""
    tl = simulate(schedule, costs)
    return tl.makespan(), max(tl.peak_activation_memory(w, sizes) for w in range(tl.num_workers))


def builtins(s: Setting) -> dict[str, tuple[float, float]]:
    """Return (step, peak memory) of every registered schedule that runs these stages."""
    out = {}
    for name in names():
        spec = get(name)
        if name == NAME or not spec.allows_chunks(s.v) or spec.problems(s.p, s.m, s.v):
            continue
        out[name] = peak(generate(name, s.p, s.m, s.v), s.costs, s.sizes)
    return out


def run(s: Setting, unseeded: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    found = search(s.costs, s.p, s.m, s.cap, stage_sizes=s.sizes)
    seconds = time.perf_counter() - t0
    step, mem = peak(found.schedule, s.costs, s.sizes)
    others = builtins(s)
    fitting = {n: st for n, (st, pk) in others.items() if pk <= s.cap * (1 + SLACK)}
    best = min(fitting, key=lambda n: fitting[n]) if fitting else None
    row: dict[str, Any] = {
        "p": s.p, "m": s.m, "v": s.v, "profile": s.profile, "cap_name": s.cap_name,
        "cap": s.cap, "auto_step": step, "auto_peak": mem,
        "auto_over_cap": mem > s.cap * (1 + SLACK), "auto_seconds": seconds,
        "auto_simulations": found.simulations, "best_builtin": best,
        "best_builtin_step": fitting[best] if best else None,
        "ratio": step / fitting[best] if best else None,
        "placement": "v" if found.schedule.stage_worker[-1] == 0 and s.v > 1 else "looped",
        "builtins": {n: {"step": st, "peak": pk} for n, (st, pk) in others.items()},
    }  # fmt: skip
    if unseeded:
        alone = search(s.costs, s.p, s.m, s.cap, stage_sizes=s.sizes, seed_builtins=False)
        row["unseeded_step"] = alone.step
        row["unseeded_ratio"] = alone.step / fitting[best] if best else None
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    compared = [r for r in rows if r["ratio"] is not None]
    real = [r for r in compared if r["best_builtin"] != "naive"]  # more than the reference
    big = [r["auto_seconds"] for r in rows if r["p"] == 16 and r["m"] == 64]
    out: dict[str, Any] = {
        "settings": len(rows),
        "compared": len(compared),
        "no_fitting_builtin": len(rows) - len(compared),
        "share_no_worse": _share(compared, "ratio"),
        "worst_ratio": max((r["ratio"] for r in compared), default=None),
        "mean_ratio": _mean(compared, "ratio"),
        "compared_not_naive": len(real),
        "share_no_worse_not_naive": _share(real, "ratio"),
        "worst_ratio_not_naive": max((r["ratio"] for r in real), default=None),
        "mean_ratio_not_naive": _mean(real, "ratio"),
        "better_by_half_a_percent_not_naive": sum(r["ratio"] < 0.995 for r in real),
        "over_cap": sum(r["auto_over_cap"] for r in rows),
        "max_seconds_p16_m64": max(big, default=None),
        "max_seconds": max(r["auto_seconds"] for r in rows),
    }
    if compared and "unseeded_ratio" in compared[0]:
        out["unseeded_share_no_worse"] = _share(compared, "unseeded_ratio")
        out["unseeded_worst_ratio"] = max(r["unseeded_ratio"] for r in compared)
        out["unseeded_mean_ratio"] = _mean(compared, "unseeded_ratio")
        out["unseeded_share_no_worse_not_naive"] = _share(real, "unseeded_ratio")
        out["unseeded_worst_ratio_not_naive"] = max(
            (r["unseeded_ratio"] for r in real), default=None
        )
    return out


def _share(rows: list[dict[str, Any]], key: str) -> float | None:
    return sum(r[key] <= 1 + SLACK for r in rows) / len(rows) if rows else None


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    return sum(r[key] for r in rows) / len(rows) if rows else None


def group_table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({(r["profile"], r["cap_name"]) for r in rows})
    lines = []
    for profile, cap in keys:
        rs = [r for r in rows if (r["profile"], r["cap_name"]) == (profile, cap)]
        cmp = [r for r in rs if r["ratio"] is not None]
        share = _share(cmp, "ratio")
        lines.append([
            profile, cap, len(rs), len(cmp),
            "-" if share is None else f"{100 * share:.0f}%",
            "-" if not cmp else f"{min(r['ratio'] for r in cmp):.3f}",
            "-" if not cmp else f"{max(r['ratio'] for r in cmp):.3f}",
            f"{max(r['auto_seconds'] for r in rs):.2f}",
        ])  # fmt: skip
    head = ["profile", "cap", "settings", "compared", "no worse", "best ratio", "worst ratio",
            "max s"]  # fmt: skip
    return table(head, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", help="write the summary and every setting here")
    ap.add_argument("--reduced", action="store_true", help="a small grid, to check the script")
    ap.add_argument(
        "--unseeded", action="store_true", help="also run auto without seeds (twice the time)"
    )
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    for s in grid(args.reduced):
        rows.append(run(s, unseeded=args.unseeded))
    summary = summarize(rows)
    print(group_table(rows) + "\n")
    worst = sorted((r for r in rows if r["ratio"] is not None), key=lambda r: -r["ratio"])[:5]
    print(table(["p", "m", "v", "profile", "cap", "auto", "best built-in", "ratio"], [
        [r["p"], r["m"], r["v"], r["profile"], r["cap_name"], f"{r['auto_step']:.2f}",
         f"{r['best_builtin']} {r['best_builtin_step']:.2f}", f"{r['ratio']:.3f}"] for r in worst
    ]))  # fmt: skip
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    write_json(args.json, {"benchmark": "auto", "summary": summary, "settings": rows})


if __name__ == "__main__":
    main()
