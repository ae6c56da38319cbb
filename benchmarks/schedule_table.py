"""Every registered schedule's bubble and peak activation memory, simulated, beside the
papers' formulas: the table in docs/schedules.md.

Costs are F = I = W = 1 per whole stage (B = I + W = 2); with v stages per worker each
stage costs 1/v of that. Bubble: idle time over workers x step. Memory: each worker's peak
activations in units of one micro-batch through one whole 1F1B stage (a chunk of a
two-chunk placement counts one half), relative to 1F1B's peak (p, on its first worker).

    .venv/bin/python benchmarks/schedule_table.py [--microbatches-per-worker 4]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from layerwise.schedules import chunks_for, generate, names, problems
from layerwise.simulate import Costs, simulate

# What the papers give for F = I = W, with m micro-batches on p workers and v stages per
# worker: the bubble as a rate (idle over the ideal step m(F+B)), and each worker's
# activation memory in whole-stage micro-batches; None where no closed form is published.
Rate = Callable[[int, int, int], float]
FORMULAS: dict[str, tuple[str, Rate | None, str, Rate | None, str]] = {
    "naive": ("p-1 per m", lambda p, m, v: p - 1, "1", lambda p, m, v: 1, "unpipelined"),
    "gpipe": ("(p-1)/m", lambda p, m, v: (p - 1) / m, "m", lambda p, m, v: m, "Huang 2019"),
    "1f1b": ("(p-1)/m", lambda p, m, v: (p - 1) / m, "p", lambda p, m, v: p, "Narayanan 2021"),
    "interleaved-1f1b": (
        "(p-1)/(vm)",
        lambda p, m, v: (p - 1) / (v * m),
        "p + (p-1)/v",
        lambda p, m, v: p + (p - 1) / v,
        "Narayanan 2021; Korthikanti 2022",
    ),
    "looped-bfs": (
        "(p-1)/(vm)",
        lambda p, m, v: (p - 1) / (v * m),
        "m",
        lambda p, m, v: m,
        "Lamy-Poirier 2023 (derived here)",
    ),
    "zb-h1": ("(p-1)/(3m)", lambda p, m, v: (p - 1) / (3 * m), "p", lambda p, m, v: p, "Qi 2023"),
    "zb-h2": ("0 *", lambda p, m, v: 0.0, "2p-1", lambda p, m, v: 2 * p - 1, "Qi 2023"),
    "interleaved-zb": ("-", None, "-", None, "PyTorch ScheduleInterleavedZeroBubble"),
    "zb-v": ("0 *", lambda p, m, v: 0.0, "p", lambda p, m, v: p, "Qi 2024"),
    "v-half": (
        "~p/(2m)",
        lambda p, m, v: p / (2 * m),
        "(p+2)//2",
        lambda p, m, v: (p + 2) // 2,
        "Qi 2024",
    ),
    "v-min": (
        "~2p/(3m)",
        lambda p, m, v: 2 * p / (3 * m),
        "(p+4)//3",
        lambda p, m, v: (p + 4) // 3,
        "Qi 2024",
    ),
    "dualpipe-v": ("(p-1)(F&B+B-3W)", None, "p + 1/2", lambda p, m, v: p + 0.5, "DeepSeek-AI 2024"),
}


def row(name: str, p: int, m: int) -> tuple[float, float] | None:
    """(bubble fraction, worst worker's peak memory / 1F1B's) for ``name``, or None."""
    v = chunks_for(name, None)
    if problems(name, p, m, v):
        return None
    sched = generate(name, p, m, v)
    per = 1.0 / v
    costs = Costs.per_stage([per] * sched.num_stages, [2 * per] * sched.num_stages,
                            [per] * sched.num_stages, [per] * sched.num_stages)  # fmt: skip
    tl = simulate(sched, costs)
    peak = max(tl.peak_activation_memory(w) for w in range(p))
    return tl.bubble_fraction(), peak / min(p, m)


def paper(name: str, p: int, m: int) -> tuple[str, str]:
    """The papers' bubble (as a share of the step) and memory (relative to 1F1B's), or '-'."""
    _, rate, _, memory, _ = FORMULAS.get(name, ("", None, "", None, ""))
    v = chunks_for(name, None)
    bubble = "-" if rate is None else f"{100 * rate(p, m, v) / (1 + rate(p, m, v)):.1f}%"
    mem = "-" if memory is None else f"{memory(p, m, v) / min(p, m):.2f}x"
    return bubble, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--microbatches-per-worker", type=int, default=4)
    args = ap.parse_args()
    k = args.microbatches_per_worker
    workers = (2, 4, 8, 16)
    head = " | ".join(f"p={p}" for p in workers)
    print(
        f"m = {k}p; each cell: simulated bubble, simulated peak memory / 1F1B's "
        f"[papers' bubble, papers' memory / 1F1B's]"
    )
    print(f"| schedule | {head} | papers' bubble rate | papers' memory | source |")
    print("|---" * (len(workers) + 4) + "|")
    for name in names():
        if name == "auto":
            continue  # built from the costs it is given: see bench_auto.py
        cells = []
        for p in workers:
            r = row(name, p, k * p)
            pb, pm = paper(name, p, k * p)
            sim = "-" if r is None else f"{100 * r[0]:.1f}%, {r[1]:.2f}x"
            cells.append(f"{sim} [{pb}, {pm}]")
        text, _, mem, _, source = FORMULAS.get(name, ("", None, "", None, ""))
        print(f"| {name} | " + " | ".join(cells) + f" | {text} | {mem} | {source} |")


if __name__ == "__main__":
    main()
