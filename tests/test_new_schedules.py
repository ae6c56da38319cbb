"""Breadth-first and the newer zero-bubble schedules: looped-bfs, zb-h2, interleaved-zb.

Pure checks over p in {1, 2, 3, 4, 8}, m in {p, 2p, 4p} and 1 to 3 stages per worker:
validity, micro-batch order on every stream, the declared peak against the simulator, and
the bubble and memory against the papers. Then one process group per world size trains
with each of them and compares with single-process training.

Bubbles are simulated with F = I = W (B = I + W), a worker's work split evenly over its
chunks, and compared with closed forms within 1e-9. The bubble fraction is idle time over
worker time for one step; with ideal time T = m (F + B) the papers' bubble *rates* are
bubble / T, so a rate r is a fraction r / (1 + r).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import _schedule_workers as sw
from layerwise.job.launcher import run_workers
from layerwise.schedules import (
    Schedule,
    generate,
    get,
    problems,
    stream_order_problems,
    validate,
)
from layerwise.simulate import Costs, simulate
from layerwise.timeline import Timeline

EXACT = 1e-9


def sizes(name: str) -> Iterator[tuple[int, int, int]]:
    """(p, m, v) for p in {1, 2, 3, 4, 8}, m in {p, 2p, 4p}, v in {1, 2, 3} where allowed."""
    spec = get(name)
    for p in (1, 2, 3, 4, 8):
        for m in (p, 2 * p, 4 * p):
            for v in (1, 2, 3) if spec.multi_chunk else (1,):
                assert not spec.problems(p, m, v), (name, p, m, v)
                yield p, m, v


def run(schedule: Schedule, f: float = 1.0, i: float = 1.0, w: float = 1.0) -> Timeline:
    """Simulate with per-worker costs F, I, W split evenly over the worker's chunks."""
    v = schedule.chunks
    return simulate(schedule, Costs.uniform(schedule.num_stages, f / v, (i + w) / v, w / v))


def peaks(tl: Timeline) -> list[int]:
    return [tl.peak_inflight(w) for w in range(tl.num_workers)]


def span_bubble(tl: Timeline) -> float:
    """Idle time inside each worker's own span (its first start to its last end) over the
    sum of the spans: the bubble left once consecutive steps overlap, as the zero-bubble
    paper counts it (its optimizer step is validated afterwards)."""
    spans = [
        max(e.end for e in tl.worker_events(w)) - min(e.start for e in tl.worker_events(w))
        for w in range(tl.num_workers)
    ]
    return 1.0 - sum(tl.busy(w) for w in range(tl.num_workers)) / sum(spans)


@pytest.mark.parametrize("name", sw.NEW_SCHEDULES)
def test_valid_in_stream_order_and_peak_as_declared(name: str) -> None:
    spec = get(name)
    for p, m, v in sizes(name):
        schedule = generate(name, p, m, v)
        validate(schedule)
        assert stream_order_problems(schedule) == [], (p, m, v)
        assert schedule.stage_worker == spec.stage_worker(p, v)
        per_stage_microbatch = 3 if spec.split_backward else 2
        assert sum(map(len, schedule.actions)) == per_stage_microbatch * p * v * m
        declared = [spec.peak_inflight(p, m, v, w) for w in range(p)]
        assert peaks(run(schedule)) == declared, (p, m, v)


def test_looped_bfs_has_the_bubble_of_interleaved_1f1b() -> None:
    """Lamy-Poirier 2023: looping divides the bubble by v, breadth-first as depth-first:
    rate (p - 1) / (v m), fraction (p - 1) / (v m + p - 1)."""
    for p, m, v in sizes("looped-bfs"):
        bfs = run(generate("looped-bfs", p, m, v)).bubble_fraction()
        interleaved = run(generate("interleaved-1f1b", p, m, v)).bubble_fraction()
        assert bfs == pytest.approx((p - 1) / (v * m + p - 1), abs=EXACT), (p, m, v)
        assert bfs == pytest.approx(interleaved, abs=EXACT)


def test_zb_h2_bubble() -> None:
    """Qi et al. 2023, Sec. 2: per worker ZB-H1 idles (p-1)(F + I - W), ZB-H2 (p-1)(F + I
    - 2W), i.e. rates (p-1)/(3m) and 0 with F = I = W. One step cannot start its last
    worker before (p-1)F, so with F = I = W both reach that floor, (p-1)/(3m + p-1) (at
    most 0.127 for p = 8, m = 16); ZB-H2's zero shows inside each worker's span, and below
    ZB-H1 within the step when I > W."""
    for p, m, _ in sizes("zb-h2"):
        h1, h2 = run(generate("zb-h1", p, m)), run(generate("zb-h2", p, m))
        floor = (p - 1) / (3 * m + p - 1)
        assert h2.bubble_fraction() == pytest.approx(floor, abs=EXACT), (p, m)
        assert h2.bubble_fraction() <= h1.bubble_fraction() + EXACT
        if m >= 2 * p:  # enough micro-batches to fill the warm-up
            assert span_bubble(h2) == pytest.approx(0.0, abs=EXACT), (p, m)
            if p > 1:
                assert span_bubble(h2) < span_bubble(h1)
            # F = 1, I = 3, W = 1: the papers' idle times exactly, ZB-H2 below ZB-H1
            h1, h2 = run(generate("zb-h1", p, m), 1, 3, 1), run(generate("zb-h2", p, m), 1, 3, 1)
            assert h1.makespan() - 5 * m == pytest.approx((p - 1) * (1 + 3 - 1), abs=EXACT)
            assert h2.makespan() - 5 * m == pytest.approx((p - 1) * (1 + 3 - 2), abs=EXACT)


