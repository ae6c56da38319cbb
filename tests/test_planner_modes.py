"""Training modes (full, LoRA, frozen, inference), 8-bit and offloaded optimizer states:
memory and time against hand computations, ``--allow``, and the answer when nothing fits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from layerwise.planner.evaluate import evaluate
from layerwise.planner.fallback import changes, suggestions
from layerwise.planner.memory import GIB, RESERVED_GIB, layer_activation_bytes, memory
from layerwise.planner.params import adapter_params, embedding_params, layer_params
from layerwise.planner.report import render_plan
from layerwise.planner.search import Fixed, enumerate_layouts, plan
from layerwise.planner.specs import (
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    gpu_preset,
    model_preset,
)
from layerwise.planner.timing import layer_costs, layer_forward_flops, optimizer_s, step_flops

# One GPU, one stage: every byte below is a hand count of the formulas in docs/planner.md.
M = ModelSpec("m", layers=4, hidden=1024, heads=16, seq=512, vocab=8000)
P = 4 * layer_params(M) + embedding_params(M)  # tied head: no second copy on one stage
ONE = Layout(dp=1, tp=1, pp=1, micro_batch=1)
H100 = gpu_preset("h100-80gb")
SBH = 512 * 1 * 1024


def mem(mode: str, lay: Layout = ONE, rank: int = 16):  # type: ignore[no-untyped-def]
    return memory(M, TrainSpec(global_batch=8, mode=mode, lora_rank=rank), lay)


def test_full_training_is_16_bytes_per_parameter() -> None:
    m = mem("full")
    assert (m.weights, m.gradients, m.optimizer) == pytest.approx((2 * P / GIB, 2 * P / GIB,
                                                                   12 * P / GIB))  # fmt: skip
    assert m.activations == pytest.approx((4 * layer_activation_bytes(M, ONE) + SBH) / GIB)


def test_lora_freezes_the_base_in_bf16_and_trains_r_times_d_in_plus_d_out() -> None:
    # Q, K, V, O: 4 x (h + h); MLP up and down: 2 x (h + 4h)  ->  18 h per rank
    adapters = 4 * 8 * 18 * 1024
    assert 4 * adapter_params(M, 8) == adapters
    m = mem("lora", rank=8)
    assert m.weights == pytest.approx((2 * P + 2 * adapters) / GIB)
    assert m.gradients == pytest.approx(2 * adapters / GIB)
    assert m.optimizer == pytest.approx(12 * adapters / GIB)
    # activations are still stored for the backward through the frozen base, plus the
    # rank-r intermediate of each of the 6 adapted matrices
    per_layer = layer_activation_bytes(M, ONE) + 2 * 512 * 8 * 6
    assert m.activations == pytest.approx((4 * per_layer + SBH) / GIB)


def test_frozen_keeps_weights_and_activations_only() -> None:
    m = mem("frozen")
    assert (m.weights, m.gradients, m.optimizer) == (pytest.approx(2 * P / GIB), 0.0, 0.0)
    assert m.activations == pytest.approx(mem("full").activations)


def test_inference_holds_one_micro_batch_and_fp32_logits() -> None:
    m = mem("inference")
    assert (m.weights, m.gradients, m.optimizer) == (pytest.approx(2 * P / GIB), 0.0, 0.0)
    assert m.activations == pytest.approx((layer_activation_bytes(M, ONE) + 4 * SBH) / GIB)
    assert m.buffers == pytest.approx(4 * 512 * 8000 / GIB + RESERVED_GIB)


def test_8bit_states_and_offload() -> None:
    eight = mem("full", replace(ONE, optimizer_bits=8))
    assert eight.optimizer == pytest.approx(P * (4 + 2 * (1 + 4 / 2048)) / GIB)  # master + m, v
    off = mem("full", replace(ONE, offload=True))
    assert off.optimizer == 0 and off.host == pytest.approx(12 * P / GIB)
    cluster = ClusterSpec(H100, 8, 1, host_memory_gib=1.0)
    train = TrainSpec(global_batch=8)
    ev = evaluate(M, cluster, train, Layout(8, 1, 1, 1, zero=1, offload=True))
    assert ev.host_gib == pytest.approx(8 * 12 * P / 8 / GIB)  # 8 GPUs' shards on one node
    # the offloaded step: gradients down and weights up the host link, then the CPU step;
    # time counts the layers and one vocabulary table (not the position table) per worker
    shard = (4 * layer_params(M) + 8000 * 1024) / 8
    expect = shard * 4 / (64e9 * 0.8) + shard * 32 / 25e9
    assert ev.optimizer_s == pytest.approx(expect)
    assert ev.optimizer_s == optimizer_s(M, cluster, ev.layout, train=train)


def test_modes_change_the_backward() -> None:
    cluster = ClusterSpec(H100, 1, 1)
    mm = layer_forward_flops(M, 1) / (989e12 * 0.74)
    full = layer_costs(M, cluster, ONE, train=TrainSpec(8))
    frozen = layer_costs(M, cluster, ONE, train=TrainSpec(8, mode="frozen"))
    lora = layer_costs(M, cluster, ONE, train=TrainSpec(8, mode="lora", lora_rank=8))
    adapter = 2 * 512 * adapter_params(M, 8) / (989e12 * 0.74)
    assert full.matmul == pytest.approx(3 * mm) and frozen.matmul == pytest.approx(2 * mm)
    assert lora.matmul == pytest.approx(2 * mm + 3 * adapter)
    assert layer_costs(M, cluster, ONE, train=TrainSpec(8, mode="inference")).backward == 0
    modes = ("full", "frozen", "inference")
    model_flops = [step_flops(M, TrainSpec(8, mode=m), "none")[0] for m in modes]
    assert model_flops[0] == pytest.approx(3 * model_flops[2])
    assert model_flops[1] == pytest.approx(2 * model_flops[2])


def test_frozen_and_inference_reduce_no_gradients() -> None:
    cluster = ClusterSpec(H100, 8, 1)
    for mode in ("frozen", "inference"):
        ev = evaluate(M, cluster, TrainSpec(64, mode=mode), Layout(8, 1, 1, 1))
        assert ev.dp_comm_s == 0 and ev.optimizer_s == 0
    inference = evaluate(M, cluster, TrainSpec(64, mode="inference"), Layout(2, 1, 4, 1))
    training = evaluate(M, cluster, TrainSpec(64), Layout(2, 1, 4, 1))
    assert inference.step_time_s < training.step_time_s / 2


def test_modes_refuse_what_they_cannot_do() -> None:
    cluster = ClusterSpec(H100, 8, 1)
    with pytest.raises(PlanError, match="give --host-memory-gib"):
        evaluate(M, cluster, TrainSpec(8), replace(ONE, offload=True, dp=8))
    with pytest.raises(PlanError, match="use --recompute none and --zero 0"):
        evaluate(M, cluster, TrainSpec(8, mode="inference"), Layout(8, 1, 1, 1, recompute="full"))
    with pytest.raises(PlanError, match="no optimizer states to offload or quantize"):
        evaluate(M, cluster, TrainSpec(8, mode="frozen"), Layout(8, 1, 1, 1, optimizer_bits=8))
    with pytest.raises(PlanError, match="give --host-memory-gib"):
        plan(M, cluster, TrainSpec(8), Fixed(allow=("offload",)))
    with pytest.raises(PlanError, match="--allow does not know 4bit"):
        Fixed(allow=("4bit",))


def test_savers_are_searched_only_when_allowed() -> None:
    cluster, train = ClusterSpec(H100, 8, 1, host_memory_gib=2048), TrainSpec(64)
    plain = list(enumerate_layouts(M, cluster, train, Fixed()))
    assert all(not lay.offload and lay.optimizer_bits == 32 for lay in plain)
    allowed = list(enumerate_layouts(M, cluster, train, Fixed(allow=("offload", "8bit"))))
    assert len(allowed) == 4 * len(plain)
    frozen = list(enumerate_layouts(M, cluster, replace(train, mode="frozen"),
                                    Fixed(allow=("offload", "8bit"))))  # fmt: skip
    assert all(not lay.offload and lay.optimizer_bits == 32 for lay in frozen)


LLAMA, A100 = model_preset("llama2-70b"), gpu_preset("a100-80gb")


def test_allow_lora_plans_lora_when_full_training_does_not_fit() -> None:
    cluster, train = ClusterSpec(A100, 8, 1), TrainSpec(global_batch=64)
    result = plan(LLAMA, cluster, train, Fixed(allow=("lora",)), top=1)
    assert result.mode == "lora" and result.ranked and result.instead_of is not None
    assert result.instead_of.ranked == [] and result.ranked[0].mode == "lora"
    text = render_plan(result, LLAMA, cluster, train, Fixed(allow=("lora",)))
    assert "none fits on 8 x a100-80gb; --allow lora: planning LoRA rank 16 instead" in text


@pytest.mark.timeout(120)
def test_nothing_fits_names_the_cheapest_change_across_all() -> None:
    cluster, train = ClusterSpec(A100, 8, 1), TrainSpec(global_batch=64)
    tried = changes(LLAMA, cluster, train, Fixed())
    fitting = [c for c in tried if c.best is not None]
    # cheapest first: same training on the same GPUs, then LoRA, inference, more hardware
    assert [c.tier for c in fitting] == sorted(c.tier for c in fitting)
    assert fitting[0].tier == 0 and fitting[0].best is not None and fitting[0].best.fits
    flags = [c.flag for c in fitting]
    for flag in ("--offload optimizer", "--mode lora", "--mode inference", "--gpus 16"):
        assert flag in flags
    assert "--optimizer-bits 8" not in flags  # 8-bit alone is not enough for 70B on 8 GPUs
    lines = suggestions(LLAMA, cluster, train, Fixed())
    assert lines[-1] == f"cheapest change that fits: {fitting[0].label} ({fitting[0].flag})"
    assert all("GiB per GPU" in line and "s/step" in line for line in lines[1:-2])
    assert "not enough alone: --optimizer-bits 8" in lines[-2]
