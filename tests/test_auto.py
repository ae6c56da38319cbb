"""``auto``: schedules searched for given stage costs under a memory cap, and the memory
measure they are held to (``Timeline.peak_activation_memory``)."""

from __future__ import annotations

import json

import pytest

import layerwise as lw
from layerwise.schedules import generate, names, stream_order_problems, synthesize, validate
from layerwise.schedules.auto import DEFAULT_WORK, search, smallest_cap
from layerwise.simulate import Costs, simulate
from layerwise.timeline import Event, Timeline

SLACK = 1e-9


# -- the memory measure -----------------------------------------------------------------------


def test_peak_activation_memory_of_one_stage_per_worker() -> None:
    events = [
        Event(0, 0, 1, "F", 0, 0),
        Event(0, 1, 2, "F", 0, 1),
        Event(0, 2, 4, "B", 0, 0),
        Event(0, 4, 5, "F", 0, 2),  # starts as B0 ends: released first, so still 2
        Event(0, 5, 7, "B", 0, 1),
        Event(0, 7, 9, "B", 0, 2),
        Event(1, 1, 2, "F", 1, 0),
        Event(1, 2, 3, "B", 1, 0),
    ]
    tl = Timeline(2, events, meta={"stages": 2})
    assert tl.peak_activation_memory(0) == 2.0
    assert tl.peak_activation_memory(1) == 1.0
    assert tl.peak_activation_memory(0, [0.5, 3.0]) == 1.0
    assert tl.peak_inflight(0) == 2  # unchanged
    assert [w["peak_activation_memory"] for w in tl.summary()["workers"]] == [2.0, 1.0]


def test_a_chunk_of_a_two_chunk_placement_weighs_one_half() -> None:
    # worker 0 holds stages 0 and 2 of 4 (looped, p = 2): each weighs p / n = 1/2
    events = [
        Event(0, 0, 1, "F", 0, 0),
        Event(0, 1, 2, "F", 0, 1),
        Event(0, 3, 4, "F", 2, 0),
        Event(0, 4, 5, "B", 2, 0),
        Event(0, 5, 6, "F", 2, 1),
    ]
    tl = Timeline(2, events)  # no meta: the stage count comes from the events (3 -> 2 + 1)
    assert tl.peak_activation_memory(0, [0.5] * 4) == 1.5
    assert Timeline(2, events, meta={"stages": 4}).peak_activation_memory(0) == 1.5


def test_a_split_backward_holds_until_its_w() -> None:
    events = [
        Event(0, 0, 1, "F", 0, 0),
        Event(0, 1, 2, "I", 0, 0),
        Event(0, 2, 3, "F", 0, 1),
        Event(0, 3, 4, "W", 0, 0),
        Event(0, 4, 5, "I", 0, 1),
        Event(0, 5, 6, "W", 0, 1),
        Event(0, 6, 7, "F", 0, 2),
    ]
    tl = Timeline(1, events, meta={"stages": 1})
    assert tl.peak_activation_memory(0) == 2.0 == tl.peak_inflight(0)


def test_simulated_memory_of_the_classic_schedules() -> None:
    p, m = 4, 8
    tl = simulate(generate("1f1b", p, m), Costs.uniform(p))
    assert [tl.peak_activation_memory(w) for w in range(p)] == [4.0, 3.0, 2.0, 1.0]
    tl = simulate(generate("interleaved-1f1b", p, m, 2), Costs.uniform(2 * p))
    assert tl.peak_activation_memory(0) == tl.peak_inflight(0) / 2


# -- auto --------------------------------------------------------------------------------------


def uneven(n: int, latency: float = 0.0, wgrad: float | None = None) -> Costs:
    forward = [1.0 + 0.5 * (s % 3) for s in range(n)]
    forward[-1] += 2.0  # an output layer
    backward = [2 * f for f in forward]
    w = None if wgrad is None else [wgrad * b for b in backward]
    return Costs.per_stage(forward, backward, weight_grad=w, comm_latency=latency)


def peak_memory(schedule: lw.Schedule, costs: Costs, sizes: list[float] | None = None) -> float:
    tl = simulate(schedule, costs)
    return max(tl.peak_activation_memory(w, sizes) for w in range(tl.num_workers))


