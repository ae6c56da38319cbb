"""Step health checks, and the `layerwise simulate` command line."""

from __future__ import annotations

import json
import math

import pytest

from layerwise.cli import main
from layerwise.job.guard import StepGuard
from layerwise.schedules import names as schedule_names
from layerwise.schedules import problems


def test_non_finite_steps_are_skipped_then_stop_the_run() -> None:
    guard = StepGuard(max_nonfinite=3)
    assert guard.check(0, 5.0, 1.0) == {}
    assert "skipped" in guard.check(1, math.nan, 1.0)
    assert "skipped" in guard.check(2, 4.0, math.inf)
    assert guard.check(3, 4.0, 1.0) == {}  # a good step resets the count
    guard.check(4, math.nan, 1.0)
    guard.check(5, math.nan, 1.0)
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        guard.check(6, math.nan, 1.0)


def test_loss_spikes_are_flagged_after_warmup() -> None:
    guard = StepGuard(warmup=2)
    for step, loss in enumerate([4.0, 9.0, 3.0, 3.0]):  # 9.0 falls inside warm-up
        assert "spike" not in guard.check(step, loss, 1.0)
    note = guard.check(4, 10.0, 1.0)
    assert note["spike"].startswith("loss 10.000 is")


def test_simulate_json_and_compare(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--schedule", "gpipe", "-p", "4", "-m", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "gpipe"
    assert out["bubble_fraction"] == pytest.approx(3 / 11)
    assert [w["peak_inflight"] for w in out["workers"]] == [8] * 4
    assert main(["simulate", "--compare", "-p", "4", "-m", "6"]) == 0
    text = capsys.readouterr().out
    assert "interleaved-1f1b left out" in text and "zb-h1" in text
    assert main(["simulate", "--compare", "-p", "2", "-m", "4", "--json"]) == 0
    names = [r["schedule"] for r in json.loads(capsys.readouterr().out)["schedules"]]
    # every registered schedule that suits p = 2, m = 4, in registry order
    suits = [n for n in schedule_names() if not problems(n, 2, 4)]
    assert names == suits and {"naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1"} <= set(names)


def test_simulate_chart_files_and_custom_schedule(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert (
        main(["simulate", "-s", "naive", "-m", "1", "--png", str(png), "--trace", str(trace)]) == 0
    )
    text = capsys.readouterr().out
    assert "idle  75.0%" in text and "4.000 x ideal" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(trace.read_text())["traceEvents"]
    custom = tmp_path / "mine.txt"
    custom.write_text("worker 0: 0F0 0F1 0B0 0B1\nworker 1: 1F0 1B0 1F1 1B1\n")
    assert main(["simulate", "-p", "2", "--schedule-file", str(custom), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["makespan"] == pytest.approx(9.0)
    custom.write_text("worker 0: 0B0 0F0\n")
    assert main(["simulate", "-p", "1", "--schedule-file", str(custom)]) == 2
    assert "deadlocks" in capsys.readouterr().err
    assert main(["simulate", "-s", "interleaved-1f1b", "-p", "4", "-m", "6"]) == 2
    assert "multiple of the number of workers" in capsys.readouterr().err
