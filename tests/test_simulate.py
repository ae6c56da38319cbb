"""Simulator against closed forms, and Timeline metrics and renderers."""

from __future__ import annotations

import json
import time

import pytest

from layerwise.schedules import generate
from layerwise.simulate import Costs, simulate
from layerwise.timeline import Event, Timeline, chrome_trace, render_ascii, render_png

SIZES = [(p, m) for p in (1, 2, 4, 8) for m in (1, 2, 4, 8, 16, 32)]


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_naive_idles_p_minus_one_over_p(p: int, m: int) -> None:
    tl = simulate(generate("naive", p, m), Costs.uniform(p, 1.0, 2.0))
    for w in range(p):
        assert tl.idle_fraction(w) == pytest.approx((p - 1) / p)
    assert tl.makespan() == pytest.approx(m * p * 3.0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), SIZES)
def test_gpipe_and_1f1b_bubble(name: str, p: int, m: int) -> None:
    tl = simulate(generate(name, p, m), Costs.uniform(p, 1.0, 2.0))
    assert tl.bubble_fraction() == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_peak_inflight_activations(p: int, m: int) -> None:
    costs = Costs.uniform(p, 1.0, 2.0)
    one_f_one_b = simulate(generate("1f1b", p, m), costs)
    assert one_f_one_b.peak_inflight(0) == min(p, m)
    assert [one_f_one_b.peak_inflight(w) for w in range(p)] == [min(p - w, m) for w in range(p)]
    assert simulate(generate("gpipe", p, m), costs).peak_inflight(0) == m
    assert max(simulate(generate("zb-h1", p, m), costs).peak_inflight(w) for w in range(p)) <= min(
        p, m
    )


@pytest.mark.parametrize(
    ("p", "m", "v"), [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 2), (4, 8, 3)]
)
def test_interleaved_bubble_is_one_vth(p: int, m: int, v: int) -> None:
    # a stage is 1/v of a worker's layers, so its costs are 1/v of a plain stage's
    tl = simulate(generate("interleaved-1f1b", p, m, v), Costs.uniform(p * v, 1.0 / v, 2.0 / v))
    ideal = m * 3.0
    assert (tl.makespan() - ideal) / ideal == pytest.approx((p - 1) / (v * m))


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 4), (4, 8), (4, 16), (8, 16), (8, 32)])
def test_zero_bubble_h1_is_a_third_of_1f1b(p: int, m: int) -> None:
    costs = Costs.uniform(p, 1.0, 2.0, weight_grad=1.0)  # F = I = W = 1
    ideal = m * 3.0
    zb = simulate(generate("zb-h1", p, m), costs).makespan() - ideal
    ofob = simulate(generate("1f1b", p, m), costs).makespan() - ideal
    assert ofob == pytest.approx(3.0 * (p - 1))
    assert zb == pytest.approx(ofob / 3.0)


def test_communication_and_uneven_stages() -> None:
    costs = Costs.per_stage(
        [1.0, 3.0], [2.0, 6.0], activation_bytes=[1e6, 0.0], comm_latency=0.5, comm_bandwidth=1e6
    )
    tl = simulate(generate("gpipe", 2, 1), costs)
    # F0 [0,1], send 1.5, F1 [2.5,5.5], B1 [5.5,11.5], send 1.5, B0 [13,15]
    assert tl.makespan() == pytest.approx(15.0)
    assert tl.busy(1) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="costs describe 2 stages but the schedule has 3"):
        simulate(generate("gpipe", 3, 1), costs)
    with pytest.raises(ValueError, match="finite and >= 0"):
        Costs.per_stage([1.0, -1.0], [1.0, 1.0])


def test_simulating_64_workers_512_microbatches_is_fast() -> None:
    schedule = generate("1f1b", 64, 512)
    t0 = time.perf_counter()
    tl = simulate(schedule, Costs.uniform(64))
    elapsed = time.perf_counter() - t0
    assert tl.bubble_fraction() == pytest.approx(63 / 575)
    assert elapsed < 10.0  # generous: a shared machine; the benchmark reports the real figure


def test_renderers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tl = simulate(generate("1f1b", 3, 4), Costs.uniform(3))
    text = render_ascii(tl, width=60)
    rows = [line for line in text.splitlines() if line.startswith("w")]
    assert len(rows) == 3
    assert "F0" in rows[0] and "B3" in rows[0] and "." in rows[0]
    assert "idle  33.3%" in rows[1]
    png = render_png([tl, tl], tmp_path / "t.png", titles=["a", "b"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    trace = chrome_trace([tl])
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == len(tl.events)
    assert json.loads(json.dumps(trace)) == trace
    again = Timeline.from_json(json.loads(json.dumps(tl.to_json())))
    assert again.events == tl.events and again.makespan() == tl.makespan()


def test_wait_counts_as_idle_and_comm() -> None:
    tl = Timeline(
        2,
        [Event(0, 0, 1, "F", 0, 0), Event(1, 0, 1, "wait"), Event(1, 1, 2, "F", 1, 0)],
        "measured",
    )
    assert tl.busy(1) == 1 and tl.idle(1) == 1 and tl.comm_wait(1) == 1
    assert tl.idle_fraction(0) == 0.5


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "interleaved-1f1b"])
def test_measured_costs_recover_the_costs_a_timeline_was_made_with(name: str) -> None:
    from layerwise.simulate import measured_costs

    schedule = generate(name, 3, 6, 2 if name == "interleaved-1f1b" else 1)
    n = schedule.num_stages
    costs = Costs.per_stage([1.0 + s for s in range(n)], [2.0 + s for s in range(n)],
                            weight_grad=[0.5] * n, comm_latency=0.25)  # fmt: skip
    recovered = measured_costs([simulate(schedule, costs)], schedule)
    assert recovered.forward == pytest.approx(costs.forward)
    if schedule.split_stages:
        assert recovered.input_grad == pytest.approx(costs.input_grad)
        assert recovered.weight_grad == pytest.approx(costs.weight_grad)
    assert recovered.backward == pytest.approx(costs.backward)
    assert recovered.comm_latency == pytest.approx(0.25)
    again = simulate(schedule, recovered)
    assert again.makespan() == pytest.approx(simulate(schedule, costs).makespan())