CASES = [
    # (p, m, v, cap, placement, latency, wgrad)
    (4, 8, 1, 4.0, None, 0.0, None),
    (4, 8, 1, 2.0, None, 0.5, 0.3),
    (3, 7, 1, 1.0, None, 0.0, None),
    (4, 8, 2, 3.0, None, 0.2, None),
    (4, 6, 2, 4.0, "v", 0.0, 0.6),
    (2, 5, 3, 2.5, "looped", 0.1, None),
    (1, 4, 2, 1.5, None, 0.0, None),
]


@pytest.mark.parametrize(("p", "m", "v", "cap", "placement", "latency", "wgrad"), CASES)
def test_auto_is_valid_in_order_and_under_the_cap(
    p: int, m: int, v: int, cap: float, placement: str | None, latency: float, wgrad: float | None
) -> None:
    costs = uneven(p * v, latency, wgrad)
    found = search(costs, p, m, cap, placement, time_limit_s=None)  # type: ignore[arg-type]
    schedule = found.schedule
    validate(schedule)
    assert stream_order_problems(schedule) == []
    assert schedule.name == "auto" and schedule.chunks == v
    if placement == "v":
        assert schedule.stage_worker == (0, 1, 2, 3, 3, 2, 1, 0)
    assert peak_memory(schedule, costs) <= cap * (1 + SLACK)
    assert found.step == pytest.approx(simulate(schedule, costs).makespan())
    assert found.work <= found.work_limit


def test_auto_holds_uneven_activation_sizes_under_the_cap() -> None:
    costs, sizes = uneven(4), [3.0, 1.0, 1.0, 2.0]
    schedule = synthesize(costs, 4, 8, 6.0, stage_sizes=sizes, time_limit_s=None)
    assert peak_memory(schedule, costs, sizes) <= 6.0


def test_a_cap_no_schedule_meets_names_the_smallest() -> None:
    with pytest.raises(ValueError, match=r"the smallest feasible cap is 1$"):
        synthesize(uneven(4), 4, 8, 0.9)
    with pytest.raises(ValueError, match=r"the smallest feasible cap is 2\.5$"):
        synthesize(uneven(4), 4, 8, 2.0, stage_sizes=[2.5, 1, 1, 1])
    # two chunks: the V placement pairs stage 0 with 3 and 1 with 2, which is lighter here
    sizes = [1.0, 2.0, 3.0, 4.0]
    assert smallest_cap(2, 2, "looped", sizes) == 6.0 and smallest_cap(2, 2, "v", sizes) == 5.0
    with pytest.raises(ValueError, match=r"smallest feasible cap with the v placement is 5$"):
        synthesize(uneven(4), 2, 4, 4.5, stage_sizes=sizes)
    schedule = synthesize(uneven(4), 2, 4, 5.0, stage_sizes=sizes)
    assert schedule.stage_worker == (0, 1, 1, 0)
    # the smallest cap is enough: one micro-batch at a time, at worst
    assert peak_memory(synthesize(uneven(4), 4, 8, 1.0), uneven(4)) <= 1.0


def test_sizes_that_do_not_fit_the_costs_are_refused() -> None:
    with pytest.raises(ValueError, match="6 stages, which 4 workers cannot share equally"):
        synthesize(uneven(6), 4, 8, 4.0)
    with pytest.raises(ValueError, match="chunks=3 stages per worker on 4 workers is 12"):
        synthesize(uneven(8), 4, 8, 4.0, chunks=3)
    with pytest.raises(ValueError, match="stage_sizes needs 4 finite sizes"):
        synthesize(uneven(4), 4, 8, 4.0, stage_sizes=[1.0, 1.0])


@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
@pytest.mark.parametrize(
    "costs",
    [
        uneven(4),
        uneven(4, latency=0.5),
        Costs.per_stage([3.0, 1.0, 1.0, 1.0], [6.0, 2.0, 2.0, 2.0], weight_grad=[1.0] * 4),
        Costs.per_stage([1.0, 2.0, 1.0, 2.5], [2.0, 3.0, 2.0, 5.0], weight_grad=[1.5] * 4),
    ],
)
def test_auto_is_no_slower_than_a_classic_schedule_under_its_memory(
    name: str, costs: Costs
) -> None:
    p, m = 4, 8
    classic = simulate(generate(name, p, m), costs)
    cap = max(classic.peak_activation_memory(w) for w in range(p))
    schedule = synthesize(costs, p, m, cap, time_limit_s=None)
    assert simulate(schedule, costs).makespan() <= classic.makespan() + 1e-9
    assert peak_memory(schedule, costs) <= cap


