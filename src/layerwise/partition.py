"""Contiguous partition of consecutive layers into stages, balanced exactly.

Layer-wise parallelism gives each worker one block of consecutive layers, so that an
activation crosses each worker boundary once per micro-batch. :func:`partition` finds the
split whose most expensive stage is as cheap as possible (the pipeline runs at the pace of
its slowest stage), exactly, by dynamic programming over prefix sums.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise


class PartitionError(ValueError):
    """A partition that is not layer-wise, or that does not fit the layers and workers."""


@dataclass(frozen=True)
class Partition:
    """One contiguous, non-empty ``range`` of layer indices per stage, covering all layers."""

    ranges: tuple[range, ...]

    def __post_init__(self) -> None:
        expected = 0
        for s, r in enumerate(self.ranges):
            if r.step != 1 or len(r) == 0:
                raise PartitionError(f"stage {s} is empty: every stage needs at least one layer")
            if r.start != expected:
                raise PartitionError(
                    f"stage {s} starts at layer {r.start}, expected {expected}: stages must "
                    f"cover the layers in order without gaps or overlaps"
                )
            expected = r.stop

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    @property
    def num_layers(self) -> int:
        return self.ranges[-1].stop if self.ranges else 0

    @property
    def sizes(self) -> list[int]:
        return [len(r) for r in self.ranges]

    def stage_of(self, layer: int) -> int:
        """Return the stage that holds ``layer``."""
        for s, r in enumerate(self.ranges):
            if layer in r:
                return s
        raise IndexError(f"layer {layer} is outside 0..{self.num_layers - 1}")

    def stage_costs(self, costs: Sequence[float]) -> list[float]:
        """Return the summed cost of each stage."""
        if len(costs) != self.num_layers:
            raise PartitionError(f"{len(costs)} costs for {self.num_layers} layers")
        return [math.fsum(costs[r.start : r.stop]) for r in self.ranges]

    def __str__(self) -> str:
        return " | ".join(
            f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in self.ranges
        )

    @staticmethod
    def from_sizes(sizes: Sequence[int], num_layers: int | None = None) -> Partition:
        """Build from stage sizes, e.g. ``[6, 6, 6, 6]``."""
        sizes = list(sizes)
        for s, n in enumerate(sizes):
            if n < 1:
                raise PartitionError(f"stage {s} has {n} layers; every stage needs at least one")
        if num_layers is not None and sum(sizes) != num_layers:
            raise PartitionError(
                f"stage sizes {sizes} sum to {sum(sizes)}, but the model has {num_layers} layers"
            )
        bounds = [0, *accumulate(sizes)]
        return Partition(tuple(range(a, b) for a, b in pairwise(bounds)))

    @staticmethod
    def from_boundaries(boundaries: Sequence[int], num_layers: int) -> Partition:
        """Build from the first layer of every stage after the first, e.g. ``[3, 6, 9]``."""
        points = [0, *boundaries, num_layers]
        if any(b <= a for a, b in pairwise(points)):
            raise PartitionError(
                f"boundaries {list(boundaries)} must increase strictly within 1..{num_layers - 1}"
            )
        return Partition(tuple(range(a, b) for a, b in pairwise(points)))

    @staticmethod
    def from_assignment(
        assignment: Sequence[Sequence[int]], num_layers: int | None = None
    ) -> Partition:
        """Build from the layer indices of each stage, refusing non-contiguous groups.

        ``[[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]`` is refused: that is not layer-wise.
        """
        for s, layers in enumerate(assignment):
            layers = sorted(layers)
            if not layers:
                raise PartitionError(f"stage {s} is empty: every stage needs at least one layer")
            if layers != list(range(layers[0], layers[-1] + 1)):
                raise PartitionError(
                    f"stage {s} holds layers {list(layers)}, which are not consecutive. "
                    f"Layer-wise parallelism gives each worker one contiguous block of layers "
                    f"(e.g. {layers[0]}-{layers[0] + len(layers) - 1}), so an activation "
                    f"crosses each worker boundary once; a strided split would send it back "
                    f"and forth between workers at every layer."
                )
        ranges = sorted((range(min(g), max(g) + 1) for g in assignment), key=lambda r: r.start)
        part = Partition(tuple(ranges))
        if [r.start for r in ranges] != [min(g) for g in assignment]:
            raise PartitionError("stages must hold layers in order: stage s+1 after stage s")
        if num_layers is not None and part.num_layers != num_layers:
            raise PartitionError(
                f"assignment covers {part.num_layers} layers, model has {num_layers}"
            )
        return part


def _check_costs(costs: Sequence[float], num_stages: int) -> list[float]:
    values = [float(c) for c in costs]
    for i, c in enumerate(values):
        if not math.isfinite(c) or c < 0:
            raise PartitionError(f"cost of layer {i} is {c}: costs must be finite and >= 0")
    if num_stages < 1:
        raise PartitionError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > len(values):
        raise PartitionError(
            f"cannot split {len(values)} layers into {num_stages} stages: every stage needs at "
            f"least one layer (use at most {len(values)} workers, or split layers finer)"
        )
    return values


def min_max_cost(costs: Sequence[float], num_stages: int) -> float:
    """Return the smallest possible cost of the most expensive stage."""
    return max(partition(costs, num_stages).stage_costs(costs))


def partition(costs: Sequence[float], num_stages: int) -> Partition:
    """Split layers with ``costs`` into ``num_stages`` contiguous stages, minimizing the
    cost of the most expensive stage exactly.

    best[k][j] is the optimal bottleneck for the first j layers in k stages. For fixed j the
    last stage's cost falls and best[k-1][i] rises as the cut i moves right, so the optimal
    cut is where they cross: a binary search, O(k n log n) overall. Ties go to the cut that
    makes the last stage's cost closest to the previous stages' bottleneck, which spreads
    layers evenly when costs are equal.
    """
    values = _check_costs(costs, num_stages)
    n, k_max = len(values), num_stages
    prefix = [0.0, *accumulate(values)]
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        best[1][j] = prefix[j]
    for k in range(2, k_max + 1):
        row, prev = best[k], best[k - 1]
        for j in range(k, n + 1):
            lo, hi = k - 1, j - 1  # the last stage is layers i..j-1, i in [lo, hi]
            # first i where prev[i] >= last-stage cost (prefix[j] - prefix[i])
            keys = range(lo, hi + 1)
            pos = bisect.bisect_left(keys, True, key=lambda i: prev[i] >= prefix[j] - prefix[i])
            candidates = [keys[c] for c in (pos - 1, pos) if 0 <= c < len(keys)]
            i_best = min(
                candidates,
                key=lambda i: (
                    max(prev[i], prefix[j] - prefix[i]),
                    abs(prev[i] - (prefix[j] - prefix[i])),
                ),
            )
            row[j] = max(prev[i_best], prefix[j] - prefix[i_best])
            cut[k][j] = i_best
    bounds = [n]
    for k in range(k_max, 1, -1):
        bounds.append(cut[k][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return Partition(tuple(range(a, b) for a, b in pairwise(bounds)))


def uniform(num_layers: int, num_stages: int) -> Partition:
    """Split by layer count; the ``num_layers % num_stages`` leftover layers go one each to
    the first stages rather than all to the last one."""
    _check_costs([0.0] * num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    return Partition.from_sizes([base + (1 if s < extra else 0) for s in range(num_stages)])
