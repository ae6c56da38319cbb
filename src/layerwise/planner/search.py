"""Enumerate the layouts, drop those that do not fit, rank the rest.

Any pp (and vpp) with at least one layer per stage is enumerated: the stages get the
default split (planner/stages.py) unless the user fixed one. Offloading and 8-bit optimizer
states are tried when ``--allow`` lists them; LoRA is planned instead of full training when
``--allow lora`` is given and no full-training layout fits.

Exact step times need a pipeline simulation, which costs up to a second for p=64, m=512.
The search therefore orders fitting layouts by a lower bound (the step with only the pipeline
fill ahead of each worker for its bubble)
and simulates only while the bound can still beat the current top-k (branch and bound);
the ranking is the same as simulating every layout.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import product
from typing import TypeVar

from layerwise.planner import modes
from layerwise.planner.evaluate import Evaluation, check_layout, evaluate, lower_bound_s
from layerwise.planner.memory import Memory, memory
from layerwise.planner.specs import (
    DEFAULT_SCHEDULE,
    RECOMPUTE,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    interleavable,
)
from layerwise.planner.stages import SplitRequest, request_split
from layerwise.planner.timing import DEFAULT_CALIBRATION, Calibration

ALLOWED = ("lora", "offload", "8bit")  # what ``--allow`` may list

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_VPP = 8
SHOWN_ALTERNATIVES = 8  # the report lists this many alternatives


@dataclass(frozen=True)
class Fixed:
    """Degrees and choices the user pinned; None lets the search choose."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    micro_batch: int | None = None
    recompute: str | None = None
    zero: int | None = None
    sequence_parallel: bool | None = None
    schedules: tuple[str, ...] = (DEFAULT_SCHEDULE,)
    offload: bool | None = None
    optimizer_bits: int | None = None
    split: SplitRequest = field(default_factory=SplitRequest)
    allow: tuple[str, ...] = ()  # memory savers and modes the search may use (ALLOWED)

    def __post_init__(self) -> None:
        """Raises PlanError for a pinned degree below 1, an unknown ZeRO stage or an unknown
        ``--allow`` value."""
        unknown = [a for a in self.allow if a not in ALLOWED]
        if unknown:
            raise PlanError(
                f"--allow does not know {', '.join(unknown)}; choose from {', '.join(ALLOWED)}"
            )
        pinned = {k: getattr(self, k) for k in ("dp", "tp", "pp", "vpp", "micro_batch")}
        for name, value in pinned.items():
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise PlanError(
                    f"{flag} must be at least 1, got {value}; give 1 or more, or leave it out "
                    f"for the search to choose"
                )
        if self.zero not in (None, 0, 1, 2, 3):
            raise PlanError(
                f"--zero must be 0, 1, 2 or 3, got {self.zero}; leave it out for the search "
                f"to choose"
            )


@dataclass
class PlanResult:
    """The ranked fitting layouts, the best alternative per kind, and the rejected ones."""

    ranked: list[Evaluation]
    alternatives: list[Evaluation]  # best of each other tp, pp, recompute, ZeRO, optimizer
    over_memory: list[tuple[Layout, Memory]] = field(default_factory=list)  # most-fitting first
    considered: int = 0
    mode: str = "full"  # the training mode these layouts run
    fit_pairs: frozenset[tuple[int, int]] = frozenset()  # (tp, pp) with a layout that fits
    # When --allow lora replaced full training, the full-training search that found nothing.
    instead_of: PlanResult | None = None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


T = TypeVar("T")


def _pick(value: T | None, options: list[T]) -> list[T]:
    return options if value is None else [value]


