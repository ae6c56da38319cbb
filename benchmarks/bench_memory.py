"""Peak activation memory per worker of every schedule, measured, against the simulator.

Every stage is one "wide" layer, ``Linear(d, H / v) -> ReLU -> Linear(H / v, d)`` with v the
schedule's stages per worker (so every worker holds the same layers, whatever the
schedule), whose backward needs the ReLU output: ``rows x H`` float32 per micro-batch and
worker (4 MiB with the defaults), while what crosses a stage boundary is only ``rows x d``.
Every registered schedule runs (or those ``--schedules`` picks), without recomputation, and
GPipe and 1F1B also with ``recompute="always"``. Two measurements per worker and step:

1. **saved-for-backward bytes**: every layer runs under
   ``torch.autograd.graph.saved_tensors_hooks``; the pack hook wraps each tensor autograd
   saves in a small handle that counts its storage's bytes (once per storage, parameters
   excluded) while alive, and un-counts them when autograd frees the saved tensor (the
   handle is dropped with the graph). The peak of that live count over a step is the memory
   the stage holds for its backward passes, whatever the runtime does with its stash.
2. **process peak RSS growth**: the worker processes start with
   ``MALLOC_MMAP_THRESHOLD_=65536``, so every tensor of 64 KiB or more is its own ``mmap``
   and returns to the OS when freed; before each step the peak RSS (``VmHWM``) is reset via
   ``/proc/self/clear_refs`` and after it ``VmHWM - VmRSS(before)`` is the step's peak extra
   memory: stash, transient forward/backward buffers, receive buffers and gradients.

The saved bytes are compared with the simulator's prediction for the same schedule,
``Timeline.peak_activation_memory(worker, stage_sizes)`` on ``simulate(schedule)``, with each
stage's size the measured saved bytes of one micro-batch's forward through that stage
alone: the simulator counts a (stage, micro-batch) as held from its forward's start to the
end of its backward (of W, when the backward is split), and the measurement counts what
autograd actually keeps. They agree when they differ by less than half of one stage's
stash, i.e. they count the same micro-batches; what is left is what only the measurement
sees (on the first worker, the whole batch once: each micro-batch's input, saved by the
first Linear, is a view of the batch's storage, which the counter counts whole).
Recomputation keeps the stage inputs instead of the stash, which the simulator does
not model: those rows are measured only. The micro-batches in flight on the worker (from
the measured timeline) are printed too.

    .venv/bin/python benchmarks/bench_memory.py --json runs/memory.json
"""

from __future__ import annotations

import argparse
import os
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

import layerwise as lw
from _common import SCHEDULE_GROUPS, median, pick_schedules, size_problem, table, write_json
from layerwise.job.launcher import run_workers
from layerwise.schedules import chunks_for, names

# schedules that also run with recomputation, as rows of their own
RECOMPUTED = ("gpipe", "1f1b")

MiB = 2**20


class SavedBytes:
    """Live bytes of the tensors autograd has saved for backward in this process."""

    live: ClassVar[int] = 0
    peak: ClassVar[int] = 0
    refs: ClassVar[dict[int, list[int]]] = {}  # storage pointer -> [handles alive, bytes]
    params: ClassVar[set[int]] = set()

    @classmethod
    def reset_peak(cls) -> None:
        cls.peak = cls.live


