"""The runtime against single-process training: loss and every gradient, every schedule.

Each multi-process test spawns one process group and checks many cases inside it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import _workers as w
import layerwise as lw
from layerwise.job.launcher import WorkerError, run_workers


@pytest.fixture(scope="module", params=[2, 4], ids=["p2", "p4"])
def equivalence(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_workers(w.equivalence_cases, request.param, timeout_s=240)


@pytest.mark.timeout(300)
def test_every_schedule_matches_single_process(equivalence: tuple[int, list[dict]]) -> None:
    world, results = equivalence
    cases = [k for k in results[0] if k.split()[0] in lw.schedules.SCHEDULE_NAMES]
    expected = 4 * 4 * 3 + (9 if world == 2 else 6)  # interleaved needs m % p == 0
    assert len(cases) == expected
    for rank, res in enumerate(results):
        for case in cases:
            assert res[case] == [], f"worker {rank}, {case}: {res[case]}"


@pytest.mark.timeout(300)
def test_structured_uneven_inference_and_timeline(equivalence: tuple[int, list[dict]]) -> None:
    world, results = equivalence
    for rank, res in enumerate(results):
        assert res["structured 1f1b"] == [], res["structured 1f1b"]
        assert res["structured zb-h1"] == [], res["structured zb-h1"]
        assert res["new shapes"] == [], res["new shapes"]
        if rank == world - 1:
            assert res["forward"] is not None and res["forward"] < 1e-5
        else:
            assert res["forward"] is None
        num_workers, kinds, computes = res["timeline"]
        assert num_workers == world
        assert {"F", "I", "W"} <= set(kinds)  # the last case ran zb-h1, m=8
        assert computes == 3 * world * 8  # every F, I and W of every worker
        small, whole = res["idle"]  # a step's idle from each worker's sums, as from its events
        assert 0.0 < whole < 1.0 and small == pytest.approx(whole, abs=1e-9)


@pytest.mark.timeout(300)
def test_order_matched_channels_match_single_process(equivalence: tuple[int, list[dict]]) -> None:
    world, results = equivalence
    cases = [k for k in results[0] if k.startswith("channels ") and k != "channels groups"]
    assert len(cases) == 4
    for rank, res in enumerate(results):
        for case in cases:
            assert res[case] == [], f"worker {rank}, {case}: {res[case]}"
        # 1F1B: one group per direction for each neighbour
        neighbours = 1 if rank in (0, world - 1) else 2
        assert res["channels groups"] == 2 * neighbours


@pytest.mark.timeout(300)
def test_calibrate_measures_costs_and_leaves_training_alone(
    equivalence: tuple[int, list[dict]],
) -> None:
    _, results = equivalence
    for rank, res in enumerate(results):
        assert res["calibrate"] == [], f"worker {rank}: {res['calibrate']}"


def test_single_worker_without_process_group() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(8, w.D), torch.randn(8, w.D)
    ref_loss, ref_grads = w.reference(w.mlp_layers(), x, y, w.mse)
    for schedule in ("naive", "gpipe", "1f1b", "zb-h1", "interleaved-1f1b"):
        for m in (1, 2, 4, 8):
            for ckpt in ("never", "always", "except_last"):
                pipe = lw.Pipeline(
                    w.mlp_layers(),
                    schedule=schedule,
                    microbatches=m,
                    loss_fn=w.mse,
                    recompute=ckpt,
                )
                loss = pipe.train_step(x, y)
                assert w.compare(pipe, loss, ref_loss, ref_grads) == [], (schedule, m, ckpt)
    assert len(pipe.stages) == 2  # interleaved on one worker: two chunks, local hand-off


def test_calibrate_on_one_worker_restores_the_pipeline() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(8, w.D), torch.randn(8, w.D)
    ref_loss, ref_grads = w.reference(w.mlp_layers(), x, y, w.mse)
    for schedule in ("1f1b", "zb-h1", "interleaved-1f1b"):
        for ckpt in ("never", "except_last"):
            pipe = lw.Pipeline(
                w.mlp_layers(), schedule=schedule, microbatches=4, loss_fn=w.mse, recompute=ckpt
            )
            sched = pipe.schedule
            costs = pipe.calibrate(x, y, steps=1)
            assert pipe.schedule is sched and pipe.recompute == ckpt
            assert len(costs.forward) == sched.num_stages and costs.comm_latency == 0.0
            assert all(p.grad is None for p in pipe.parameters())
            loss = pipe.train_step(x, y)
            assert w.compare(pipe, loss, ref_loss, ref_grads) == [], (schedule, ckpt)
    with pytest.raises(ValueError, match="at least one step"):
        pipe.calibrate(x, y, steps=0)
    norm = lw.Pipeline([nn.BatchNorm1d(w.D), nn.Linear(w.D, w.D)], loss_fn=w.mse, microbatches=2)
    before = [b.clone() for b in norm.stages[0].buffers()]
    norm.calibrate(x, y, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, norm.stages[0].buffers(), strict=True))


def test_bf16_autocast_runs_forward_in_bfloat16() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(6, w.D), torch.randn(6, w.D)
    ref_loss, _ = w.reference(w.mlp_layers(), x, y, w.mse)
    pipe = lw.Pipeline(w.mlp_layers(), microbatches=2, loss_fn=w.mse, precision="bf16")
    out = pipe.forward(x)
    assert out.dtype == torch.bfloat16
    loss = pipe.train_step(x, y)
    assert abs(loss - ref_loss) < 0.05 * abs(ref_loss)  # bf16 rounding, not a different model
    assert all(p.dtype == torch.float32 and p.grad is not None for p in pipe.parameters())
    with pytest.raises(ValueError, match="precision must be one of"):
        lw.Pipeline(w.mlp_layers(), precision="fp8")


def test_factories_are_seeded_per_layer_not_per_worker() -> None:
    factories = [lambda: nn.Linear(4, 4) for _ in range(4)]
    a = lw.Pipeline(factories, microbatches=1, loss_fn=w.mse, seed=7)
    b = lw.Pipeline(list(reversed(factories)), microbatches=1, loss_fn=w.mse, seed=7)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
    with torch.device("meta"):
        metas = [nn.Linear(4, 4) for _ in range(4)]
    c = lw.Pipeline(metas, microbatches=1, loss_fn=w.mse, seed=7)
    assert all(not p.is_meta for p in c.parameters())


@pytest.mark.timeout(300)
def test_tied_gpt_matches_single_process(equivalence: tuple[int, list[dict]]) -> None:
    world, results = equivalence
    if world != 2:
        pytest.skip("run on two workers only")
    for rank, res in enumerate(results):
        assert set(res["tied gpt"]) == set(w.TIED_GPT_CASES)
        for schedule, errors in res["tied gpt"].items():
            assert errors == [], f"worker {rank}, {schedule}: {errors}"


@pytest.mark.timeout(200)
def test_killed_worker_makes_every_other_worker_raise() -> None:
    results = run_workers(w.dying_worker, 3, 2, timeout_s=60, allow_exit=True)
    assert results[2] is None  # the victim died without a word
    for rank in (0, 1):
        seconds, message = results[rank].split("s ", 1)
        assert float(seconds) < 30, results[rank]
        assert "lost worker" in message, message
        assert "worker 1 lost worker 2" in message, message  # names the first loss


@pytest.mark.timeout(200)
def test_shape_mismatch_names_both_stages() -> None:
    results = run_workers(w.shape_mismatch, 2, timeout_s=60)
    assert (
        "stage 1 (layers 1-1) failed on micro-batch 0, whose input from stage 0 is [(3, 5) float32]"
        in results[1]
    )
    assert "mat1 and mat2 shapes cannot be multiplied" in results[1]
    assert "lost worker 1" in results[0] and "First failure in the job: stage 1" in results[0]


def test_bad_configuration_errors() -> None:
    with pytest.raises(ValueError, match="2 layers cannot fill 4 stages"):
        lw.Pipeline([nn.Linear(2, 2)] * 2, schedule="interleaved-1f1b", chunks=4, microbatches=1)
    with pytest.raises(ValueError, match="recompute must be one of"):
        lw.Pipeline([nn.Linear(2, 2)], recompute="sometimes")
    with pytest.warns(DeprecationWarning, match="now Pipeline\\(recompute"):
        old_name = lw.Pipeline([nn.Linear(2, 2)], checkpoint="always")  # the former name works
    assert old_name.recompute == old_name.checkpoint == "always"
    pipe = lw.Pipeline([nn.Linear(2, 2)], microbatches=4, loss_fn=w.mse)
    with pytest.raises(ValueError, match="needs the inputs"):
        pipe.train_step(None, torch.randn(4, 2))
    with pytest.raises(ValueError, match="needs the targets"):
        pipe.train_step(torch.randn(4, 2), None)
    with pytest.raises(ValueError, match="3 rows cannot be cut into 4 micro-batches"):
        pipe.train_step(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="needs a loss_fn"):
        lw.Pipeline([nn.Linear(2, 2)]).train_step(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="schedule is for 2 workers but the group has 1"):
        lw.Pipeline([nn.Linear(2, 2)] * 2, schedule=lw.generate("gpipe", 2, 1))
    with pytest.raises(ValueError, match="p2p must be one of"):
        lw.Pipeline([nn.Linear(2, 2)], p2p="rpc")
    backwards_reversed = lw.schedules.from_text("worker 0: 0F0 0F1 0B1 0B0")
    lw.Pipeline([nn.Linear(2, 2)], schedule=backwards_reversed, p2p="tags")  # tags: any order
    with pytest.raises(ValueError, match=r"stage 0 \(worker 0\) runs its input-gradient"):
        lw.Pipeline([nn.Linear(2, 2)], schedule=backwards_reversed, p2p="channels")


def test_worker_errors_are_collected() -> None:
    with pytest.raises(WorkerError, match=r"--- worker 0 ---[\s\S]*ZeroDivisionError"):
        run_workers(w.divide_by_zero, 1, timeout_s=30)


@pytest.mark.timeout(120)
def test_large_results_come_back() -> None:
    assert run_workers(w.big_result, 2, timeout_s=30) == [bytes(2**20)] * 2


@pytest.mark.timeout(300)
def test_side_floats_get_no_gradient_and_shared_parameters_are_tied(
    equivalence: tuple[int, list[dict]],
) -> None:
    _, results = equivalence
    prefixes = ("float side input", "shared parameter", "parameter shared by three")
    cases = [k for k in results[0] if k.startswith(prefixes)]
    assert len(cases) == 6
    for rank, res in enumerate(results):
        for case in cases:
            assert res[case] == [], f"worker {rank}, {case}: {res[case]}"


def test_side_floats_handed_over_on_one_worker_get_no_gradient() -> None:
    from _safety_workers import mask_layers

    x, y = torch.randn(8, 8), torch.randn(8, 8)
    ref_loss, ref_grads = w.reference(mask_layers(), x, y, w.mse)
    # interleaved on one worker: two stages, handed over without the transport
    pipe = lw.Pipeline(mask_layers(), schedule="interleaved-1f1b", microbatches=2, loss_fn=w.mse)
    loss = pipe.train_step(x, y)
    assert w.compare(pipe, loss, ref_loss, ref_grads) == []
    second = pipe.stages[1].layers[0]
    assert second.mask_needed_grad == [False, False]


def test_same_parameter_in_two_layers_is_tied() -> None:
    from layerwise.runtime.builder import all_ties, shared_parameters

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight
    layers = [a, nn.Tanh(), b]
    assert shared_parameters(layers) == [(0, "weight", 2, "weight")]
    assert all_ties(layers, [(2, "weight", 0, "weight")]) == [(2, "weight", 0, "weight")]
    assert all_ties(layers, []) == [(0, "weight", 2, "weight")]
    assert shared_parameters([a, lambda: b]) == []  # factories build their own


def test_world_size_without_a_process_group_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE is 4 .*init_process_group"):
        lw.Pipeline([nn.Linear(2, 2)], loss_fn=w.mse)
    monkeypatch.setenv("WORLD_SIZE", "1")
    lw.Pipeline([nn.Linear(2, 2)], loss_fn=w.mse)


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("broken on purpose")


def test_a_failing_stage_names_the_layer_inside_it() -> None:
    layers = [nn.Linear(4, 4), nn.Tanh(), Broken(), nn.Linear(4, 4)]
    pipe = lw.Pipeline(layers, schedule="gpipe", microbatches=1, loss_fn=w.mse)
    with pytest.raises(RuntimeError, match=r"stage 0 \(layers 0-3\) failed on micro-batch 0.*"
                       r"in layer 2 \(Broken\): ValueError: broken on purpose"):  # fmt: skip
        pipe.train_step(torch.randn(2, 4), torch.randn(2, 4))


def test_loss_reduction_weighs_micro_batches_by_tokens() -> None:
    from layerwise.runtime.executor import micro_batch_weight

    targets = torch.tensor([[1, 2, -100], [-100, -100, 3]])
    assert micro_batch_weight("rows", targets) == 2
    assert micro_batch_weight("tokens", targets) == 3
    assert micro_batch_weight(lambda t: 7.0, targets) == 7.0

    def token_mean(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.flatten(0, 1), target.flatten(), ignore_index=-100)

    torch.manual_seed(0)
    layer = nn.Linear(5, 5)
    x, y = torch.randn(4, 3, 5), torch.randint(0, 5, (4, 3))
    y[0, :2] = y[1, :] = -100  # the micro-batches count 4 and 6 tokens (one counts none)
    expected = token_mean(layer(x), y)
    expected.backward()
    for m in (2, 4):
        pipe = lw.Pipeline([copy.deepcopy(layer)], microbatches=m, loss_fn=token_mean,
                           loss_reduction="tokens")  # fmt: skip
        assert abs(pipe.train_step(x, y) - expected.item()) < 1e-6
        (_, weight), _ = pipe.named_parameters()
        torch.testing.assert_close(weight.grad, layer.weight.grad)
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        lw.Pipeline([nn.Linear(2, 2)], loss_reduction="samples")


@pytest.mark.timeout(300)
def test_lengths_taking_turns_cost_nothing_after_their_first_step(
    equivalence: tuple[int, list[dict]],
) -> None:
    world, results = equivalence
    if world != 2:
        pytest.skip("run on two workers only")
    for rank, res in enumerate(results):
        assert res["lengths exact"] == [], f"worker {rank}: {res['lengths exact']}"
        steps = res["lengths per step"]
        # lengths 6 and 10 in turn: plan, metadata and receive buffers once for each
        assert steps[1] == steps[5], steps[:6]
        assert steps[1][1] == 2  # one plan broadcast per length
        # then 3..14: the twelve are new except 6 and 10, which are still remembered
        assert steps[-1][1] == 2 + 10
        assert res["lengths remembered"] and res["lengths cached"] <= 8
    metadata = [n for n, _, _ in results[0]["lengths per step"]]
    assert metadata[1] > 0 and metadata[5] == metadata[1]  # the first worker sends it once
