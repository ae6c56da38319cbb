"""Timeline: what each worker did and when, predicted or measured, with metrics and pictures.

The simulator and the runtime both produce a :class:`Timeline`, so predicted and measured
idle time go through the same metrics, the same renderers and the same diagnosis.
Event kinds: ``F``, ``B``, ``I``, ``W`` are compute; ``wait`` is time blocked on a peer
(counted as idle); ``send`` is time spent posting a send (counted as communication).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COMPUTE_KINDS = frozenset({"F", "B", "I", "W"})


@dataclass(frozen=True)
class Event:
    """One interval of one worker's time."""

    worker: int
    start: float
    end: float
    kind: str  # F | B | I | W | wait | send | opt
    stage: int = -1
    microbatch: int = -1

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def label(self) -> str:
        return f"{self.kind}{self.microbatch}" if self.microbatch >= 0 else self.kind


@dataclass
class Timeline:
    """Per-worker events of one training step; ``source`` is 'simulated' or 'measured'."""

    num_workers: int
    events: list[Event]
    source: str = "simulated"
    meta: dict[str, Any] = field(default_factory=dict)

    # -- metrics ------------------------------------------------------------------------------

    def worker_events(self, worker: int) -> list[Event]:
        """Return ``worker``'s events sorted by start time."""
        return sorted((e for e in self.events if e.worker == worker), key=lambda e: e.start)

    def start(self) -> float:
        return min((e.start for e in self.events), default=0.0)

    def makespan(self) -> float:
        """Return the step's length: first start to last end over all workers."""
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - self.start()

    def busy(self, worker: int) -> float:
        """Return the time ``worker`` spent computing (F, B, I, W)."""
        return sum(
            e.duration for e in self.events if e.worker == worker and e.kind in COMPUTE_KINDS
        )

    def comm_wait(self, worker: int) -> float:
        """Return the time ``worker`` was recorded blocked on a peer (measured timelines)."""
        return sum(e.duration for e in self.events if e.worker == worker and e.kind == "wait")

    def idle(self, worker: int) -> float:
        """Return the time ``worker`` was not computing during the step."""
        return self.makespan() - self.busy(worker)

    def idle_fraction(self, worker: int) -> float:
        span = self.makespan()
        return self.idle(worker) / span if span > 0 else 0.0

    def bubble_fraction(self) -> float:
        """Return total idle over total worker time: 1 - sum(busy) / (workers * makespan)."""
        span = self.makespan()
        if span <= 0:
            return 0.0
        busy = sum(self.busy(w) for w in range(self.num_workers))
        return 1.0 - busy / (self.num_workers * span)

    def peak_inflight(self, worker: int) -> int:
        """Return the most micro-batches whose activations ``worker`` held at once.

        An activation is held from the start of its forward to the end of its backward (the
        end of W when the backward is split, since W still reads the stage's inputs).
        """
        deltas: list[tuple[float, int]] = []
        split = {(e.stage, e.microbatch) for e in self.events if e.kind == "W"}
        for e in self.events:
            if e.worker != worker:
                continue
            key = (e.stage, e.microbatch)
            if e.kind == "F":
                deltas.append((e.start, 1))
            elif e.kind == "B" or (e.kind == "W" and key in split):
                deltas.append((e.end, -1))
        peak = current = 0
        for _, d in sorted(deltas):  # releases (-1) sort before acquires at the same instant
            current += d
            peak = max(peak, current)
        return peak

    def _stage_count(self) -> int:
        """Return the number of stages: the simulator's ``meta['stages']`` if recorded, else
        one more than the highest stage any compute event names."""
        if "stages" in self.meta:
            return int(self.meta["stages"])
        return 1 + max((e.stage for e in self.events if e.kind in COMPUTE_KINDS), default=-1)

    def peak_activation_memory(
        self, worker: int, stage_sizes: Sequence[float] | None = None
    ) -> float:
        """Return the most activation memory ``worker`` held at once, in units of a whole
        1F1B stage's activations for one micro-batch.

        A (stage, micro-batch) is held over the same interval as in :meth:`peak_inflight`,
        and weighs ``stage_sizes[stage]``. By default every stage weighs
        ``num_workers / num_stages``: with v stages per worker a stage is 1/v of a worker's
        layers, so a chunk of a two-chunk placement counts one half and every worker's
        stages together weigh 1, which keeps caps comparable across placements.
        """
        if stage_sizes is None:
            n = self._stage_count()
            stage_sizes = [self.num_workers / n] * n if n else []
        deltas: list[tuple[float, int, float]] = []
        for e in self.events:
            if e.worker != worker:
                continue
            if e.kind == "F":
                deltas.append((e.start, 1, stage_sizes[e.stage]))
            elif e.kind in ("B", "W"):  # a split backward releases at the end of its W
                deltas.append((e.end, 0, -stage_sizes[e.stage]))
        peak = current = 0.0
        for _, _, d in sorted(deltas):  # releases (0) sort before acquires at the same instant
            current += d
            peak = max(peak, current)
        return peak

    def summary(self) -> dict[str, Any]:
        """Return the metrics as a JSON-ready dict."""
        return {
            "source": self.source,
            "makespan": self.makespan(),
            "bubble_fraction": self.bubble_fraction(),
            "workers": [
                {
                    "worker": w,
                    "busy": self.busy(w),
                    "idle": self.idle(w),
                    "idle_fraction": self.idle_fraction(w),
                    "comm_wait": self.comm_wait(w),
                    "peak_inflight": self.peak_inflight(w),
                    "peak_activation_memory": self.peak_activation_memory(w),
                }
                for w in range(self.num_workers)
            ],
        }

    # -- persistence --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "source": self.source,
            "meta": self.meta,
            "events": [asdict(e) for e in self.events],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Timeline:
        return Timeline(
            num_workers=int(data["num_workers"]),
            events=[Event(**e) for e in data["events"]],
            source=str(data.get("source", "measured")),
            meta=dict(data.get("meta", {})),
        )

    def shifted(self) -> Timeline:
        """Return a copy whose first event starts at time 0."""
        t0 = self.start()
        events = [
            Event(e.worker, e.start - t0, e.end - t0, e.kind, e.stage, e.microbatch)
            for e in self.events
        ]
        return Timeline(self.num_workers, events, self.source, dict(self.meta))


