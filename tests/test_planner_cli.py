"""``layerwise plan`` and ``layerwise plan evaluate`` through argparse."""

from __future__ import annotations

import dataclasses
import json

import pytest

from layerwise.cli.plan import run_plan
from layerwise.planner.local import LayerCost, measure_layer, predict_local
from planner_helpers import parse

EVALUATE = (
    "evaluate --layers 96 --hidden 12288 --heads 96 --seq 2048 --vocab 51200 "
    "--gpu a100-80gb --gpus 1024 --tp 8 --pp 8 --micro-batch 1 --global-batch 1536"
)


def run(argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_plan(parse(argv.split()))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(EVALUATE + " --vpp 2 --recompute selective --sequence-parallel --json",
                       capsys)  # fmt: skip
    assert code == 0
    data = json.loads(out)
    for key in ("step_time_s", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu",
                "bubble_fraction", "fits"):  # fmt: skip
        assert key in data
    parts = data["memory_gib"]
    assert set(parts) >= {"weights", "gradients", "optimizer", "activations", "total"}
    summed = sum(v for k, v in parts.items() if k not in ("total", "limit"))
    assert parts["total"] == pytest.approx(summed, abs=0.05)
    assert data["hardware_tflops_per_gpu"] >= data["model_tflops_per_gpu"]
    assert data["mfu"] == pytest.approx(data["model_tflops_per_gpu"] / 312, abs=0.001)
    assert data["layout"]["dp"] == 16 and data["fits"] is True


def test_plan_json_is_a_ranked_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run("--model megatron-7.5b --gpus 16 --global-batch 128 --top 3 --json",
                       capsys)  # fmt: skip
    rows = json.loads(out)
    assert code == 0 and len(rows) == 3
    assert [r["step_time_s"] for r in rows] == sorted(r["step_time_s"] for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (EVALUATE.replace("--tp 8", "--tp 5").replace("--gpus 1024", "--gpus 1000")
         .replace("--gpu a100", "--gpus-per-node 5 --gpu a100"), "does not divide the 96"),
        (EVALUATE.replace("--gpus 1024", "--gpus 1020"), "not a whole number of nodes"),
        (EVALUATE.replace("--tp 8 --pp 8", "--tp 8 --pp 3"), "not divisible by tp x pp"),
        ("--model gpt-9", "unknown model preset 'gpt-9'"),
        ("--model gpt3-175b --gpu tpu-v9", "unknown GPU preset 'tpu-v9'"),
        ("--layers 4 --hidden 64", "missing --heads --seq --vocab"),
        (EVALUATE.replace("--global-batch 1536", "--global-batch 100"), "not a multiple of"),
    ],
)  # fmt: skip
def test_bad_input_gives_a_clear_message(
    argv: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 1
    assert message in err


def test_local_prediction_uses_measured_costs() -> None:
    cost = measure_layer(hidden=64, heads=2, seq=32, micro_batch=2, threads=1, repeats=1)
    assert cost.forward > 0 and cost.backward > 0
    rows = predict_local(4, 64, 2, 32, 2, 8, workers=2, cost=LayerCost(0.01, 0.02, 50_000),
                         cores=4)  # fmt: skip
    by = {r["layout"]: r for r in rows}
    assert set(by) == {"dp2 tp1 pp1 mb2", "dp1 tp1 pp2 mb2", "dp1 tp2 pp1 mb2"}
    # pp=2: 4 micro-batches through 2 stages of 2 layers each, plus the simulated bubble
    pipe = by["dp1 tp1 pp2 mb2"]
    assert float(pipe["step_time_s"]) > 4 * 2 * 0.03
    assert 0 < float(pipe["bubble_fraction"]) < 0.5


def test_local_prediction_with_a_core_each_counts_embedding_head_and_update() -> None:
    from layerwise.models.gpt import GPTConfig, layer_parameter_counts
    from layerwise.planner.local import Parts, measure_parts

    got = measure_parts(hidden=64, heads=2, seq=32, micro_batch=2, threads=1, repeats=1)
    assert min(*got.embedding, *got.head) > 0 and 0 < got.update_per_param < 1e-3
    cost, parts = LayerCost(0.01, 0.02, 50_000), Parts((0.001, 0.002), (0.003, 0.004), 1e-8)
    bare = {r["layout"]: r for r in predict_local(4, 64, 2, 32, 2, 8, workers=2, cost=cost,
                                                    cores=4)}  # fmt: skip
    full = {r["layout"]: r for r in predict_local(4, 64, 2, 32, 2, 8, workers=2, cost=cost,
                                                    cores=4, parts=parts)}  # fmt: skip
    counts = layer_parameter_counts(GPTConfig(seq_len=32, d_model=64, n_heads=2, n_layers=4))
    # dp 2: each replica runs its 2 micro-batches through the embedding, the blocks and the
    # head, then updates every parameter
    extra = full["dp2 tp1 pp1 mb2"]["step_time_s"] - bare["dp2 tp1 pp1 mb2"]["step_time_s"]
    assert extra == pytest.approx(2 * (0.001 + 0.002 + 0.003 + 0.004) + 1e-8 * sum(counts))
    assert full["dp2 tp1 pp1 mb2"]["after_pipeline_s"] > bare["dp2 tp1 pp1 mb2"]["after_pipeline_s"]
    # pp 2: the first stage runs the embedding, the last the head; each is slower
    assert full["dp1 tp1 pp2 mb2"]["pipeline_s"] > bare["dp1 tp1 pp2 mb2"]["pipeline_s"]


def test_local_tensor_parallel_halves_compute_and_pays_all_reduces() -> None:
    cost = LayerCost(0.01, 0.02, 50_000)
    rows = {r["layout"]: r for r in predict_local(4, 64, 2, 32, 2, 8, workers=2, cost=cost,
                                                    cores=4)}  # fmt: skip
    tp = float(rows["dp1 tp2 pp1 mb2"]["step_time_s"])
    # 4 micro-batches x 4 layers x (F + B) / 2 of compute, plus 4 all-reduces per layer
    assert tp > 4 * 4 * 0.03 / 2
    assert tp < 4 * 4 * 0.03  # still faster than one worker doing it all


def test_evaluate_json_keeps_its_keys_and_adds_the_split_and_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(EVALUATE + " --mode lora --lora-rank 8 --json", capsys)
    data = json.loads(out)
    assert code == 0
    assert set(data) >= {"layout", "fits", "step_time_s", "model_tflops_per_gpu",
                         "hardware_tflops_per_gpu", "mfu", "bubble_fraction", "memory_gib",
                         "time_s", "stage_layers", "mode"}  # fmt: skip
    assert set(data["time_s"]) == {
        "pipeline", "matmul", "elementwise", "recompute", "tensor_parallel_comm",
        "pipeline_comm", "data_parallel_comm", "data_parallel_exposed", "optimizer",
    }  # fmt: skip
    assert data["mode"] == "lora" and data["stage_layers"] == [12] * 8
    code, out, _ = run(EVALUATE.replace("--layers 96", "--layers 70") + " --json", capsys)
    assert code == 0 and sum(json.loads(out)["stage_layers"]) == 70  # pp=8 does not divide 70


def test_local_prediction_with_shared_cores_uses_the_loaded_costs() -> None:
    from layerwise.models.gpt import GPTConfig, layer_parameter_counts
    from layerwise.planner.local_probe import LoadedCosts
    from layerwise.schedules import generate
    from layerwise.simulate import Costs, simulate

    block = {1: (0.01, 0.02), 2: (0.02, 0.04), 4: (0.03, 0.05), 8: (0.06, 0.06)}
    reduce = {2: (0.003, 2e-9), 4: (0.004, 3e-9), 8: (0.005, 4e-9)}
    loaded = LoadedCosts(workers=8, embedding=(0.001, 0.001), block=block, head=(0.002, 0.002),
                         message=0.001, optimizer_per_param=1e-8, allreduce=reduce,
                         pack_per_param=2e-9)  # fmt: skip
    cost = LayerCost(0.002, 0.004, 200_000)
    rows = {r["layout"]: r for r in predict_local(8, 128, 8, 128, 2, 32, workers=8, cost=cost,
                                                    cores=2, loaded=loaded)}  # fmt: skip
    counts = layer_parameter_counts(GPTConfig(seq_len=128, d_model=128, n_heads=8, n_layers=8))
    # dp 8: every worker is always busy with all ten layers for its 2 micro-batches, then its
    # update, packing its gradients and their all-reduce over 8 replicas, all at loaded costs
    # (and the loss's mean over the replicas, a tiny all-reduce over 8)
    dp8 = rows["dp8 tp1 pp1 mb2"]
    work = 2 * (0.002 + 8 * 0.03 + 0.004) + sum(counts) * (1e-8 + 2e-9)
    assert dp8["step_time_s"] == pytest.approx(work + 2 * 0.005 + 4e-9 * 4 * sum(counts))
    assert dp8["oversubscribed"] and dp8["stage_layers"] == [10]
    for r in rows.values():  # the step is its pipeline and what follows it
        assert r["pipeline_s"] + r["after_pipeline_s"] == pytest.approx(r["step_time_s"])
    assert dp8["after_pipeline_s"] == pytest.approx(
        sum(counts) * (1e-8 + 2e-9) + 2 * 0.005 + 4e-9 * 4 * sum(counts)
    )
    # the step's small collectives: the loss's mean (dp), the norm's sums (tp, pp), and the
    # pipeline's shapes, loss and idle fraction (pp), each a tiny all-reduce over its group
    assert loaded.step_collectives_s(2, 2, 2) == pytest.approx(6 * 0.003)
    assert loaded.step_collectives_s(1, 1, 8) == pytest.approx(4 * 0.005)
    assert loaded.step_collectives_s(4, 2, 1) == pytest.approx(0.004 + 0.003)
    assert loaded.step_collectives_s(1, 1, 1) == 0.0
    # pp 8: workers in their bubbles leave their share of the cores to the others, so the
    # step is shorter than the pipeline at loaded costs throughout, but not shorter than the
    # busiest worker's work at the speed of a core of its own (4x its speed loaded)
    pp8 = rows["dp1 tp1 pp8 mb2"]
    assert pp8["stage_layers"] == [2, 1, 1, 1, 1, 1, 1, 2]
    f = [0.001 + 0.01 + 0.001] + [0.01 + 0.002] * 6 + [0.01 + 0.002 + 0.001]
    b = [0.001 + 0.02 + 0.001] + [0.02 + 0.002] * 6 + [0.02 + 0.002 + 0.001]
    throughout = simulate(generate("1f1b", 8, 16), Costs.per_stage(f, b)).makespan()
    pipe = pp8["step_time_s"] - max(counts[0] + counts[1], counts[-2] + counts[-1]) * 1e-8
    pipe -= loaded.step_collectives_s(1, 1, 8)
    assert max(16 * (fi + bi) for fi, bi in zip(f, b, strict=True)) / 4 < pipe < throughout
    # tensor parallelism costs what the probe measured for a block split tp ways
    tp2, tp4 = rows["dp4 tp2 pp1 mb2"], rows["dp2 tp4 pp1 mb2"]
    assert tp2["step_time_s"] > 4 * 8 * 0.06 and tp4["step_time_s"] > 8 * 8 * 0.08
    # sharded blocks' parameters are updated at their own measured cost per parameter held
    dearer = dataclasses.replace(loaded, sharded_update_per_param={2: 1e-6})
    again = {r["layout"]: r for r in predict_local(8, 128, 8, 128, 2, 32, workers=8, cost=cost,
                                                     cores=2, loaded=dearer)}  # fmt: skip
    held = sum(counts[1:9]) / 2  # a dp4 tp2 worker holds half of every block
    extra = again["dp4 tp2 pp1 mb2"]["step_time_s"] - tp2["step_time_s"]
    assert extra == pytest.approx(held * (1e-6 - 1e-8))
    assert again["dp8 tp1 pp1 mb2"]["step_time_s"] == dp8["step_time_s"]
    # every pp of 8 workers, and the split is by parameters, as the job's
    assert {r["pp"] for r in rows.values()} == {1, 2, 4, 8}


def test_plan_local_says_before_it_probes_a_busy_machine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import layerwise.planner.local as local
    from layerwise.planner.local_probe import LoadedCosts

    asked: dict[str, object] = {}

    def fake_probe(workers: int, tps: list[int], sizes: list[int], *_: object,
                   **__: object) -> LoadedCosts:  # fmt: skip
        asked["workers"] = workers
        return LoadedCosts(workers=workers, embedding=(1e-3, 1e-3),
                           block={tp: (1e-2, 2e-2) for tp in tps}, head=(1e-3, 1e-3),
                           message=1e-3, optimizer_per_param=1e-8,
                           allreduce={g: (1e-3, 1e-9) for g in sizes if g > 1})  # fmt: skip

    monkeypatch.setattr(local, "probe_loaded", fake_probe)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    code, out, err = run("--local --workers 8 --json", capsys)
    rows = json.loads(out)  # stdout stays JSON
    assert code == 0 and rows and all(r["oversubscribed"] for r in rows)
    assert "8 workers share 2 cores: probing" in err and asked["workers"] == 8
    asked.clear()
    code, _, err = run("--local --workers 2 --json", capsys)  # every core taken: probed too
    assert code == 0 and "2 workers fill the 2 cores: probing" in err and asked["workers"] == 2
    asked.clear()
    code, _, err = run("--local --workers 1 --json", capsys)
    assert code == 0 and "probing" not in err and not asked  # a core to spare: nothing to probe


def test_local_prediction_takes_any_pipeline_depth() -> None:
    cost = LayerCost(0.01, 0.02, 50_000)
    rows = predict_local(5, 64, 2, 32, 2, 12, workers=3, cost=cost, cores=4)
    by = {r["pp"]: r for r in rows if r["tp"] == 1}
    assert set(by) == {1, 3}  # 3 does not divide the 5 blocks: it takes 7 layers in 3 stages
    assert sum(by[3]["stage_layers"]) == 7 and not by[3]["oversubscribed"]


@pytest.mark.timeout(120)
def test_the_probe_measures_every_part_with_all_processes_busy() -> None:
    from layerwise.planner.local_probe import probe_loaded

    # four processes on this machine's cores, blocks split two and four ways (timed two in a
    # row), replicas of two and four
    got = probe_loaded(4, tps=[1, 2, 4], sizes=[1, 2, 4], hidden=48, heads=4, seq=16,
                       micro_batch=1, grad_bytes=64_000, window_s=0.1, chain=2)  # fmt: skip
    assert got.workers == 4 and set(got.block) == {1, 2, 4} and set(got.allreduce) == {2, 4}
    for fwd, bwd in (got.embedding, got.head, *got.block.values()):
        assert 0 < fwd < 1 and 0 < bwd < 1
    assert got.message >= 0 and 0 < got.optimizer_per_param < 1e-3
    assert set(got.sharded_update_per_param) == {2, 4}
    assert all(0 < v < 1 for v in got.sharded_update_per_param.values())
    # blocks split 2 ways were also run by one group of 2 while the other 2 processes waited;
    # a group of 4 is the whole world: nothing to leave out
    assert set(got.sharded_speed) == {2, 4} and got.sharded_speed[4] == {}
    assert set(got.sharded_speed[2]) == {2} and 0 < got.sharded_speed[2][2] < 100
    fixed, per_byte = got.allreduce[4]
    assert fixed > 0 and per_byte >= 0
    assert got.allreduce_s(4, 64_000) >= fixed and got.allreduce_s(1, 64_000) == 0
    with pytest.raises(ValueError, match="chain must be at least 1"):
        probe_loaded(3, tps=[1], sizes=[1], hidden=48, heads=3, seq=16, micro_batch=1,
                     grad_bytes=64_000, chain=0)  # fmt: skip