@pytest.mark.parametrize(
    "costs",
    [
        Costs.uniform(4, 1.0, 2.0, comm_latency=1.0),  # hand-offs as long as a forward
        Costs.per_stage([1.0, 2.5, 1.0, 1.0], [2.0, 5.0, 2.0, 2.0], comm_latency=0.3),
    ],
)
def test_auto_alone_beats_the_classic_schedules_where_they_do_not_suit(costs: Costs) -> None:
    p, m = 4, 8
    found = search(costs, p, m, 4.0, time_limit_s=None, seed_builtins=False)
    best = min(simulate(generate(n, p, m), costs).makespan() for n in ("1f1b", "zb-h1"))
    assert found.step < best - 0.1


def test_the_work_at_p16_m64_is_bounded_by_a_count_not_a_clock() -> None:
    costs = uneven(16, latency=0.1)
    found = search(costs, 16, 64, 16.0, time_limit_s=None)
    actions = 16 * 64 * 3
    assert found.work <= found.work_limit == DEFAULT_WORK
    # every simulation (a list-scheduling run counts as several) costs its actions
    assert found.simulations <= DEFAULT_WORK // actions + 1
    assert peak_memory(found.schedule, costs) <= 16.0


def test_auto_is_registered_and_generated_by_name() -> None:
    assert "auto" in names()
    schedule = lw.generate("auto", 4, 8)
    assert schedule is generate("auto", 4, 8)  # cached: the same in every caller
    assert schedule.split_stages and not stream_order_problems(schedule)
    tl = simulate(schedule, Costs.uniform(4, 1.0, 2.0, weight_grad=1.0))
    one_f_one_b = simulate(generate("1f1b", 4, 8), Costs.uniform(4, 1.0, 2.0, weight_grad=1.0))
    assert tl.makespan() < one_f_one_b.makespan()
    assert max(tl.peak_activation_memory(w) for w in range(4)) <= 4.0
    two = lw.generate("auto", 2, 4, 2)
    assert two.stage_worker == (0, 1, 0, 1) and two.chunks == 2


def test_diagnose_suggests_auto_when_the_search_beats_the_run() -> None:
    from layerwise.job.diagnose import suggestions

    cfg = {"workers": 4, "microbatches": 8, "schedule": "1f1b", "batch_size": 8, "layers": 2,
           "stage_sizes": [1, 1, 1, 1]}  # fmt: skip
    fwd, bwd = [0.01, 0.01, 0.03, 0.01], [0.02, 0.02, 0.06, 0.02]  # a heavy third stage
    current = simulate(generate("1f1b", 4, 8), Costs.per_stage(fwd, bwd)).makespan()
    found = [s for s in suggestions(cfg, fwd, bwd, current) if "auto" in s["change"]]
    assert len(found) == 1 and found[0]["change"] == "--schedule auto --memory-cap 4"
    assert found[0]["predicted_step_s"] < 0.99 * current


def test_simulate_auto_with_stage_times_and_a_cap(capsys: pytest.CaptureFixture[str]) -> None:
    from layerwise.cli import main

    uneven = ["--fwd", "1,1,2,1", "--bwd", "2,2,4,2"]
    assert main(["simulate", "--schedule", "auto", *uneven, "--memory-cap", "2", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert all(w["peak_activation_memory"] <= 2 for w in auto["workers"])
    assert main(["simulate", "--schedule", "1f1b", *uneven, "--json"]) == 0
    one_f_one_b = json.loads(capsys.readouterr().out)
    assert auto["makespan"] < one_f_one_b["makespan"]  # faster at half of 1F1B's memory
    assert main(["simulate", "--compare", *uneven, "--memory-cap", "4"]) == 0
    text = capsys.readouterr().out
    assert "peak mem." in text and "messages" in text
    assert "gpipe" in text.split("over the cap")[0]  # gpipe holds 8: marked
    assert "(zb-v left out: it has 8 stages, not the 4 times given)" in text


def test_simulate_rejects_stage_times_that_do_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    from layerwise.cli import main

    assert main(["simulate", "--fwd", "1,2", "--bwd", "2,2,2"]) == 2
    assert "different numbers of stages" in capsys.readouterr().err
    assert main(["simulate", "--fwd", "1,2"]) == 2
    assert "gives 2 stage times but the schedule has 4 stages" in capsys.readouterr().err
    assert main(["simulate", "--schedule", "auto", "--memory-cap", "0.5"]) == 2
    assert "smallest feasible cap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--fwd", "1,x"])
    assert "give a time such as 1.5" in capsys.readouterr().err
