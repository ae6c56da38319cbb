"""Search, ranking, fixed degrees, explanations and rejected alternatives."""

from __future__ import annotations

import time

import pytest

from layerwise.planner.explain import loss_reason, suggestions
from layerwise.planner.report import render_plan
from layerwise.planner.search import Fixed, enumerate_layouts, plan
from layerwise.planner.specs import ClusterSpec, TrainSpec, gpu_preset, model_preset

A100 = gpu_preset("a100-80gb")


def test_ranking_is_sorted_fits_and_beats_every_alternative() -> None:
    model, cluster = model_preset("megatron-18b"), ClusterSpec(A100, 8, 4)
    result = plan(model, cluster, TrainSpec(global_batch=256), top=5)
    times = [ev.step_time_s for ev in result.ranked]
    assert len(times) == 5 and times == sorted(times)
    assert all(ev.fits for ev in result.ranked)
    assert all(ev.step_time_s >= times[0] for ev in result.alternatives)
    assert all(mem.total > cluster.gpu.memory_gib for _, mem in result.over_memory)
    assert result.considered == len(list(enumerate_layouts(model, cluster, TrainSpec(256),
                                                           Fixed())))  # fmt: skip


def test_fixed_degrees_are_respected() -> None:
    model, cluster = model_preset("gpt3-175b"), ClusterSpec(A100, 8, 16)
    fixed = Fixed(tp=8, pp=8, recompute="full", zero=1)
    result = plan(model, cluster, TrainSpec(global_batch=512), fixed, top=3)
    assert result.ranked
    for ev in result.ranked + result.alternatives:
        lay = ev.layout
        assert (lay.tp, lay.pp, lay.dp, lay.recompute, lay.zero) == (8, 8, 2, "full", 1)


@pytest.mark.timeout(60)
def test_search_over_1024_gpus_takes_seconds() -> None:
    start = time.perf_counter()
    result = plan(model_preset("gpt3-175b"), ClusterSpec(A100, 8, 128), TrainSpec(1536))
    assert time.perf_counter() - start < 20  # a few seconds on a laptop core
    assert result.considered > 1000 and result.ranked


def test_report_explains_winner_and_rejections() -> None:
    model, cluster = model_preset("gpt3-175b"), ClusterSpec(A100, 8, 16)
    train = TrainSpec(global_batch=512)
    result = plan(model, cluster, train)
    text = render_plan(result, model, cluster, train, Fixed())
    assert "over memory by" in text  # e.g. tp1 pp1 cannot hold 175B
    assert "bubble" in text and "Best:" in text
    across = [ev for ev in result.alternatives if ev.layout.tp > 8]
    assert across, "a tp=16 alternative should be ranked and rejected"
    assert "tensor parallel across nodes" in loss_reason(across[0], result.ranked[0], cluster)


def test_bubble_reason_for_a_deep_pipeline() -> None:
    model, cluster = model_preset("megatron-39b"), ClusterSpec(A100, 8, 4)
    train = TrainSpec(global_batch=32)
    best = plan(model, cluster, train, Fixed(tp=8, pp=1)).ranked[0]
    deep = plan(model, cluster, train, Fixed(tp=2, pp=16, vpp=1)).ranked[0]
    assert deep.bubble_fraction > 0.2
    assert "bubble of" in loss_reason(deep, best, cluster)


def test_nothing_fits_says_what_would() -> None:
    model, cluster = model_preset("llama2-70b"), ClusterSpec(A100, 8, 1)
    train = TrainSpec(global_batch=64)
    result = plan(model, cluster, train)
    assert result.ranked == [] and result.over_memory
    text = "\n".join(suggestions(model, cluster, train, Fixed(recompute="none")))
    assert "over memory by" in text
    assert "with 16 GPUs" in text
    assert "with full recomputation" not in text  # it does not fit either: states alone
    more = render_plan(result, model, cluster, train, Fixed())
    assert "Nothing fits" in more
