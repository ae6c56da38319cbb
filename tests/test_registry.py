"""The schedule registry: one entry per schedule, read by every tool.

The first tests register a schedule the code base has never heard of, a generator and an
entry and nothing else, and find it in ``simulate --compare``, in the ``--schedule`` choices
of ``simulate`` and ``train``, and in the planner.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import layerwise.schedules as schedules
from layerwise.cli import build_parser, main
from layerwise.planner.bubble import pipeline_time
from layerwise.planner.memory import inflight_microbatches
from layerwise.planner.specs import Layout
from layerwise.planner.specs import schedules as planner_schedules
from layerwise.schedules import (
    Action,
    Schedule,
    ScheduleError,
    ScheduleSpec,
    alternatives,
    chunks_for,
    generate,
    get,
    names,
    problems,
    register,
    specs,
    stage_worker,
    unregister,
)
from layerwise.schedules.generators import plain
from layerwise.simulate import Costs, simulate

NEW = "gpipe-lifo"


def gpipe_lifo(num_workers: int, num_microbatches: int) -> Schedule:
    """All forwards, then the backwards newest first: a GPipe variant nobody registered."""
    m = num_microbatches
    lists = [
        [Action(w, "F", i) for i in range(m)] + [Action(w, "B", i) for i in reversed(range(m))]
        for w in range(num_workers)
    ]
    return plain(NEW, m, lists)


@pytest.fixture
def new_schedule() -> Iterator[ScheduleSpec]:
    """Register ``gpipe-lifo`` for one test, and remove it afterwards."""
    spec = register(
        ScheduleSpec(
            name=NEW,
            generator=gpipe_lifo,
            description="all forwards, then the backwards newest first",
            peak_inflight=lambda p, m, v, w: m,
        )
    )
    yield spec
    unregister(NEW)


def test_new_schedule_appears_in_simulate_compare(
    new_schedule: ScheduleSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--compare", "-p", "3", "-m", "6"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith(NEW) for r in rows)
    assert main(["simulate", "--compare", "-p", "3", "-m", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # every registered schedule, in registration order, kept or left out by its own sizes
    kept = [r["schedule"] for r in out["schedules"]]
    assert kept == [n for n in names() if not problems(n, 3, 4)]
    assert kept[:4] == ["naive", "gpipe", "1f1b", "zb-h1"] and kept[-1] == NEW
    assert list(out["left_out"]) == [n for n in names() if problems(n, 3, 4)]
    assert {"interleaved-1f1b", "interleaved-zb"} <= set(out["left_out"])  # m % p != 0
    assert main(["simulate", "-s", NEW, "-p", "3", "-m", "4", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert [w["peak_inflight"] for w in single["workers"]] == [4, 4, 4]


def test_new_schedule_is_a_choice_of_simulate_and_train(new_schedule: ScheduleSpec) -> None:
    parser = build_parser()
    assert parser.parse_args(["simulate", "--schedule", NEW]).schedule == NEW
    assert parser.parse_args(["train", "--schedule", NEW]).schedule == NEW
    assert parser.parse_args(["train", "--schedule", "gpipe_lifo"]).schedule == NEW
    assert NEW in schedules.SCHEDULE_NAMES and schedules.GENERATORS[NEW] is gpipe_lifo


def test_unregistered_schedule_is_not_a_choice(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("simulate", "train"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--schedule", NEW])
        assert "invalid choice" in capsys.readouterr().err
    assert NEW not in schedules.SCHEDULE_NAMES
    # aliases stay accepted on the command line, resolved to the registered name
    assert build_parser().parse_args(["train", "--schedule", "zb"]).schedule == "zb-h1"


def test_new_schedule_reaches_the_planner(
    new_schedule: ScheduleSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    assert NEW in planner_schedules()
    seconds, bubble = pipeline_time(NEW, 4, 8, 1, 1.0, 2.0, 0.0)
    assert seconds > 8 * 3.0 and 0.0 < bubble < 1.0
    lay = Layout(1, 1, 4, 1, schedule=NEW)
    assert inflight_microbatches(lay, 8, 3) == inflight_microbatches(
        Layout(1, 1, 4, 1, schedule="gpipe"), 8, 3
    )
    argv = (
        "plan evaluate --layers 8 --hidden 1024 --heads 16 --seq 512 --vocab 32000 --gpu "
        f"a100-80gb --gpus 8 --tp 1 --pp 4 --micro-batch 1 --global-batch 16 --json "
        f"--schedule {NEW}"
    ).split()
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"]["schedule"] == NEW and 0.0 < data["bubble_fraction"] < 1.0
    assert NEW in alternatives((0, 1, 2, 3), 8)


def test_aliases_and_underscores_resolve() -> None:
    assert get("interleaved").name == "interleaved-1f1b"
    assert get("zb").name == get("ZBH1").name == get("zb_h1").name == "zb-h1"
    assert generate("zb", 2, 3).name == "zb-h1"
    assert generate("interleaved", 2, 4).chunks == 2  # the entry's default


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'; choose one of ") as err:
        get("pipedream")
    assert all(name in str(err.value) for name in names())
    with pytest.raises(ValueError, match="unknown schedule"):
        generate("pipedream", 2, 2)


def test_register_rejects_taken_names_and_aliases() -> None:
    with pytest.raises(ValueError, match=r"'gpipe' .* already registered"):
        register(get("gpipe"))
    taken_alias = ScheduleSpec("zb-copy", gpipe_lifo, "x", lambda p, m, v, w: m, aliases=("zb",))
    with pytest.raises(ValueError, match=r"'zb' \(schedule 'zb-h1'\) already registered"):
        register(taken_alias)
    assert "zb-copy" not in names()
    with pytest.raises(ValueError, match="must be written 'my-schedule'"):
        register(ScheduleSpec("My_Schedule", gpipe_lifo, "x", lambda p, m, v, w: m))


def test_chunks_default_and_allowed() -> None:
    assert chunks_for("1f1b", None) == 1
    assert chunks_for("interleaved-1f1b", None) == 2
    assert chunks_for("interleaved", 3) == 3
    with pytest.raises(
        ValueError, match="'1f1b' runs one stage per worker; chunks must be 1, got 2"
    ):
        chunks_for("1f1b", 2)
    with pytest.raises(ValueError, match="chunks must be >= 1, got 0"):
        chunks_for("interleaved-1f1b", 0)
    assert problems("gpipe", 4, 8, 3) == [
        "schedule 'gpipe' runs one stage per worker; chunks must be 1, got 3"
    ]


def test_interleaved_constraint_gives_its_message() -> None:
    message = (
        "interleaved-1f1b needs the number of micro-batches to be a multiple of the number "
        "of workers (got m=6, p=4); try m=4 or m=8"
    )
    assert problems("interleaved-1f1b", 4, 6) == [message]
    assert problems("interleaved-1f1b", 4, 8) == problems("1f1b", 4, 6) == []
    with pytest.raises(ValueError) as err:
        generate("interleaved-1f1b", 4, 6, 2)
    assert str(err.value) == message
    assert [c.rule for c in get("interleaved-1f1b").constraints] == ["m % p == 0"]


def _sizes(spec: ScheduleSpec) -> Iterator[tuple[int, int, int]]:
    for p in (1, 2, 3, 4):
        for m in (1, 2, 3, 4, 8):
            for v in (1, 2, 3):
                if spec.allows_chunks(v) and not spec.problems(p, m, v):
                    yield p, m, v


@pytest.mark.parametrize("name", names())
def test_peak_inflight_declaration_matches_the_simulator(name: str) -> None:
    spec = get(name)
    for p, m, v in _sizes(spec):
        schedule = generate(name, p, m, v)
        n = schedule.num_stages
        for costs in (
            Costs.uniform(n, 1.0, 2.0),
            Costs.per_stage(
                [1.0 + s % 3 for s in range(n)], [2.5 - 0.5 * (s % 2) for s in range(n)]
            ),
        ):
            timeline = simulate(schedule, costs)
            got = [timeline.peak_inflight(w) for w in range(p)]
            assert got == [spec.peak_inflight(p, m, v, w) for w in range(p)], (p, m, v)


@pytest.mark.parametrize("name", names())
def test_declared_placement_and_split_match_the_generator(name: str) -> None:
    spec = get(name)
    for p, m, v in _sizes(spec):
        schedule = generate(name, p, m, v)
        assert schedule.stage_worker == spec.stage_worker(p, v)
        assert bool(schedule.split_stages) == spec.split_backward


def test_v_placement_puts_first_and_last_stage_on_one_worker() -> None:
    assert stage_worker("looped", 4, 2) == (0, 1, 2, 3, 0, 1, 2, 3)
    assert stage_worker("v", 4, 2) == (0, 1, 2, 3, 3, 2, 1, 0)
    for p in (1, 2, 3, 5):
        placement = stage_worker("v", p, 2)
        for w in range(p):
            assert [s for s, owner in enumerate(placement) if owner == w] == [w, 2 * p - 1 - w]
    assert stage_worker("v", 2, 3) == (0, 1, 1, 0, 0, 1)  # the zig-zag goes on


def v_gpipe(num_workers: int, num_microbatches: int, chunks: int) -> Schedule:
    """GPipe over V-placed stages: each worker runs its first stage's forwards, then its
    second's, then the second's backwards and the first's."""
    p, m = num_workers, num_microbatches
    lists = [
        [Action(s, "F", i) for s in (w, 2 * p - 1 - w) for i in range(m)]
        + [Action(s, "B", i) for s in (2 * p - 1 - w, w) for i in range(m)]
        for w in range(p)
    ]
    return Schedule("v-gpipe", m, stage_worker("v", p, 2), tuple(tuple(a) for a in lists))


