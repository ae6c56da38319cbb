"""V-placed schedules: zb-v, v-half, v-min (Qi et al. 2024) and dualpipe-v (DeepSeek-V3).

Pure tests check each against the validator, the simulator and the papers' claims; one
spawned process group per world size checks the runtime against single-process training.
"""

from __future__ import annotations

import pytest

import _v_workers as vw
from layerwise.job.launcher import run_workers
from layerwise.schedules import (
    Schedule,
    generate,
    get,
    problems,
    stage_worker,
    stream_order_problems,
    validate,
)
from layerwise.schedules.v_blocks import INTERVAL, tight_block, tight_block_peaks
from layerwise.schedules.v_shape import v_min_limit
from layerwise.simulate import Costs, simulate

V_NAMES = vw.V_SCHEDULES
SIZES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (p, 2 * p, 4 * p)]


def fiw(num_workers: int, unit: float = 1.0) -> Costs:
    """F = I = W = ``unit`` on every chunk (so B = 2 units): the papers' ideal case."""
    return Costs.uniform(2 * num_workers, unit, 2 * unit, unit)


def uneven(num_workers: int) -> Costs:
    n = 2 * num_workers
    return Costs.per_stage(
        [1.0 + s % 3 for s in range(n)],
        [2.5 - 0.5 * (s % 2) for s in range(n)],
        input_grad=[1.0 + 0.25 * (s % 2) for s in range(n)],
    )


def one_f_one_b_makespan(p: int, m: int, unit: float = 1.0) -> float:
    """1F1B on the same model: p stages, each two chunks long."""
    return simulate(
        generate("1f1b", p, m), Costs.uniform(p, 2 * unit, 4 * unit, 2 * unit)
    ).makespan()


def build(name: str, p: int, m: int) -> Schedule | None:
    """The schedule, or None where its registry entry refuses the sizes (checked to say so
    in a message that names the rule)."""
    if name == "dualpipe-v" and m < 2 * p:
        assert problems(name, p, m) == [
            f"dualpipe-v needs at least two micro-batches per worker, one per stage "
            f"(m >= 2p = {2 * p}), to fill its warm-up; got m={m} with p={p}; try m={2 * p}"
        ]
        with pytest.raises(ValueError, match="dualpipe-v needs at least two micro-batches"):
            generate(name, p, m)
        return None
    return generate(name, p, m)


def peaks(schedule: Schedule, costs: Costs) -> list[int]:
    timeline = simulate(schedule, costs)
    return [timeline.peak_inflight(w) for w in range(schedule.num_workers)]


@pytest.mark.parametrize("name", V_NAMES)
def test_valid_in_stream_order_and_declared_peak(name: str) -> None:
    spec = get(name)
    for p, m in SIZES:
        schedule = build(name, p, m)
        if schedule is None:
            continue
        validate(schedule)
        assert stream_order_problems(schedule) == [], (p, m)
        assert schedule.stage_worker == stage_worker("v", p, 2)
        assert schedule.stage_worker[0] == schedule.stage_worker[-1] == 0  # first and last
        assert schedule.split_stages == frozenset(range(2 * p))
        declared = [spec.peak_inflight(p, m, 2, w) for w in range(p)]
        assert peaks(schedule, fiw(p)) == peaks(schedule, uneven(p)) == declared, (p, m)


def test_entries_declare_the_v() -> None:
    for name in V_NAMES:
        spec = get(name)
        assert (spec.placement, spec.chunks_default, spec.chunks_allowed) == ("v", 2, (2, 2))
        assert spec.split_backward and spec.description
        assert problems(name, 4, 8, 1) == [
            f"schedule {name!r} runs 2 stages per worker; chunks must be 2, got 1"
        ]
    assert [c.rule for c in get("dualpipe-v").constraints] == ["m >= 2p"]
    assert get("zbv").name == "zb-v" and get("dualpipev").name == "dualpipe-v"


@pytest.mark.parametrize("name", ["zb-v", "dualpipe-v"])
def test_zero_bubble_when_f_i_w_are_equal(name: str) -> None:
    """With F = I = W the only idle time is the start-up: worker w cannot begin before w
    forwards have passed, so a step takes 6m + p - 1 units, (p-1)/(6m+p-1) of it idle."""
    for p, m in SIZES:
        schedule = build(name, p, m)
        if schedule is None:
            continue
        for unit in (1.0, 0.5):
            timeline = simulate(schedule, fiw(p, unit))
            assert timeline.makespan() == pytest.approx((6 * m + p - 1) * unit), (p, m)
            assert timeline.bubble_fraction() == pytest.approx((p - 1) / (6 * m + p - 1))
        assert timeline.makespan() < one_f_one_b_makespan(p, m, 0.5) or p == 1


def test_memory_in_whole_stages_against_1f1b() -> None:
    """Chunk activations / 2 = whole-stage ones, 1F1B's unit (p on its first worker)."""
    for p, m in SIZES:
        whole = {n: max(peaks(s, fiw(p))) / 2 for n in V_NAMES if (s := build(n, p, m))}
        assert whole["zb-v"] <= p  # as 1F1B
        assert whole["v-half"] <= p / 2 + 1  # the paper's (p + 2) // 2, in chunks
        assert whole["v-min"] <= (p + 4) / 3  # the paper's (p + 4) // 3
        assert whole["v-min"] <= whole["v-half"] <= whole["zb-v"]
        if "dualpipe-v" in whole:
            assert whole["dualpipe-v"] == p + 0.5  # DeepSeek's PP + 1 chunks, PP = 2p
    assert max(peaks(generate("v-half", 8, 32), fiw(8))) == 10  # of 1F1B's 16
    assert max(peaks(generate("v-min", 8, 32), fiw(8))) == 8


