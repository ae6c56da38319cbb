"""Simulation with workers sharing cores, against the one-core-each simulator and closed forms."""

from __future__ import annotations

import pytest

from layerwise.schedules import Action, Schedule, ScheduleError, generate
from layerwise.simulate import Costs, simulate
from layerwise.simulate_shared import simulate_shared


@pytest.mark.parametrize(
    ("name", "p", "m"),
    [("gpipe", 4, 8), ("1f1b", 4, 6), ("interleaved", 2, 4), ("zb-h1", 4, 8), ("naive", 3, 2)],
)
def test_a_core_each_is_the_plain_simulator(name: str, p: int, m: int) -> None:
    schedule = generate(name, p, m)
    costs = Costs.per_stage(
        [1.0 + 0.1 * s for s in range(schedule.num_stages)],
        [2.0 + 0.3 * s for s in range(schedule.num_stages)],
        comm_latency=0.25,
    )
    plain, shared = simulate(schedule, costs), simulate_shared(schedule, costs, cores=p)
    assert shared.makespan() == pytest.approx(plain.makespan())
    key = lambda e: (e.worker, e.kind, e.stage, e.microbatch)  # noqa: E731
    for a, b in zip(sorted(plain.events, key=key), sorted(shared.events, key=key), strict=True):
        assert key(a) == key(b)
        assert (a.start, a.end) == pytest.approx((b.start, b.end))
    # more cores than processes is no faster than a core each
    assert simulate_shared(schedule, costs, cores=4 * p).makespan() == pytest.approx(
        plain.makespan()
    )


def test_all_processes_always_runnable_take_their_loaded_costs() -> None:
    # one stage, eight replicas on two cores: every action runs with all eight busy
    tl = simulate_shared(generate("gpipe", 1, 4), Costs.uniform(1, 0.5, 1.5), cores=2, copies=8)
    assert tl.makespan() == pytest.approx(4 * (0.5 + 1.5))


def test_a_worker_in_its_bubble_gives_its_share_to_the_others() -> None:
    # two workers on one core; costs are with both busy (twice their time alone). GPipe with
    # one micro-batch never has both busy, so each action runs at its speed alone.
    schedule = generate("gpipe", 2, 1)
    loaded = Costs.uniform(2, 2.0, 4.0)
    assert simulate_shared(schedule, loaded, cores=1).makespan() == pytest.approx(1 + 1 + 2 + 2)
    assert simulate(schedule, loaded).makespan() == pytest.approx(12.0)  # loaded throughout
    # with many micro-batches the steady state has both busy: close to the loaded time
    many = simulate_shared(generate("gpipe", 2, 16), loaded, cores=1).makespan()
    solo = simulate(generate("gpipe", 2, 16), Costs.uniform(2, 1.0, 2.0)).makespan()
    total_alone = 2 * 16 * (1.0 + 2.0)  # the core can never do better than all work in turn
    assert total_alone <= many + 1e-9
    assert solo < many < simulate(generate("gpipe", 2, 16), loaded).makespan()


@pytest.mark.timeout(30)
def test_measured_speeds_replace_sharing_where_given() -> None:
    # GPipe with one micro-batch: one worker of two runs at a time, each with 4 peers (copies)
    # that run with it; costs are with all 8 runnable on 2 cores
    schedule, loaded = generate("gpipe", 2, 1), Costs.uniform(2, 2.0, 4.0)
    shared = simulate_shared(schedule, loaded, cores=2, copies=4).makespan()
    assert shared == pytest.approx((2 + 2 + 4 + 4) / 2)  # 4 runnable: twice as fast
    # a group that gains only 1.25x when the others wait (measured for tensor parallelism)
    slow = simulate_shared(schedule, loaded, cores=2, copies=4, speeds={4: 1.25}).makespan()
    assert slow == pytest.approx((2 + 2 + 4 + 4) / 1.25)
    # a number of runnable processes it does not name keeps processor sharing
    assert simulate_shared(schedule, loaded, cores=2, copies=4, speeds={6: 1.1}).makespan() == (
        pytest.approx(shared)
    )
    with pytest.raises(ValueError, match="speeds must be positive"):
        simulate_shared(schedule, loaded, cores=2, copies=4, speeds={4: 0.0})


def test_bad_sizes_and_deadlocks_are_refused() -> None:
    with pytest.raises(ValueError, match="cores"):
        simulate_shared(generate("1f1b", 2, 2), Costs.uniform(2), cores=0)
    with pytest.raises(ValueError, match="stages"):
        simulate_shared(generate("1f1b", 2, 2), Costs.uniform(3), cores=1)
    stuck = Schedule("stuck", 1, (0, 1), ((Action(0, "B", 0), Action(0, "F", 0)),
                                          (Action(1, "F", 0), Action(1, "B", 0))))  # fmt: skip
    with pytest.raises(ScheduleError):
        simulate_shared(stuck, Costs.uniform(2), cores=1)
