"""Memory and time model: formulas from the papers, and the simulator as the bubble source."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from layerwise.planner.bubble import _simulate_units, pipeline_time
from layerwise.planner.evaluate import evaluate
from layerwise.planner.memory import inflight_microbatches, layer_activation_bytes, memory
from layerwise.planner.specs import ClusterSpec, Layout, TrainSpec, gpu_preset, model_preset
from layerwise.planner.timing import step_flops
from layerwise.schedules import generate
from layerwise.simulate import Costs, simulate

GPT = model_preset("gpt3-175b")
A100 = ClusterSpec(gpu_preset("a100-80gb"), 8, 8)


def test_activation_bytes_follow_korthikanti_table_2() -> None:
    s, b, h, a, t = GPT.seq, 2, GPT.hidden, GPT.heads, 8
    sbh = s * b * h
    lay = Layout(8, t, 1, b)
    expect = {
        ("none", False): sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        ("none", True): sbh * (34 / t + 5 * a * s / (h * t)),
        ("selective", False): sbh * (10 + 24 / t),
        ("selective", True): sbh * 34 / t,
        ("full", False): 2 * sbh,
    }
    for (rec, sp), value in expect.items():
        got = layer_activation_bytes(GPT, replace(lay, recompute=rec, sequence_parallel=sp))
        # selective keeps fp32 softmax statistics (4 a s b bytes) on top of Table 2
        assert got == pytest.approx(value, rel=0.002), (rec, sp)
    no_tp = layer_activation_bytes(GPT, replace(lay, tp=1))
    assert no_tp == pytest.approx(sbh * (34 + 5 * a * s / h))


def test_interleaving_inflight_matches_korthikanti_factor() -> None:
    for p, v in ((8, 2), (8, 3), (35, 3)):
        lay = Layout(1, 1, p, 1, vpp=v)
        assert inflight_microbatches(lay, 10 * p) == pytest.approx(p * (1 + (p - 1) / (p * v)))
    assert inflight_microbatches(Layout(1, 1, 8, 1), 100) == 8
    assert inflight_microbatches(Layout(1, 1, 8, 1, schedule="gpipe"), 100) == 100


def test_mixed_precision_adam_is_16_bytes_per_parameter_and_zero_shards_it() -> None:
    train = TrainSpec(global_batch=64)
    base = Layout(dp=8, tp=8, pp=1, micro_batch=1, recompute="full")
    m0 = memory(GPT, train, base)
    states = m0.weights + m0.gradients + m0.optimizer
    assert states / m0.weights == pytest.approx(8.0)  # 16 bytes over 2 bytes of bf16 weights
    fp32 = memory(GPT, replace(train, fp32_grads=True), base)
    assert fp32.gradients == pytest.approx(2 * m0.gradients)
    totals = [memory(GPT, train, replace(base, zero=z)) for z in range(4)]
    assert totals[1].optimizer == pytest.approx(m0.optimizer / 8)
    assert totals[2].gradients == pytest.approx(m0.gradients / 8)
    assert totals[3].weights == pytest.approx(m0.weights / 8)
    assert all(a.total > b.total for a, b in itertools.pairwise(totals))


def test_recomputation_trades_memory_for_hardware_flops() -> None:
    train = TrainSpec(global_batch=64)
    mems = [memory(GPT, train, Layout(1, 8, 8, 1, recompute=r)).activations
            for r in ("none", "selective", "full")]  # fmt: skip
    assert mems[0] > mems[1] > mems[2]
    model_f, hw_none = step_flops(GPT, train, "none")
    _, hw_full = step_flops(GPT, train, "full")
    assert hw_none == model_f
    # Narayanan et al. 2021 Eq. 3 counts the recomputed forward: 96 B s l h^2 (...)
    b, s, n, h, v = 64, GPT.seq, GPT.layers, GPT.hidden, GPT.vocab
    eq3 = 96 * b * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))
    assert hw_full == pytest.approx(eq3, rel=0.001)


def test_bubble_comes_from_the_core_simulator() -> None:
    sched = generate("1f1b", num_workers=8, num_microbatches=24)
    timeline = simulate(sched, Costs.uniform(8, forward=1.0, backward=2.0))
    seconds, bubble = pipeline_time("1f1b", 8, 24, 1, 0.5, 1.0, 0.0)
    assert bubble == pytest.approx(timeline.bubble_fraction())
    assert seconds == pytest.approx(0.5 * timeline.makespan())
    ev = evaluate(GPT, A100, TrainSpec(global_batch=64), Layout(1, 8, 8, 1, vpp=2))
    assert 0 < ev.bubble_fraction < 0.2
    assert ev.pipeline_s > ev.num_microbatches * (ev.costs.forward + ev.costs.backward)


@pytest.mark.parametrize(
    ("name", "p", "m", "v"),
    [("1f1b", 8, 40, 1), ("1f1b", 4, 24, 3), ("zb-h1", 4, 13, 1), ("gpipe", 4, 20, 1)],
)
def test_long_steps_are_extrapolated_exactly(name: str, p: int, m: int, v: int) -> None:
    fwd = [1.0] * (p * v)
    bwd = [2.2] * (p * v)
    fwd[-1], bwd[-1] = 1.5, 3.2  # the output layer on the last stage
    full = simulate(generate(name if v == 1 else "interleaved-1f1b", p, m, chunks=v),
                    Costs.per_stage(fwd, bwd))  # fmt: skip
    makespan, bubble = _simulate_units(name, p, m, v, 2.2, 0.5)
    assert makespan == pytest.approx(full.makespan(), rel=1e-9)
    assert bubble == pytest.approx(full.bubble_fraction(), rel=1e-9)


def test_tensor_parallel_across_nodes_is_slower() -> None:
    model = model_preset("megatron-39b")
    cluster = ClusterSpec(gpu_preset("a100-80gb"), 8, 4)
    train = TrainSpec(global_batch=64)
    inside = evaluate(model, cluster, train, Layout(2, 8, 2, 1, recompute="full"))
    across = evaluate(model, cluster, train, Layout(2, 16, 1, 1, recompute="full"))
    # Per layer (48 on the tp=16 stage, 24 on each tp=8 stage): the ring leaves NVLink
    # for the nodes' NICs (8 x 25 GB/s here, against 300 GB/s of NVLink).
    assert across.costs.tensor_comm / 48 > 1.5 * inside.costs.tensor_comm / 24