def test_smaller_memory_costs_some_bubble() -> None:
    """v-half and v-min idle a fixed time in warm-up and cool-down, whatever m, and less
    than 1F1B; more memory buys less idle time: v-half (about half of 1F1B's memory) idles
    less than v-min (a third), about the paper's 11 % of the step at m = 4p from p = 8 on."""
    for p, m in SIZES:
        for name in ("v-half", "v-min"):
            span = simulate(generate(name, p, m), fiw(p)).makespan()
            assert span < one_f_one_b_makespan(p, m) or p == 1, (name, p, m)
    for p in (1, 2, 3, 4, 8):
        for name in ("v-half", "v-min"):
            extra = [
                simulate(generate(name, p, m), fiw(p)).makespan() - 6 * m for m in (2 * p, 4 * p)
            ]
            assert extra[0] == extra[1], (name, p)
    for p in (4, 8, 16):
        half, least = (simulate(generate(n, p, 4 * p), fiw(p)) for n in ("v-half", "v-min"))
        assert half.bubble_fraction() < least.bubble_fraction(), p
        if p >= 8:  # the paper's ~p/(2m) idle per worker: 1/9 of the step at m = 4p
            assert half.bubble_fraction() == pytest.approx(1 / 9, abs=0.01), p


def test_v_min_block() -> None:
    """Each worker's six actions of a micro-batch fall on six residues modulo six, so the
    repeated block keeps it busy in the steady state; every action starts after its input;
    the memory stays within the paper's (p + 4) // 3 whole stages."""
    for p in (1, 2, 3, 4, 5, 8, 16):
        block = tight_block(p)
        for w in range(p):
            assert sorted(t % INTERVAL for (u, _, _), t in block.items() if u == w) == [*range(6)]
        schedule = generate("v-min", p, 4 * p)
        assert all(len(acts) == 6 * 4 * p for acts in schedule.actions)
        assert max(tight_block_peaks(p, 4 * p)) <= v_min_limit(p), p
    # the last worker's turn of the V, micro-batch 0's I and W waiting for its gradient
    assert " ".join(map(str, generate("v-min", 4, 4).actions[3][:10])) == (
        "3F0 4F0 3F1 4F1 4I0 3I0 4W0 3W0 3F2 4F2"
    )


def test_zb_v_warm_up_and_uneven_costs() -> None:
    """Worker w runs 2(p - w) - 1 first-chunk forwards before micro-batch 0 comes back; the
    order is built on unit costs, so uneven costs change the timing, not the order."""
    p, m = 4, 8
    schedule = generate("zb-v", p, m)
    for w in range(p):
        warm = 2 * (p - w) - 1
        assert [str(a) for a in schedule.actions[w][:warm]] == [f"{w}F{j}" for j in range(warm)]
    assert str(schedule.actions[0][2 * p - 1]) == f"{2 * p - 1}F0"
    timeline = simulate(schedule, uneven(p))
    assert timeline.makespan() > 0 and timeline.bubble_fraction() < 0.5


def test_dualpipe_v_exact_order() -> None:
    """p = 2, m = 4 phase by phase; an overlapped pair is a forward then a backward (I W)."""
    schedule = generate("dualpipe-v", 2, 4)
    text = [" ".join(map(str, acts)) for acts in schedule.actions]
    assert text[0] == (
        "0F0 0F1 "  # 1: first-chunk forwards
        "0F2 3F0 "  # 2: both chunks
        "3I0 3W0 3F1 "  # 3: backward, its W, forward
        "0F3 3I1 3W1 3F2 0I0 0W0 "  # 4: two pairs
        "3I2 3W2 3F3 0I1 0W1 "  # 5: backward, pair
        "3I3 3W3 0I2 "  # 6: backwards, W deferred from the middle on
        "0W2 0I3 "  # 7: deferred W, backward
        "0W3"  # 8: the rest of the W
    )
    assert text[1] == (
        "1F0 2F0 1F1 2F1 "
        "1F2 2I0 2W0 2F2 1I0 1W0 1F3 2I1 2W1 2F3 1I1 1W1 "
        "2I2 2W2 1I2 1W2 2I3 1I3 "
        "2W3 1W3"
    )


@pytest.fixture(scope="module", params=[2, 4], ids=["p2", "p4"])
def v_runs(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    world = request.param
    return world, run_workers(vw.v_equivalence_cases, world, timeout_s=150)


@pytest.mark.timeout(400)
def test_v_schedules_train_like_one_process(v_runs: tuple[int, list[dict]]) -> None:
    world, results = v_runs
    sizes = vw.v_sizes(world)
    assert len(sizes) == 11  # dualpipe-v refuses m = p
    for rank, res in enumerate(results):
        for name, m in sizes:
            for p2p in vw.transports(name, m, world):
                for recompute in ("never", "always", "except_last"):
                    case = f"{name} m={m} {p2p} {recompute}"
                    assert res[case] == [], f"worker {rank}, {case}: {res[case]}"
                # worker 0 holds the first and the last stage, and runs 3 actions a chunk
                assert res[f"{name} m={m} {p2p} ends"] == (rank == 0, rank == 0)
                assert res[f"{name} m={m} {p2p} computes"] == 3 * 2 * world * m
