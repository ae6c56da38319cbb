"""Skip connections across stages: a U-Net-like model on 4 workers against one process, the
declarations, and what the schedule and simulator make of skips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import _skip_workers as sw
import layerwise as lw
from layerwise.job.launcher import run_workers
from layerwise.runtime.stage import Stage
from layerwise.skips import SkipError, SkipStore, find_skips, using


@pytest.fixture(scope="module")
def unet4() -> list[dict]:
    return run_workers(sw.skip_cases, 4, timeout_s=240)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unet_on_four_workers_matches_one_process(unet4: list[dict]) -> None:
    cases = [k for k in unet4[0] if k.split()[-1] in ("tags", "channels")]
    assert len(cases) == 7
    for rank, res in enumerate(unet4):
        for case in cases:
            assert res[case] == [], f"worker {rank}, {case}: {res[case]}"
    assert unet4[3]["forward"] is not None and unet4[3]["forward"] < 1e-6
    assert [r["forward"] for r in unet4[:3]] == [None, None, None]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_skips_go_straight_to_the_stage_that_pops(unet4: list[dict]) -> None:
    case = "gpipe m=4 never tags"
    # balance 3,2,3,2: stage 0 stashes for stages 1, 2 and 3
    assert unet4[0][f"{case} skips"] == [(0, 1), (0, 2), (0, 3)]
    # worker 0 sends each skip to its stage's worker itself, nothing passes through 1 and 2
    assert unet4[0][f"{case} skip peers"] == [(0, 1), (0, 2), (0, 3)]
    # gradients come straight back from 1 and 2; the input stashed by layer 0 has none
    assert unet4[1][f"{case} skip peers"] == [(1, 0)]
    assert unet4[2][f"{case} skip peers"] == [(2, 0)]
    assert unet4[3][f"{case} skip peers"] == []
    # recomputed forwards cannot tell which floats need a gradient: all of them come back
    assert unet4[3]["1f1b m=8 always tags skip peers"] == [(3, 0)]
    # 3 adjacent boundaries and 3 skips, each both ways, for 4 micro-batches
    assert unet4[0][f"{case} messages"] == 2 * (3 + 3) * 4


def test_declarations_pair_stashes_with_pops() -> None:
    skips = find_skips(sw.unet_layers())
    assert [(k.name, k.source, k.target) for k in skips] == [
        ("e2", 2, 4),
        ("e1", 1, 7),
        ("x0", 0, 9),
    ]  # Inner stashes and pops within itself: not a skip between layers
    with pytest.raises(SkipError, match="layer 1 pops 'a', which no layer stashes"):
        find_skips([nn.Linear(2, 2), lw.Pop("a")])
    with pytest.raises(SkipError, match="pops 'a', which only a later layer stashes"):
        find_skips([lw.Pop("a"), lw.Stash("a")])
    with pytest.raises(SkipError, match="layer 0 stashes 'a' but no later layer pops it"):
        find_skips([lw.Stash("a"), nn.Linear(2, 2)])
    with pytest.raises(SkipError, match="layers 0 and 1 both stash 'a'"):
        find_skips([lw.Stash("a"), lw.Stash("a"), lw.Pop("a")])
    with pytest.raises(ValueError, match="merge must be"):
        lw.Pop("a", "mul")


def test_plain_sequential_and_one_worker_pipeline_agree() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, sw.D), torch.randn(6, sw.D)
    ref_loss, ref_grads = sw.reference(sw.unet_layers(), x, y, sw.mse)
    for schedule, chunks in (("1f1b", None), ("interleaved-1f1b", 2)):
        pipe = lw.Pipeline(sw.unet_layers(), schedule=schedule, microbatches=2, chunks=chunks,
                           loss_fn=sw.mse)  # fmt: skip
        loss = pipe.train_step(x, y)
        assert sw.compare(pipe, loss, ref_loss, ref_grads) == [], schedule
        assert pipe.schedule.skips == ((0, 1),) if chunks else pipe.schedule.skips == ()


def test_stage_refuses_undeclared_and_unpopped_skips() -> None:
    class Sneaky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lw.stash("s", x)
            return x

    stage = Stage(0, 0, [Sneaky()])
    stage.route_skips({}, {1: ("t",)})
    with pytest.raises(SkipError, match=r"stashed \['s'\] but declared \['t'\]"):
        stage.run(torch.ones(2))
    stage = Stage(1, 3, [nn.Identity()])
    stage.route_skips({0: ("u",)}, {})
    with pytest.raises(SkipError, match=r"no layer popped \['u'\]"):
        stage.run((torch.ones(2), {0: {"u": torch.ones(2)}}))
    store = SkipStore()
    with using(store), pytest.raises(SkipError, match="stashed twice"):
        lw.stash("a", torch.ones(1))
        lw.stash("a", torch.ones(1))
    with using(SkipStore()), pytest.raises(SkipError, match="nothing stashed under that name"):
        lw.pop("b")
    with using(SkipStore()), pytest.raises(SkipError, match="takes a tensor"):
        lw.stash("c", [1.0])  # type: ignore[arg-type]


def test_schedule_and_simulator_account_for_skips() -> None:
    plain = lw.generate("1f1b", 4, 4)
    skipping = dataclasses.replace(plain, skips=((0, 3),))
    lw.validate(skipping)
    deps = lw.schedules.dependencies(lw.Action(3, "F", 1), skipping)
    assert deps == [lw.Action(2, "F", 1), lw.Action(0, "F", 1)]
    deps = lw.schedules.dependencies(lw.Action(0, "B", 1), skipping)
    assert deps == [lw.Action(0, "F", 1), lw.Action(1, "B", 1), lw.Action(3, "B", 1)]
    assert skipping.messages == plain.messages + 2 * 4
    # the skip carries 8 MB, the activations 1 kB: stage 3 waits for the skip, and stage 0
    # for its gradient
    costs = lw.Costs.per_stage([1.0] * 4, [2.0] * 4, activation_bytes=1e3, comm_bandwidth=1e6)
    costs = dataclasses.replace(costs, skip_bytes=(((0, 3), 8e6),))
    base = lw.simulate(plain, costs)
    slow = lw.simulate(skipping, costs)
    assert slow.makespan() > base.makespan()
    first_f3 = min(e.start for e in slow.events if e.stage == 3 and e.kind == "F")
    assert first_f3 == pytest.approx(1.0 + 8.0)  # F(0, 0) ends at 1, then 8 s on the link
    with pytest.raises(lw.ScheduleError, match=r"skip \(2, 1\) must go from a stage"):
        lw.validate(dataclasses.replace(plain, skips=((2, 1),)))