def test_interleaved_zb_bubble_is_below_interleaved_1f1b() -> None:
    """With F = I = W interleaved-zb idles only the ramp, (p - 1) F / v per worker:
    fraction (p - 1) / (3 v m + p - 1), against interleaved 1F1B's (p - 1) / (v m + p - 1);
    none inside a worker's span once m >= 2p. With one stage per worker it is ZB-H2."""
    for p, m, v in sizes("interleaved-zb"):
        zb = run(generate("interleaved-zb", p, m, v))
        interleaved = run(generate("interleaved-1f1b", p, m, v)).bubble_fraction()
        assert zb.bubble_fraction() == pytest.approx((p - 1) / (3 * v * m + p - 1), abs=EXACT)
        if p > 1:
            assert zb.bubble_fraction() < interleaved, (p, m, v)
        if m >= 2 * p:
            assert span_bubble(zb) == pytest.approx(0.0, abs=EXACT), (p, m, v)
        if v == 1:
            assert generate("interleaved-zb", p, m, 1).actions == generate("zb-h2", p, m).actions


def test_peak_memory_relations() -> None:
    """Activations held at peak, in (stage, micro-batch) units: zb-h2 holds up to 2p - 1
    (Qi et al. 2023: (2p - 1) M_B, about twice 1F1B's p M_B), on every worker; every worker
    of interleaved-zb holds what interleaved 1F1B's first worker holds, so the pipeline's
    peak is the same; looped-bfs holds every micro-batch of every chunk, v times GPipe's m."""
    for p, m, _ in sizes("zb-h2"):
        h2, h1 = max(peaks(run(generate("zb-h2", p, m)))), max(peaks(run(generate("zb-h1", p, m))))
        assert h2 == min(2 * p - 1, m) <= 2 * h1
    for p, m, v in sizes("interleaved-zb"):
        zb = peaks(run(generate("interleaved-zb", p, m, v)))
        interleaved = peaks(run(generate("interleaved-1f1b", p, m, v)))
        assert max(zb) == max(interleaved) == zb[0] == interleaved[0], (p, m, v)
    for p, m, v in sizes("looped-bfs"):
        assert peaks(run(generate("looped-bfs", p, m, v))) == [m * v] * p


def test_exact_orders() -> None:
    text = lambda s, w: " ".join(map(str, s.actions[w]))  # noqa: E731
    zb_h2 = generate("zb-h2", 3, 6)
    assert (
        text(zb_h2, 0) == "0F0 0F1 0F2 0F3 0F4 0I0 0W0 0F5 0I1 0I2 0W1 0W2 0I3 0I4 0W3 0W4 0I5 0W5"
    )
    assert text(zb_h2, 2).startswith("2F0 2I0 2F1 2I1 2F2 2I2 2F3 2I3 2F4 2I4 2W0 2F5 2I5 2W1")
    zb_h1 = generate("zb-h1", 3, 6)
    assert (
        text(zb_h1, 0) == "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0F4 0I2 0W2 0F5 0I3 0W3 0I4 0W4 0I5 0W5"
    )
    bfs = generate("looped-bfs", 2, 4)  # two stages per worker by default
    assert bfs.stage_worker == (0, 1, 0, 1)
    assert text(bfs, 0) == "0F0 0F1 0F2 0F3 2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3 0B0 0B1 0B2 0B3"
    assert generate("looped-bfs", 3, 4, 1).actions == generate("gpipe", 3, 4).actions
    izb = generate("interleaved-zb", 2, 2)
    assert text(izb, 0) == "0F0 0F1 2F0 2F1 2I0 2W0 2I1 0I0 0I1 2W1 0W0 0W1"


def test_sizes_and_chunks_give_their_messages() -> None:
    assert problems("interleaved-zb", 4, 6) == [
        "interleaved-zb needs the number of micro-batches to be a multiple of the number of "
        "workers (got m=6, p=4); try m=4 or m=8"
    ]
    with pytest.raises(ValueError, match="try m=4 or m=8"):
        generate("interleaved-zb", 4, 6)
    assert problems("interleaved-1f1b", 4, 6)[0].startswith("interleaved-1f1b needs")
    assert problems("zb-h2", 4, 6, 2) == [
        "schedule 'zb-h2' runs one stage per worker; chunks must be 1, got 2"
    ]
    assert problems("looped-bfs", 4, 3) == problems("zb-h2", 4, 3) == []  # any m will do
    assert get("bfs").name == "looped-bfs" and get("zbh2").name == "zb-h2"
    assert generate("interleaved-zb", 2, 4).chunks == generate("looped-bfs", 2, 4).chunks == 2
    assert get("interleaved-zb").interleaves == "zb-h1"
    assert get("looped-bfs").interleaves == "gpipe"


@pytest.fixture(scope="module", params=[2, 4], ids=["p2", "p4"])
def trained(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, list[str]]]]:
    """One process group per world size, running every case of ``new_schedule_cases``."""
    return request.param, run_workers(sw.new_schedule_cases, request.param, timeout_s=120)


@pytest.mark.timeout(240)
def test_training_matches_single_process(trained: tuple[int, list[dict[str, list[str]]]]) -> None:
    world, results = trained
    expected = [sw.case_name(*case) for case in sw.cases(world)] + sw.auto_case_names(world)
    for rank, res in enumerate(results):
        assert sorted(res) == sorted(expected)
        for case in expected:
            assert res[case] == [], f"worker {rank}, {case}: {res[case]}"
