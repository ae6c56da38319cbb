"""The training job: layouts agree, resume equals an uninterrupted run, failures end the job,
and the command line works under our launcher and under torchrun on two "nodes"."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import _workers as w
from layerwise.cli import main
from layerwise.job.launcher import describe_failures, run_workers
from layerwise.job.trainer import PHASES
from layerwise.schedules import alternatives

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


def losses(run_dir: str | Path) -> list[float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.py"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("two")
    runs: dict[str, Any] = run_workers(w.train_cases, 2, str(root), str(corpus), timeout_s=300)[0]
    return runs


@pytest.mark.timeout(400)
def test_layouts_agree_and_resume_equals_uninterrupted(
    tmp_path: Path, corpus: Path, two_worker_runs: dict[str, Any]
) -> None:
    two = two_worker_runs
    one = run_workers(w.train_cases, 1, str(tmp_path), str(corpus), timeout_s=300)[0]
    reference = losses(one["1f1b m=1"])
    assert len(reference) == 4 and reference[-1] < reference[0]
    for key in ("1f1b m=4", "gpipe m=2", "zb-h1 m=8", "auto m=4"):
        assert losses(two[key]) == pytest.approx(reference, rel=1e-4, abs=1e-5), key
    assert losses(two["resumed"]) == pytest.approx(losses(two["1f1b m=4"]), rel=1e-6, abs=1e-7)
    cut, whole = two["auto resumed"]
    # the resumed run took up the order searched before the cut (two searches may differ by
    # a few actions, so the uninterrupted run agrees to rounding, as other layouts do)
    assert Path(cut, "schedule.txt").read_text() == two["auto searched"]
    assert two["auto searched"].startswith("# schedule=auto microbatches=4")
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-4, abs=1e-5)
    run = Path(two["1f1b m=4"])
    for name in ("metrics.jsonl", "timeline.json", "timeline.png", "trace.json"):
        assert (run / name).exists(), name
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "grad_norm", "tokens_per_s", "idle", "step_time"} <= set(records[0])
    assert "val_loss" in records[1] and "val_loss" in records[3]
    for r in (r for r in records if "step_time" in r):  # each step cut into its phases
        assert tuple(r["phases_s"]) == PHASES and min(r["phases_s"].values()) >= 0.0
        assert sum(r["phases_s"].values()) == pytest.approx(r["step_time"], rel=1e-9)
        assert r["phases_s"]["pipeline"] > 0.0
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4 and (run / "checkpoints" / latest["path"]).is_dir()
    assert not list((run / "checkpoints").glob("*.tmp"))

    from layerwise.job.diagnose import diagnose, render

    report = diagnose(run)
    assert len(report["workers"]) == 2 and report["steps"] == 4
    assert 0.0 <= report["measured_bubble"] < 1.0
    assert report["suggestions"] and all(s["predicted_step_s"] > 0 for s in report["suggestions"])
    text = render(report)
    assert "suggestions" in text and "idle %" in text
    # the step was predicted before training, from the pipeline calibrated on batch 0
    prediction = json.loads((run / "prediction.json").read_text())
    assert prediction["schedule"] == "1f1b" and prediction["predicted_step_s"] > 0
    assert len(prediction["stage_forward_s"]) == 2 and prediction["handoff_s"] > 0
    others = set(prediction["same_stages_other_schedules_s"])
    assert {"gpipe", "1f1b", "zb-h1"} <= others
    assert others == set(alternatives((0, 1), 4))  # the registry's, on the same stages
    assert report["predicted_before_training_s"] == prediction["predicted_step_s"]
    assert "predicted before training (calibrate)" in text
    phases = report["phases_s"]
    assert phases is not None and phases["pipeline"] > 0.0
    assert "where a step went (first worker, median per step): pipeline" in text


@pytest.mark.timeout(400)
def test_two_runs_side_by_side_attribute_the_difference(
    tmp_path: Path, corpus: Path, two_worker_runs: dict[str, Any]
) -> None:
    from layerwise.job.compare import PARTS, compare, render_comparison

    a = two_worker_runs["1f1b m=4"]  # the same model, batch and 1F1B with 4 micro-batches
    b = run_workers(w.one_run, 4, str(tmp_path / "p4"), str(corpus), timeout_s=200)[0]
    report = compare(Path(a), Path(b))
    for run in report["runs"]:  # each run's parts add up to its measured median step
        assert sum(run["parts_s"].values()) == pytest.approx(run["step_s"], rel=1e-9)
    parts = report["attribution_per_token_s"]
    assert set(parts) == set(PARTS)
    assert sum(parts.values()) == pytest.approx(report["difference_per_token_s"], rel=1e-9)
    # four workers fill and drain a longer pipeline: a larger share of the simulated pipeline
    # (not of the measured step, which moves with how long the workers wait for the 2 cores)
    bubbles = [r["parts_s"]["bubble"] / _simulated_pipeline(r["parts_s"]) for r in report["runs"]]
    assert bubbles[1] > bubbles[0] > 0
    text = render_comparison(report)
    assert "measured difference" in text and "4 workers 1f1b m=4" in text
    assert main(["diagnose", a, b]) == 0


def _simulated_pipeline(parts: dict[str, float]) -> float:
    return sum(parts[k] for k in ("compute", "recomputation", "bubble", "stage imbalance"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerwise", *args]


def test_failure_summary_names_the_killed_worker() -> None:
    text = describe_failures({0: 1, 1: -15, 2: -9, 3: 1})
    assert text.startswith(
        "layerwise: lost worker 2: worker 2 was killed by SIGKILL; worker 0 exited"
    )
    assert "worker 1 stopped by the launcher" in text
    assert describe_failures({1: 3}).startswith(
        "layerwise: worker 1 failed: worker 1 exited with code 3"
    )
