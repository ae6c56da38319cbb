"""Partition solver: exact against brute force, balance modes, and errors a user can act on."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from layerwise.partition import Partition, PartitionError, min_max_cost, partition, uniform
from layerwise.profile import count_params, profile_layers, resolve_balance


def brute_force(costs: list[float], k: int) -> float:
    n = len(costs)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=10).flatmap(
        lambda c: st.tuples(st.just(c), st.integers(1, len(c)))
    )
)
def test_partition_is_exactly_min_max(case: tuple[list[int], int]) -> None:
    costs, k = case
    part = partition(costs, k)
    assert part.num_stages == k
    assert part.num_layers == len(costs)
    assert all(len(r) >= 1 for r in part.ranges)
    assert max(part.stage_costs(costs)) == brute_force([float(c) for c in costs], k)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1e3), min_size=2, max_size=9), st.integers(1, 9))
def test_partition_with_float_costs(costs: list[float], k: int) -> None:
    k = min(k, len(costs))
    assert min_max_cost(costs, k) == pytest.approx(brute_force(costs, k))


def test_equal_costs_spread_evenly() -> None:
    assert partition([1.0] * 12, 4).sizes == [3, 3, 3, 3]
    assert max(partition([1.0] * 10, 4).sizes) == 3
    assert partition([1, 1, 1, 10, 1, 1], 3).stage_costs([1, 1, 1, 10, 1, 1]) == [3, 10, 2]


def test_uniform_spreads_leftover_layers() -> None:
    assert uniform(10, 4).sizes == [3, 3, 2, 2]
    assert uniform(24, 4).sizes == [6, 6, 6, 6]
    assert uniform(5, 5).sizes == [1] * 5


def test_strided_assignment_is_refused_with_explanation() -> None:
    with pytest.raises(PartitionError, match=r"not consecutive.*contiguous block"):
        Partition.from_assignment([[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    part = Partition.from_assignment([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], 12)
    assert part.sizes == [4, 4, 4]
    assert part.stage_of(5) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Partition.from_sizes([6, 6, 6, 5], 24), "sum to 23, but the model has 24"),
        (lambda: Partition.from_sizes([6, 0, 6], None), "stage 1 has 0 layers"),
        (lambda: Partition.from_assignment([[0, 1], []]), "stage 1 is empty"),
        (lambda: Partition.from_boundaries([3, 3], 6), "increase strictly"),
        (lambda: partition([1.0] * 3, 4), "cannot split 3 layers into 4 stages"),
        (lambda: partition([1.0, -1.0], 2), "finite and >= 0"),
        (lambda: partition([1.0, math.nan], 1), "finite and >= 0"),
        (lambda: partition([1.0, math.inf], 1), "finite and >= 0"),
        (lambda: partition([1.0], 0), "num_stages must be >= 1"),
    ],
)
def test_bad_input_is_explained(call: object, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        call()  # type: ignore[operator]


def test_boundaries_and_sizes_agree() -> None:
    assert Partition.from_boundaries([3, 6, 9], 12) == Partition.from_sizes([3, 3, 3, 3])
    assert str(Partition.from_sizes([1, 2])) == "0 | 1-2"


def test_balance_modes() -> None:
    layers = [nn.Linear(4, 4), nn.Linear(4, 64), nn.Linear(64, 4), nn.Linear(4, 4)]
    before = [p.detach().clone() for layer in layers for p in layer.parameters()]
    assert resolve_balance(layers, 2, "uniform").sizes == [2, 2]
    assert resolve_balance(layers, 2, [1, 3]).sizes == [1, 3]
    params = [count_params(layer) for layer in layers]
    by_params = resolve_balance(layers, 2, "params")
    assert max(by_params.stage_costs(params)) == brute_force([float(p) for p in params], 2)
    sample = torch.randn(8, 4)
    for mode in ("time", "memory"):
        part = resolve_balance(layers, 2, mode, sample=sample)
        assert part.num_stages == 2
    after = [p.detach() for layer in layers for p in layer.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None for layer in layers for p in layer.parameters())
    with pytest.raises(PartitionError, match="needs a sample input"):
        resolve_balance(layers, 2, "time")
    with pytest.raises(PartitionError, match="unknown balance"):
        resolve_balance(layers, 2, "speed")
    with pytest.raises(PartitionError, match="expected 2"):
        resolve_balance(layers, 2, [1, 1, 2])


def test_profile_counts_without_materializing_meta() -> None:
    with torch.device("meta"):
        big = nn.Linear(1024, 1024)
    assert count_params(big) == 1024 * 1024 + 1024
    profiles = profile_layers(
        [nn.Linear(8, 16), lambda: nn.Linear(16, 2)], torch.randn(3, 8), repeats=1
    )
    assert [p.params for p in profiles] == [8 * 16 + 16, 16 * 2 + 2]
    assert [p.activation_bytes for p in profiles] == [3 * 16 * 4, 3 * 2 * 4]
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in profiles)
