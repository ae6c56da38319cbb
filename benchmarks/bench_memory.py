"""Peak activation memory per worker: GPipe vs 1F1B vs 1F1B with recomputation, measured.

Every stage is one "wide" layer, ``Linear(d, H) -> ReLU -> Linear(H, d)``, whose backward
needs the ReLU output: ``rows x H`` float32 per micro-batch (4 MiB with the defaults), while
what crosses a stage boundary is only ``rows x d``. Two measurements per worker and step:

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

The expected stash depth (micro-batches in flight on the worker, from the measured
timeline) is printed next to them.

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
from _common import median, table, write_json
from layerwise.job.launcher import run_workers

CONFIGS = (
    ("gpipe", "never"),
    ("gpipe", "always"),
    ("1f1b", "never"),
    ("1f1b", "always"),
    ("zb-h1", "never"),
)

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
        SavedBytes.params.update(p.untyped_storage().data_ptr() for p in self.parameters())
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return self.inner(x)  # type: ignore[no-any-return]


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


def worker(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, rows, d, hidden = args["microbatches"], args["rows"], args["width"], args["hidden"]
    x = torch.randn(m * rows, d)
    y = torch.randn(m * rows, d)
    results = []
    for schedule, ckpt in args["configs"]:
        layers = [wide_layer(d, hidden) for _ in range(world)]
        pipe = lw.Pipeline(layers, schedule=schedule, microbatches=m, loss_fn=mse, recompute=ckpt)
        saved, rss, depth = [], [], []
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
        row = {
            "schedule": schedule,
            "checkpoint": ckpt,
            "worker": rank,
            "saved_peak_bytes": max(saved),
            "rss_peak_bytes": median(rss),
            "peak_inflight": max(depth),
            "live_after_step": SavedBytes.live,
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, row)
        results.extend(gathered if rank == 0 else [])
        del pipe
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", "-p", type=int, default=4)
    ap.add_argument("--microbatches", "-m", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64, help="rows per micro-batch")
    ap.add_argument("--width", type=int, default=16, help="width passed between stages")
    ap.add_argument("--hidden", type=int, default=16384, help="width of the stashed activation")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    p = args.workers
    config = {
        "configs": list(CONFIGS),
        "microbatches": args.microbatches,
        "rows": args.rows,
        "width": args.width,
        "hidden": args.hidden,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    results = run_workers(worker, p, config, timeout_s=600)[0]
    act = args.rows * args.hidden * 4
    print(
        f"p = {p} workers, m = {args.microbatches} micro-batches; one stashed activation "
        f"(rows x hidden float32) = {act / MiB:.2f} MiB per micro-batch per stage\n"
    )
    by_cfg: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by_cfg.setdefault((r["schedule"], r["checkpoint"]), []).append(r)
    rows_saved, rows_rss = [], []
    for (schedule, ckpt), rs in by_cfg.items():
        rs.sort(key=lambda r: r["worker"])
        label = f"{schedule}, recompute={ckpt}"
        rows_saved.append(
            [label]
            + [f"{r['saved_peak_bytes'] / MiB:.1f} ({r['saved_peak_bytes'] / act:.2f})" for r in rs]
            + ["/".join(str(r["peak_inflight"]) for r in rs)]
        )
        rows_rss.append([label] + [f"{r['rss_peak_bytes'] / MiB:.1f}" for r in rs])
    workers = [f"worker {w}" for w in range(p)]
    print("Peak saved-for-backward bytes, MiB (in micro-batches' activations):\n")
    print(table(["schedule", *workers, "in flight (timeline)"], rows_saved))
    print("\nPeak process RSS growth during the step, MiB:\n")
    print(table(["schedule", *workers], rows_rss))
    write_json(
        args.json,
        {"benchmark": "memory", "config": {**config, "workers": p}, "results": results},
    )


if __name__ == "__main__":
    main()
