"""Schedule IR: generators, the one validator, and text/CSV round-trip."""

from __future__ import annotations

import pytest

from layerwise.schedules import (
    SCHEDULE_NAMES,
    Action,
    Schedule,
    ScheduleError,
    from_csv,
    from_text,
    generate,
    get,
    problems,
    sequential,
    stream_order_problems,
    to_csv,
    to_text,
    validate,
)


def _chunk_counts(name: str) -> tuple[int, ...]:
    """1 to 3 stages per worker for schedules that hold several by default, else the one."""
    spec = get(name)
    tried = (1, 2, 3) if spec.chunks_default > 1 else (spec.chunks_default,)
    return tuple(v for v in tried if spec.allows_chunks(v))


CASES = [
    (name, p, m, v)
    for name in SCHEDULE_NAMES
    for p in (1, 2, 3, 4, 8)
    for m in (1, 2, 3, 4, 8, 16)
    for v in _chunk_counts(name)
    if not problems(name, p, m, v)  # e.g. interleaved needs m % p == 0
]


@pytest.mark.parametrize(("name", "p", "m", "v"), CASES)
def test_generators_are_valid_and_round_trip(name: str, p: int, m: int, v: int) -> None:
    schedule = generate(name, p, m, v)
    validate(schedule)
    assert schedule.num_workers == p
    assert schedule.num_stages == p * v
    assert schedule.num_microbatches == m
    assert from_text(to_text(schedule)) == schedule
    assert from_csv(to_csv(schedule), name=name).actions == schedule.actions
    per_mb = 3 if get(name).split_backward else 2
    assert sum(len(a) for a in schedule.actions) == per_mb * p * v * m


def test_action_prints_and_parses() -> None:
    for text in ("0F3", "2B1", "1W0", "12I7"):
        assert str(Action.parse(text)) == text
    assert Action.parse(" 3 F 10 ") == Action(3, "F", 10)
    with pytest.raises(ValueError, match=r"expected <stage><F\|B\|I\|W><microbatch>"):
        Action.parse("F03")


def test_exact_orders() -> None:
    text = lambda s, w: " ".join(map(str, s.actions[w]))  # noqa: E731
    one_f_one_b = generate("1f1b", 4, 8)
    assert text(one_f_one_b, 0) == "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7"
    assert text(one_f_one_b, 3) == " ".join(f"3F{i} 3B{i}" for i in range(8))
    # m < p: warm-up shrinks, nothing else changes
    assert text(generate("1f1b", 4, 2), 0) == "0F0 0F1 0B0 0B1"
    assert text(generate("gpipe", 2, 3), 1) == "1F0 1F1 1F2 1B0 1B1 1B2"
    assert text(generate("naive", 2, 2), 0) == "0F0 0B0 0F1 0B1"
    inter = generate("interleaved-1f1b", 2, 2, chunks=2)
    assert inter.stage_worker == (0, 1, 0, 1)
    assert text(inter, 0) == "0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1"


def _schedule(rows: list[str], m: int, placement: tuple[int, ...] | None = None) -> Schedule:
    actions = tuple(tuple(Action.parse(t) for t in row.split()) for row in rows)
    return Schedule("custom", m, placement or tuple(range(len(rows))), actions)


@pytest.mark.parametrize(
    ("rows", "m", "message"),
    [
        (
            ["0F0 0B0", "1B0 1F0"],
            1,
            r"deadlocks:\n.*\n  worker 1, position 0 \(1B0\) waits for 1F0 .* later in its "
            r"own list",
        ),
        (
            ["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"],
            2,
            r"worker 1, position 0 \(1F1\) waits for 0F1 .*stuck behind worker 0",
        ),
        (["0F0", "1F0 1B0"], 1, r"backward of micro-batch 0 on stage 0 is missing"),
        (["0F0 0B0 0F0", "1F0 1B0"], 1, r"worker 0, position 2 \(0F0\): .* appears twice"),
        (
            ["0F0 0B0", "1F0 1W0 1I0"],
            1,
            r"worker 1, position 1 \(1W0\): weight gradient W comes before",
        ),
        (["0F0 0B0", "1F0 1B0 1I0 1W0"], 1, r"either one B or an I and a W"),
        (["0F0 0B0 1F0 1B0", ""], 1, r"worker 0, position 2 \(1F0\): stage 1 lives on worker 1"),
        (["0F0 0B0 0F1 0B1", "1F0 1B0"], 1, r"micro-batch 1 does not exist"),
    ],
)
def test_validator_names_worker_position_and_rule(rows: list[str], m: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        validate(_schedule(rows, m))


def test_text_errors() -> None:
    with pytest.raises(ScheduleError, match="line 1: expected 'worker N"):
        from_text("0F0 0B0\n")
    with pytest.raises(ScheduleError, match="worker 0, position 1: cannot parse action 'X'"):
        from_text("worker 0: 0F0 X 0B0\n")
    with pytest.raises(ScheduleError, match=r"numbered 0\.\.N-1"):
        from_text("worker 1: 0F0 0B0\n")
    hand = from_text("worker 0: 0F0 0F1 0B0 0B1\nworker 1: 1F0 1B0 1F1 1B1\n")
    assert hand.num_microbatches == 2 and hand.stage_worker == (0, 1)


def test_unknown_schedule_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        generate("pipedream", 2, 2)
    with pytest.raises(ValueError, match="multiple of the number of workers"):
        generate("interleaved-1f1b", 4, 6, chunks=2)
    with pytest.raises(ValueError, match="chunks must be 1"):
        generate("1f1b", 4, 8, chunks=2)
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        generate("gpipe", 4, 0)


@pytest.mark.timeout(60)
def test_every_built_in_schedule_sends_each_stream_in_micro_batch_order() -> None:
    # what order-matched transports (NCCL) rely on; see stream_order_problems
    for name, p, m, v in CASES:
        assert stream_order_problems(generate(name, p, m, v)) == [], (name, p, m, v)
    swapped = from_text("worker 0: 0F1 0F0 0B0 0B1")
    assert stream_order_problems(swapped) == [
        "stage 0 (worker 0) runs its forwards in micro-batch order [1, 0]"
    ]


@pytest.mark.timeout(60)
def test_sequential_runs_one_micro_batch_through_the_same_stages() -> None:
    for name, p, m, v in CASES:
        like = generate(name, p, m, v)
        seq = sequential(like)
        assert seq.num_microbatches == 1
        assert seq.stage_worker == like.stage_worker
        assert seq.split_stages == like.split_stages
        kinds = sorted(a.kind for acts in seq.actions for a in acts)
        per_stage = ["F", "I", "W"] if like.split_stages else ["B", "F"]
        assert kinds == sorted(per_stage * like.num_stages)
        assert from_text(to_text(seq)).actions == seq.actions


def test_messages_per_step_count_the_hand_offs_between_workers() -> None:
    # p - 1 boundaries, each crossed once forward and once backward per micro-batch
    assert generate("1f1b", 4, 8).messages == 2 * 3 * 8
    assert generate("interleaved-1f1b", 4, 8, 2).messages == 2 * 7 * 8
    assert generate("gpipe", 1, 4).messages == 0
    local = Schedule("local", 1, (0, 0, 1), ((Action(0, "F", 0), Action(1, "F", 0),
                     Action(1, "B", 0), Action(0, "B", 0)), (Action(2, "F", 0),
                     Action(2, "B", 0))))  # fmt: skip
    assert local.messages == 2  # stages 0 and 1 share a worker: only 1 <-> 2 is a message