# -- renderers --------------------------------------------------------------------------------


def render_ascii(timeline: Timeline, width: int = 96, title: str | None = None) -> str:
    """Return a Gantt chart: one row per worker, time left to right, idle shown as '.'.

    Each compute event fills its cells with its kind and micro-batch (``F3``, ``B12``);
    blocked-on-peer time is ``~``. Short events keep at least their kind letter.
    """
    span = timeline.makespan()
    t0 = timeline.start()
    lines = [title] if title else []
    if span <= 0:
        return "\n".join([*lines, "(empty timeline)"])
    scale = width / span
    for w in range(timeline.num_workers):
        row = ["."] * width
        for e in timeline.worker_events(w):
            a = min(width - 1, round((e.start - t0) * scale))
            b = max(a + 1, min(width, round((e.end - t0) * scale)))
            if e.kind == "wait":
                fill = "~" * (b - a)
            elif e.kind in COMPUTE_KINDS:
                text = e.label if e.microbatch >= 0 else e.kind
                fill = (text + " " * (b - a))[: b - a] if b - a > len(text) else text[: b - a]
                fill = fill.replace(" ", e.kind.lower()) if b - a > len(text) + 1 else fill
            else:
                continue
            row[a:b] = list(fill)
        idle = 100.0 * timeline.idle_fraction(w)
        lines.append(f"w{w:<3}|{''.join(row)}| idle {idle:5.1f}%")
    lines.append(f"     0{' ' * (width - len(f'{span:.3g}') - 1)}{span:.3g}")
    return "\n".join(lines)


_COLORS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#8172b3", "wait": "#d0d0d0"}


def render_png(
    timelines: Sequence[Timeline], path: str | Path, titles: Sequence[str] | None = None
) -> Path:
    """Draw one Gantt panel per timeline (e.g. measured above simulated) into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(timelines)
    height = sum(0.45 * t.num_workers + 0.9 for t in timelines)
    fig, axes = plt.subplots(n, 1, figsize=(12, max(2.5, height)), squeeze=False)
    for i, tl in enumerate(timelines):
        ax = axes[i][0]
        t0 = tl.start()
        for e in tl.events:
            color = _COLORS.get(e.kind)
            if color is None:
                continue
            ax.broken_barh([(e.start - t0, e.duration)], (e.worker - 0.4, 0.8), color=color)
            if e.kind in COMPUTE_KINDS and e.duration > tl.makespan() / 60:
                ax.text(
                    e.start - t0 + e.duration / 2,
                    e.worker,
                    str(e.microbatch),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
        ax.set_yticks(range(tl.num_workers))
        ax.set_yticklabels(
            [f"worker {w}\nidle {100 * tl.idle_fraction(w):.0f}%" for w in range(tl.num_workers)],
            fontsize=7,
        )
        ax.invert_yaxis()
        ax.set_xlim(0, tl.makespan() or 1.0)
        label = titles[i] if titles else tl.source
        ax.set_title(
            f"{label}: step {tl.makespan():.4g}, bubble {100 * tl.bubble_fraction():.1f}%",
            fontsize=9,
        )
    axes[-1][0].set_xlabel("time (s)" if any(t.source == "measured" for t in timelines) else "time")
    handles = [Patch(color=c, label=k) for k, c in _COLORS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def chrome_trace(timelines: Iterable[Timeline]) -> dict[str, Any]:
    """Return Chrome trace JSON (opens in Perfetto): one process per timeline, one thread per
    worker, times in microseconds."""
    events: list[dict[str, Any]] = []
    for pid, tl in enumerate(timelines):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": tl.source}})
        for w in range(tl.num_workers):
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": w,
                    "args": {"name": f"worker {w}"},
                }
            )
        t0 = tl.start()
        for e in tl.events:
            events.append(
                {
                    "name": e.label if e.kind in COMPUTE_KINDS else e.kind,
                    "cat": e.kind,
                    "ph": "X",
                    "pid": pid,
                    "tid": e.worker,
                    "ts": (e.start - t0) * 1e6,
                    "dur": e.duration * 1e6,
                    "args": {"stage": e.stage, "microbatch": e.microbatch},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(timelines: Iterable[Timeline], path: str | Path) -> Path:
    out = Path(path)
    out.write_text(json.dumps(chrome_trace(timelines)))
    return out
