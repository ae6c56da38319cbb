"""The job's console: plain lines when not on a terminal, one summary line at the end."""

from __future__ import annotations

import io
from pathlib import Path

from layerwise.job.console import Console, Scalars


def _record(step: int, val: float | None = None) -> dict[str, float | int]:
    r: dict[str, float | int] = {"step": step, "loss": 2.0 - step / 100, "tokens_per_s": 1000.0,
                                 "idle": 0.25}  # fmt: skip
    if val is not None:
        r["val_loss"] = val
    return r


def test_a_log_gets_one_line_per_validation_and_a_summary(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console("4 workers 1f1b", total=20, start=0, stream=out, tty=False)
    records = [_record(s, 1.5 if (s + 1) % 10 == 0 else None) for s in range(20)]
    for r in records:
        console.step(r)
    console.finish(records, tmp_path / "run")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "4 workers 1f1b: steps 1..20"
    assert [ln.split(":")[0] for ln in lines[1:3]] == ["step 10/20", "step 20/20"]
    assert "val loss 1.500" in lines[1] and "1000 tok/s" in lines[1]
    assert lines[3].startswith("done: 20 steps to step 20; training loss 1.810, validation loss")
    assert str(tmp_path / "run") in lines[3] and len(lines) == 5
    assert lines[4] == f"next: layerwise diagnose {tmp_path / 'run'}   |   " \
        f"layerwise generate {tmp_path / 'run'}"  # fmt: skip


def test_a_terminal_gets_a_bar_and_the_same_summary(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console("run", total=3, start=0, stream=out, tty=True)
    records = [_record(s) for s in range(3)]
    for r in records:
        console.step(r)
    console.finish(records, tmp_path)
    text = out.getvalue()
    assert "\r" in text and "3/3" in text  # tqdm redraws in place
    assert "done: 3 steps to step 3" in text and "next: layerwise diagnose" in text


def test_nothing_to_do_and_scalars_without_tensorboard(tmp_path: Path) -> None:
    out = io.StringIO()
    Console("run", total=5, start=5, stream=out, tty=False).finish([], tmp_path)
    assert "nothing to do" in out.getvalue()
    scalars = Scalars(tmp_path)  # with or without tensorboard installed, writing works
    scalars.write(_record(0, 1.0))
    scalars.close()
    if scalars.writer is not None:
        assert list((tmp_path / "tensorboard").iterdir())