def enumerate_layouts(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> Iterator[Layout]:
    """Yields every layout that can run and respects ``fixed``."""
    n = cluster.gpus
    for tp in _pick(fixed.tp, _divisors(n)):
        for pp in _pick(fixed.pp, _divisors(n // tp) if n % tp == 0 else []):
            dp = n // (tp * pp)
            if fixed.dp not in (None, dp) or n % (tp * pp):
                continue
            yield from _complete(model, cluster, train, fixed, dp, tp, pp)


def _complete(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed, dp: int, tp: int,
    pp: int,
) -> Iterator[Layout]:  # fmt: skip
    """Yields the valid completions of (dp, tp, pp): micro-batch, chunks, memory savers."""
    sps = _pick(fixed.sequence_parallel, [tp > 1])  # SP costs no extra bytes (Korthikanti)
    # Interleaving where pp x vpp does not divide the layers (chunks of unequal size) is left
    # to a pinned --vpp: every worker then runs at the pace of its largest chunk, and
    # simulating the long uneven warm-ups of deep pipelines would cost the search more than
    # those layouts are worth.
    vpps = _pick(fixed.vpp, [v for v in range(1, MAX_VPP + 1)
                             if v == 1 or (pp > 1 and model.layers % (pp * v) == 0)])  # fmt: skip
    zeros = _pick(fixed.zero, _zero_stages(train.mode, dp, pp))
    recomputes = _pick(fixed.recompute, list(RECOMPUTE) if modes.has_backward(train.mode)
                       else ["none"])  # fmt: skip
    states = modes.trains_weights(train.mode)
    offloads = _pick(fixed.offload, [False, True] if states and "offload" in fixed.allow
                     else [False])  # fmt: skip
    bits = _pick(fixed.optimizer_bits, [32, 8] if states and "8bit" in fixed.allow else [32])
    savers = [(off, nbits) for off in offloads for nbits in bits]
    chunked = [(v, schedule) for v in vpps
               for schedule in (fixed.schedules if v == 1 else interleavable())]  # fmt: skip
    mbs = _pick(fixed.micro_batch, list(MICRO_BATCHES))
    for mb, (v, schedule), rec, zero, sp, (off, nbits) in product(
        mbs, chunked, recomputes, zeros, sps, savers
    ):
        lay = Layout(dp, tp, pp, mb, v, rec, sp, zero, schedule, offload=off,
                     optimizer_bits=nbits)  # fmt: skip
        try:
            if fixed.split.given:
                lay = replace(lay, stage_layers=request_split(model, lay, fixed.split))
            check_layout(model, cluster, train, lay)
        except PlanError:
            continue
        yield lay


def _zero_stages(mode: str, dp: int, pp: int) -> list[int]:
    """Returns the ZeRO stages worth trying: 2 and 3 only without a pipeline; in the frozen
    and LoRA modes only 3 (it shards the frozen weights), in inference none."""
    stages = [z for z in range(4) if (dp > 1 or z == 0) and (pp == 1 or z < 2)]
    if mode == "full":
        return stages
    return [0] if mode == "inference" else [z for z in stages if z in (0, 3)]


def _group(lay: Layout) -> list[tuple[str, object]]:
    """Returns the kinds of alternative a layout belongs to."""
    # tp and pp each on their own: with any pp allowed, (tp, pp) pairs would be too many
    # kinds to simulate the best of each
    return [("tp", lay.tp), ("pp", lay.pp), ("recompute", lay.recompute), ("zero", lay.zero),
            ("optimizer", (lay.offload, lay.optimizer_bits))]  # fmt: skip


def plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    fixed: Fixed | None = None,
    top: int = 5,
    cal: Calibration = DEFAULT_CALIBRATION,
) -> PlanResult:
    """Returns the fitting layouts ranked by predicted step time, best first, with the best
    alternative of each kind and the layouts rejected for memory. With ``--allow lora`` and
    no full-training layout that fits, the LoRA layouts are ranked instead."""
    fixed = fixed or Fixed()
    if cluster.host_memory_gib is None and (fixed.offload or "offload" in fixed.allow):
        raise PlanError(
            "offloading keeps the optimizer states in host memory, whose size is not known: "
            "give --host-memory-gib (CPU memory of one node in GiB, e.g. 2048 for a DGX H100)"
        )
    result = _search(model, cluster, train, fixed, top, cal)
    if result.ranked or train.mode != "full" or "lora" not in fixed.allow:
        return result
    lora = _search(model, cluster, replace(train, mode="lora"), fixed, top, cal)
    lora.instead_of = result
    return lora


def _search(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed, top: int,
    cal: Calibration,
) -> PlanResult:  # fmt: skip
    """Returns the ranked layouts of one training mode (see :func:`plan`)."""
    fitting: list[tuple[float, int, Layout]] = []
    over: list[tuple[Layout, Memory]] = []
    count = 0
    for lay in enumerate_layouts(model, cluster, train, fixed):
        count += 1
        mem = memory(model, train, lay)
        host_need = mem.host * cluster.gpus_per_node
        if mem.total > cluster.gpu.memory_gib or host_need > (cluster.host_memory_gib or 0.0):
            over.append((lay, mem))
            continue
        fitting.append((lower_bound_s(model, cluster, train, lay, cal), count, lay))
    if count == 0:
        raise PlanError(_no_layout_message(model, cluster, train, fixed))
    fitting.sort(key=lambda x: (x[0], x[1]))
    over.sort(key=lambda x: x[1].total)
    ranked: list[Evaluation] = []  # a max-heap of the best ``top`` by step time
    heap: list[tuple[float, int, Evaluation]] = []
    group_best: dict[tuple[str, object], Evaluation] = {}
    for bound, order, lay in fitting:
        groups = _group(lay)
        worst_top = -heap[0][0] if len(heap) >= top else float("inf")
        needed = bound < worst_top or any(
            g not in group_best or bound < group_best[g].step_time_s for g in groups
        )
        if not needed:
            continue
        ev = evaluate(model, cluster, train, lay, cal)
        if ev.step_time_s < worst_top:
            heapq.heappush(heap, (-ev.step_time_s, order, ev))
            if len(heap) > top:
                heapq.heappop(heap)
        for g in groups:
            if g not in group_best or ev.step_time_s < group_best[g].step_time_s:
                group_best[g] = ev
    ranked = [ev for _, _, ev in sorted(heap, key=lambda x: (-x[0], x[1]))]
    winner = ranked[0].layout if ranked else None
    alts = {id(ev): ev for ev in group_best.values() if ev.layout != winner}
    alternatives = sorted(alts.values(), key=lambda ev: ev.step_time_s)
    pairs = frozenset((lay.tp, lay.pp) for _, _, lay in fitting)
    return PlanResult(ranked, alternatives, over, count, train.mode, pairs)


def _no_layout_message(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixed: Fixed
) -> str:
    """Returns why no layout can run, naming the first constraint that fails."""
    tp = fixed.tp or 1
    given = fixed.split.layers_per_stage  # without --pp, the list says how many stages
    pp = fixed.pp or (max(1, len(given) // (fixed.vpp or 1)) if given else 1)
    dp = fixed.dp or max(1, cluster.gpus // (tp * pp))
    lay = Layout(dp, tp, pp, fixed.micro_batch or 1, fixed.vpp or 1, offload=bool(fixed.offload),
                 optimizer_bits=fixed.optimizer_bits or 32)  # fmt: skip
    try:
        lay = replace(lay, stage_layers=request_split(model, lay, fixed.split))
        check_layout(model, cluster, train, lay)
    except PlanError as err:
        return f"no layout can run: {err}"
    return "no layout can run with the fixed options given"
