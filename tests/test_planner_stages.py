"""Uneven pipeline stages: the default split, the overrides and their errors, memory of the
worst stage, and time through the per-stage simulator."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from layerwise.cli.plan import run_plan
from layerwise.planner.bubble import _simulate_stages, pipeline_time
from layerwise.planner.evaluate import evaluate, pipeline_costs
from layerwise.planner.memory import GIB, RESERVED_GIB, layer_activation_bytes, memory
from layerwise.planner.params import embedding_params, layer_params
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
from layerwise.planner.stages import (
    SplitRequest,
    default_split,
    first_last_split,
    item_costs,
    request_split,
)
from layerwise.schedules import forward_only, generate
from layerwise.simulate import Costs, simulate
from planner_helpers import parse

BLOOM = model_preset("bloom-176b")
BLOOM_SPLIT = (5, *[6] * 10, 5)  # as BigScience ran it (train/tr11-176B-ml README)
SMALL = ModelSpec("small", layers=70, hidden=1024, heads=16, seq=512, vocab=8000)
H100 = gpu_preset("h100-80gb")


def run(argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_plan(parse(argv.split()))
    out, err = capsys.readouterr()
    return code, out, err


def test_embedding_and_head_are_costed_by_parameters_and_flops() -> None:
    # BigScience's own figures: 2,466,437,120 parameters per layer, 3,596,615,680 in the
    # embedding (250880 x 14336); the head's matmul is h V / (12 h^2 + 2 s h) of a layer's.
    h, v, s = 14336, 250880, 2048
    assert layer_params(BLOOM) == 2_466_437_120
    assert embedding_params(BLOOM) == 3_596_615_680
    costs = item_costs(BLOOM)
    assert len(costs) == 72 and costs[1:-1] == [1.0] * 70
    assert costs[0] == pytest.approx(3_596_615_680 / 2_466_437_120)
    flops = h * v / (12 * h * h + 2 * s * h)
    assert flops == pytest.approx(1.4244, abs=1e-4)
    assert costs[-1] == pytest.approx(max(costs[0], flops))  # the tied copy weighs more


def test_default_split_reproduces_bloom_and_keeps_even_splits_even() -> None:
    assert default_split(BLOOM, 12) == BLOOM_SPLIT
    assert default_split(model_preset("gpt3-175b"), 8) == (12,) * 8  # embedding 0.36 layer
    assert default_split(model_preset("megatron-530b"), 105) == (1,) * 105
    assert sum(default_split(SMALL, 12)) == 70


def test_a_stage_never_holds_only_the_embedding_or_the_head() -> None:
    huge_vocab = ModelSpec("v", layers=6, hidden=64, heads=4, seq=64, vocab=64_000)
    assert item_costs(huge_vocab)[0] > 6  # the embedding alone outweighs all the layers
    assert default_split(huge_vocab, 3) == (1, 4, 1)
    with pytest.raises(PlanError, match=r"6 layers cannot fill 8 pipeline stages"):
        default_split(huge_vocab, 8)


def test_first_and_last_stage_layers_follow_megatron() -> None:
    looped = tuple(s % 12 for s in range(12))
    assert first_last_split(70, looped, 12, 4, None) == (4, *[6] * 11)
    assert first_last_split(70, looped, 12, 4, 4) == (4, 7, 7, *[6] * 8, 4)
    # with two chunks per worker the first worker's 6 layers go 3 + 3 over its chunks
    assert first_last_split(16, (0, 1, 0, 1), 2, 6, None) == (3, 5, 3, 5)
    lay = Layout(1, 1, 2, 1, vpp=2)
    assert request_split(SMALL, lay, SplitRequest(first=30)) == (15, 20, 15, 20)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ("--layers-per-stage 6,6,6,6,6,6,6,6,6,6,6,5", "sums to 71, but the model has 70 "
         "layers; remove 1 layer(s)"),
        ("--layers-per-stage 6,6,6,0,6,6,6,6,6,6,6,10", "gives stage 3 0 layers; every stage "
         "needs at least one transformer layer"),
        ("--layers-per-stage 35,35", "gives 2 stages, but pp x vpp = 12 x 1 = 12; give 12 "
         "numbers"),
        ("--layers-per-stage 6,x", "must be whole numbers separated by commas"),
        ("--first-stage-layers 40 --last-stage-layers 30", "leave 0 layers for the other 10 "
         "stages"),
        ("--first-stage-layers 4 --layers-per-stage 70", "give either --layers-per-stage or"),
        ("--pp 1 --gpus 1 --first-stage-layers 4", "need pp > 1"),
    ],
)  # fmt: skip
def test_bad_splits_say_what_to_change(
    flags: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("evaluate --layers 70 --hidden 1024 --heads 16 --seq 512 --vocab 8000 --gpu "
            "h100-80gb --gpus 12 --gpus-per-node 4 --tp 1 --pp 12 --micro-batch 1 "
            "--global-batch 48")  # fmt: skip
    code, _, err = run(f"{base} {flags}", capsys)
    assert code == 1 and words in err, err


def test_evaluate_accepts_layers_that_pp_does_not_divide(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ("evaluate --model bloom-176b --gpu a100-80gb --gpus 384 --tp 4 --pp 12 "
            "--micro-batch 2 --global-batch 2048 --recompute full --zero 1 --json")  # fmt: skip
    code, out, _ = run(argv, capsys)
    data = json.loads(out)
    assert code == 0 and data["stage_layers"] == list(BLOOM_SPLIT) and data["mode"] == "full"
    code, out, _ = run(argv + " --first-stage-layers 4", capsys)
    assert json.loads(out)["stage_layers"] == [4, *[6] * 11]


def test_memory_is_the_worst_stage() -> None:
    # A heavy middle worker: 1F1B keeps p - w = 3 micro-batches on worker 1.
    model = ModelSpec("m", layers=13, hidden=1024, heads=16, seq=512, vocab=8000)
    train = TrainSpec(global_batch=8)
    lay = Layout(1, 1, 4, 1, stage_layers=(1, 10, 1, 1))
    mem = memory(model, train, lay)
    params = 10 * layer_params(model)
    assert mem.weights == pytest.approx(2 * params / GIB)
    assert mem.optimizer == pytest.approx(12 * params / GIB)
    assert mem.activations == pytest.approx(3 * 10 * layer_activation_bytes(model, lay) / GIB)
    assert mem.buffers == pytest.approx(RESERVED_GIB)  # not the last worker: no logits
    lighter = memory(model, train, replace(lay, stage_layers=(4, 3, 3, 3)))
    assert lighter.total < mem.total
    # ZB-H1 lets every worker hold p = 4 micro-batches (as its registry entry, the simulator
    # and the runtime say), where 1F1B's worker 1 holds 3
    zb = memory(model, train, replace(lay, schedule="zb-h1"))
    assert zb.activations == pytest.approx(4 * 10 * layer_activation_bytes(model, lay) / GIB)


def test_time_follows_every_stage_through_the_simulator() -> None:
    cluster, train = ClusterSpec(H100, 4, 1), TrainSpec(global_batch=32)
    lay = Layout(1, 1, 4, 1, stage_layers=(10, 30, 15, 15))
    ev = evaluate(SMALL, cluster, train, lay)
    fwd, bwd = pipeline_costs(SMALL, cluster, train, lay).stages.stages()
    exact = simulate(generate("1f1b", 4, 32), Costs.per_stage(fwd, bwd))
    # rounded ratios (5 % for backward, 10 % for sends and head), rescaled by the exact work
    assert ev.pipeline_s == pytest.approx(exact.makespan(), rel=0.01)
    assert ev.pipeline_s >= 32 * (fwd[1] + bwd[1])  # the 30-layer stage sets the pace
    even = evaluate(SMALL, cluster, train, replace(lay, stage_layers=()))
    assert ev.step_time_s > 1.5 * even.step_time_s


def test_even_splits_keep_the_one_shape_cache() -> None:
    model, cluster = model_preset("gpt3-175b"), ClusterSpec(gpu_preset("a100-80gb"), 8, 8)
    lay = Layout(1, 8, 8, 1, vpp=2)
    ev = evaluate(model, cluster, TrainSpec(global_batch=64), lay)
    c = ev.costs
    seconds, _ = pipeline_time("1f1b", 8, 64, 2, c.forward / 2, c.backward / 2, c.head_forward)
    assert ev.pipeline_s == seconds and ev.stage_layers == (6,) * 16


@pytest.mark.parametrize(
    ("name", "p", "v", "m", "only_forward"),
    [("1f1b", 12, 1, 96, False), ("gpipe", 6, 1, 200, False), ("1f1b", 4, 3, 160, False),
     ("1f1b", 8, 1, 400, True), ("zb-h1", 5, 1, 300, False)],
)  # fmt: skip
def test_uneven_long_steps_are_extrapolated_exactly(
    name: str, p: int, v: int, m: int, only_forward: bool
) -> None:
    split = default_split(BLOOM, p * v)
    fwd = [n + 0.05 for n in split]
    fwd[-1] += 1.4
    bwd = [2.1 * f for f in fwd]
    sched = generate(name if v == 1 else "interleaved-1f1b", p, m, chunks=v)
    full = simulate(forward_only(sched) if only_forward else sched, Costs.per_stage(fwd, bwd))
    makespan, _ = _simulate_stages(name, p, m, v, tuple(fwd), tuple(bwd), only_forward)
    assert makespan == pytest.approx(full.makespan(), rel=1e-9)


def test_search_enumerates_uneven_layouts() -> None:
    cluster, train = ClusterSpec(gpu_preset("a100-80gb"), 8, 6), TrainSpec(global_batch=96)
    pps = {lay.pp for lay in enumerate_layouts(BLOOM, cluster, train, Fixed(tp=4))}
    assert {3, 6, 12} <= pps  # none of them divides 70 layers
    best = plan(BLOOM, cluster, train, Fixed(tp=4, pp=12, recompute="full"), top=1).ranked[0]
    assert best.stage_layers == BLOOM_SPLIT
    pinned = Fixed(tp=4, pp=12, recompute="full", split=SplitRequest(first=4))
    assert plan(BLOOM, cluster, train, pinned, top=1).ranked[0].stage_layers[0] == 4