class _Handle:
    """What autograd keeps instead of a saved tensor; dropping it un-counts the tensor."""

    __slots__ = ("key", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        # detached: holding the tensor itself would, for a saved *output*, make a cycle
        # (node -> saved variable -> handle -> tensor -> node) that nothing ever frees
        self.tensor = tensor.detach()
        self.key = tensor.untyped_storage().data_ptr()
        if self.key in SavedBytes.params or tensor.device.type == "meta":
            self.key = 0
            return
        entry = SavedBytes.refs.setdefault(self.key, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            SavedBytes.live += entry[1]
            SavedBytes.peak = max(SavedBytes.peak, SavedBytes.live)
        entry[0] += 1

    def __del__(self) -> None:
        if not self.key:
            return
        entry = SavedBytes.refs[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            SavedBytes.live -= entry[1]
            del SavedBytes.refs[self.key]


def _pack(t: torch.Tensor) -> _Handle:
    return _Handle(t)


def _unpack(h: _Handle) -> torch.Tensor:
    return h.tensor


class Counted(nn.Module):
    """Runs ``inner`` with the saved-tensor hooks on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # touches no parameter: the runtime checks that a split backward (I, W) sees every
        # parameter used only inside its own module, and reading a parameter's storage here
        # would count as a use outside it, so the stage would not split (see count_params)
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return self.inner(x)


def count_params(pipe: lw.Pipeline) -> None:
    """Make the counter skip exactly this pipeline's parameters (autograd saves some of
    them; they are not activations). Set anew per pipeline: a freed parameter's address
    may come back as an activation's."""
    SavedBytes.params = {p.untyped_storage().data_ptr() for p in pipe.parameters()}


def wide_layer(d: int, hidden: int) -> nn.Module:
    return Counted(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def stash_of_one(pipe: lw.Pipeline, rows: int, width: int) -> dict[int, int]:
    """Return, for each stage on this worker, the saved-for-backward bytes of one
    micro-batch's forward through it alone (the unit the simulator's sizes are given in).

    Runs on the stage's own layers, whose parameters the counter knows to skip; the
    forward changes nothing (no buffers, no backward)."""
    sizes = {}
    for s, stage in pipe.stages.items():
        x = torch.randn(rows, width, requires_grad=s > 0)  # as received: a leaf needing grad
        before = SavedBytes.live
        with torch.enable_grad():
            out = x
            for layer in stage.layers:
                out = layer(out)
            sizes[s] = SavedBytes.live - before
        del out  # drops the graph, and with it the counted handles
    return sizes


def simulated_peaks(schedule: Any, stage_bytes: dict[int, int]) -> tuple[list[float], list[float]]:
    """Return each worker's simulated peak stash in bytes (stage sizes: the measured bytes
    of one micro-batch's stash) and in the simulator's own units (a worker's stages
    together weigh 1 per micro-batch)."""
    tl = lw.simulate(schedule, lw.Costs.uniform(schedule.num_stages))
    sizes = [float(stage_bytes[s]) for s in range(schedule.num_stages)]
    workers = range(schedule.num_workers)
    return (
        [tl.peak_activation_memory(w, sizes) for w in workers],
        [tl.peak_activation_memory(w) for w in workers],
    )


def worker(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, rows, d, hidden = args["microbatches"], args["rows"], args["width"], args["hidden"]
    x = torch.randn(m * rows, d)
    y = torch.randn(m * rows, d)
    results = []
    for schedule, ckpt in args["configs"]:
        v = chunks_for(schedule, None)
        layers = [wide_layer(d, hidden // v) for _ in range(world * v)]
        pipe = lw.Pipeline(layers, schedule=schedule, microbatches=m, loss_fn=mse, recompute=ckpt)
        count_params(pipe)
        mine = stash_of_one(pipe, rows, d)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        stage_bytes = {s: b for part in everyone for s, b in part.items()}
        sim_bytes, sim_units = simulated_peaks(pipe.schedule, stage_bytes)
        saved, rss, depth, held = [], [], [], []
        for i in range(args["warmup"] + args["steps"]):
            pipe.zero_grad()
            dist.barrier()
            before = _status("VmRSS")
            hwm_ok = _reset_hwm()
            SavedBytes.reset_peak()
            pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
            peak_rss = _status("VmHWM") - before if hwm_ok else -1
            tl = pipe.timeline()
            if i >= args["warmup"]:
                saved.append(SavedBytes.peak)
                rss.append(peak_rss)
                depth.append(tl.peak_inflight(rank))
                sizes = [float(stage_bytes[s]) for s in range(pipe.schedule.num_stages)]
                held.append(tl.peak_activation_memory(rank, sizes))
        row = {
            "schedule": schedule,
            "checkpoint": ckpt,
            "chunks": v,
            "worker": rank,
            "saved_peak_bytes": max(saved),
            "rss_peak_bytes": median(rss),
            "peak_inflight": max(depth),
            "stage_stash_bytes": [stage_bytes[s] for s in sorted(mine)],
            "simulated_peak_bytes": sim_bytes[rank],
            "simulated_peak_units": sim_units[rank],
            "measured_timeline_peak_bytes": max(held),
            "live_after_step": SavedBytes.live,
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, row)
        results.extend(gathered if rank == 0 else [])
        pipe.close()
        del pipe
    return results


def configs_of(
    schedules: list[str], recomputed: list[str], p: int, m: int
) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """Return the (schedule, recompute) rows to run, in registry order with each
    recomputed row after its schedule, and the schedules the registry refuses, with why."""
    configs, skipped = [], []
    for name in schedules:
        problem = size_problem(name, p, m)
        if problem is not None:
            skipped.append([name, problem])
            continue
        configs.append((name, "never"))
        if name in recomputed:
            configs.append((name, "always"))
    return configs, skipped


def agreement(r: dict[str, Any]) -> tuple[str, bool | None]:
    """Return a worker's cell "measured / simulated MiB" and whether they agree (None for
    recomputation, which the simulator does not model)."""
    meas = r["saved_peak_bytes"]
    if r["checkpoint"] != "never":
        return f"{meas / MiB:.2f} / -", None
    sim = r["simulated_peak_bytes"]
    # the same micro-batches held: closer than half of the smallest stash of one stage
    unit = min(r["stage_stash_bytes"])
    return f"{meas / MiB:.2f} / {sim / MiB:.2f}", abs(meas - sim) < unit / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", "-p", type=int, default=4)
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument(
        "--schedules",
        nargs="+",
        default=["all"],
        choices=[*SCHEDULE_GROUPS, *names()],
        help="registered names, 'all' (default) or 'new' (those added with the V placement "
        "and split backward)",
    )
    ap.add_argument(
        "--recompute",
        nargs="*",
        default=list(RECOMPUTED),
        help="schedules that also get a row with recompute=always (default: gpipe 1f1b)",
    )
    ap.add_argument("--rows", type=int, default=64, help="rows per micro-batch")
    ap.add_argument("--width", type=int, default=16, help="width passed between stages")
    ap.add_argument(
        "--hidden", type=int, default=16384, help="width of the stashed activation, per worker"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    p = args.workers
    configs, skipped = configs_of(
        pick_schedules(args.schedules), args.recompute, p, args.microbatches
    )
    config = {
        "configs": configs,
        "microbatches": args.microbatches,
        "rows": args.rows,
        "width": args.width,
        "hidden": args.hidden,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    results = run_workers(worker, p, config, timeout_s=600)[0] if configs else []
    act = args.rows * args.hidden * 4
    print(
        f"p = {p} workers, m = {args.microbatches} micro-batches; one micro-batch's stashed "
        f"activation per worker (rows x hidden float32) = {act / MiB:.2f} MiB, split over the "
        f"worker's stages\n"
    )
    by_cfg: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by_cfg.setdefault((r["schedule"], r["checkpoint"]), []).append(r)
    rows_saved, rows_rss = [], []
    agreeing = compared = 0
    for (schedule, ckpt), rs in by_cfg.items():
        rs.sort(key=lambda r: r["worker"])
        label = f"{schedule}, recompute={ckpt}"
        cells = [agreement(r) for r in rs]
        verdicts = [ok for _, ok in cells]
        if ckpt == "never":
            compared += 1
            agreeing += all(verdicts)
        verdict = "n/a (recompute)" if ckpt != "never" else "yes" if all(verdicts) else (
            "**no**: worker " + ", ".join(str(w) for w, ok in enumerate(verdicts) if not ok)
        )  # fmt: skip
        rows_saved.append(
            [label, rs[0]["chunks"]]
            + [cell for cell, _ in cells]
            + ["/".join(f"{r['simulated_peak_units']:g}" for r in rs)]
            + ["/".join(str(r["peak_inflight"]) for r in rs)]
            + [verdict]
        )
        rows_rss.append([label] + [f"{r['rss_peak_bytes'] / MiB:.1f}" for r in rs])
    workers = [f"worker {w} meas / sim MiB" for w in range(p)]
    print("Peak saved-for-backward bytes per worker, measured against simulated:\n")
    print(
        table(
            [
                "schedule",
                "stages/worker",
                *workers,
                "simulated (units: a worker's stages = 1)",
                "in flight (timeline)",
                "agree",
            ],
            rows_saved,
        )
    )
    print(f"\n{agreeing} of {compared} schedules agree on every worker")
    print("\nPeak process RSS growth during the step, MiB:\n")
    print(table(["schedule", *[f"worker {w}" for w in range(p)]], rows_rss))
    if skipped:
        print("\nSkipped (the registry refuses these sizes):\n")
        print(table(["schedule", "why"], skipped))
    write_json(
        args.json,
        {
            "benchmark": "memory",
            "config": {**config, "workers": p},
            "results": results,
            "skipped": [{"schedule": n, "why": w} for n, w in skipped],
        },
    )


if __name__ == "__main__":
    main()