def test_a_v_shaped_schedule_registers_and_its_placement_is_checked() -> None:
    entry = ScheduleSpec(
        name="v-gpipe",
        generator=v_gpipe,
        description="GPipe on V-placed stages",
        peak_inflight=lambda p, m, v, w: 2 * m,
        chunks_default=2,
        chunks_allowed=(2, 2),
        placement="v",
    )
    register(entry)
    try:
        schedule = generate("v-gpipe", 3, 4)
        assert schedule.stage_worker == (0, 1, 2, 2, 1, 0)
        assert simulate(schedule, Costs.uniform(6)).peak_inflight(0) == 8
        found = alternatives(schedule.stage_worker, 4)  # with the built-in V schedules
        assert found[-1] == "v-gpipe" and all(get(n).placement == "v" for n in found)
        assert "v-gpipe" not in planner_schedules()  # two stages per worker
    finally:
        unregister("v-gpipe")
    wrong = ScheduleSpec(
        "looped-as-v", lambda p, m, v: generate("interleaved-1f1b", p, m, v), "x",
        lambda p, m, v, w: m, chunks_default=2, chunks_allowed=(2, 2), placement="v",
    )  # fmt: skip
    register(wrong)
    try:
        with pytest.raises(ScheduleError, match="declares the v placement"):
            generate("looped-as-v", 2, 2)
    finally:
        unregister("looped-as-v")


def test_alternatives_run_on_the_same_stages() -> None:
    one = alternatives((0, 1, 2), 4)
    assert one[:3] == ["gpipe", "1f1b", "zb-h1"] and "naive" not in one  # naive is a reference
    assert "zb-h2" in one and "interleaved-zb" not in one  # one stage: zb-h1 is offered
    two = alternatives((0, 1, 0, 1), 4)
    assert two[0] == "interleaved-1f1b" and {"interleaved-zb", "looped-bfs"} <= set(two)
    three = alternatives((0, 1, 0, 1), 3)
    assert "looped-bfs" in three and not {"interleaved-1f1b", "interleaved-zb"} & set(three)
    assert [s.name for s in specs() if s.reference] == ["naive"]
