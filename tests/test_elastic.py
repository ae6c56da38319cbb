"""Checkpoints free of layout, checked on load; a job that heals itself; clean stops."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import _elastic_workers as ew
from _nodes import tiny_model
from layerwise.job import checkpoints as ckpt
from layerwise.job.ckpt_files import newest_good, verify
from layerwise.job.config import TrainConfig
from layerwise.job.launcher import EXIT_PEER_LOST, Outcome, run_workers
from layerwise.job.supervisor import refit

CORPUS = "".join(f"def g{i}(y):\n    return y - {i} * {i % 5}\n" for i in range(400))


def records(run_dir: str | Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = Path(run_dir, name)
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in a run's newest checkpoint, read without any process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newest = newest_good(run_dir / "checkpoints").path
    assert newest is not None
    dcp_to_torch_save(newest, run_dir / "final.pt")
    return dict(torch.load(run_dir / "final.pt")["model"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.py"
    path.write_text(CORPUS)
    return path


@pytest.mark.timeout(420)
def test_a_run_resumes_on_another_layout_step_for_step(tmp_path: Path, corpus: Path) -> None:
    four = run_workers(ew.four_workers, 4, str(tmp_path), str(corpus), timeout_s=300)[0]
    two = run_workers(ew.two_workers, 2, str(tmp_path), str(corpus), timeout_s=300)[0]
    whole = losses(four["pp4"])
    assert sorted(whole) == [0, 1, 2, 3]
    # the two layouts agree to rounding, and so does every resumed run, step for step
    assert losses(four["dp2pp2"]) == pytest.approx(whole, rel=1e-5)
    for name, source in (("dp2pp2-on-pp4", "dp2pp2"), ("pp4-on-dp2pp2", "pp4")):
        assert losses(four[name]) == pytest.approx(losses(four[source]), rel=1e-5), name
    assert losses(two["pp4-on-pp2"]) == pytest.approx(whole, rel=1e-5)
    # the redone steps' first lines were kept, not dropped; the guard's statistics came along
    replaced = records(four["pp4-on-dp2pp2"], "metrics.replaced.jsonl")
    assert [r["step"] for r in replaced] == [2, 3]
    job = torch.load(Path(four["pp4"], "checkpoints", "step_0000004", "job.pt"))
    ema = whole[0]
    for step in (1, 2, 3):  # the guard's running mean of the loss, as StepGuard keeps it
        ema = 0.9 * ema + 0.1 * whole[step]
    assert job["step"] == 4 and job["guard"]["ema"] == pytest.approx(ema, rel=1e-5)
    # and the weights a resumed run ends with are the uninterrupted run's (to rounding)
    for name, source in (("dp2pp2-on-pp4", "dp2pp2"), ("pp4-on-dp2pp2", "pp4"),
                         ("pp4-on-pp2", "pp4")):  # fmt: skip
        ours, theirs = (final_weights(Path(tmp_path, n)) for n in (name, source))
        assert ours.keys() == theirs.keys()
        for key, tensor in ours.items():
            torch.testing.assert_close(tensor, theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    # a full disk: one line, the last good checkpoint kept; then go on or stop, as chosen
    went_on = two["full-continue"]
    assert "no space left on device" in went_on["unsaved"]
    assert went_on["step"] == 3
    saved = [p.name for p in Path(tmp_path, "full-continue", "checkpoints").iterdir()]
    assert sorted(saved) == ["latest.json", "step_0000002"]
    assert two["full-stop"].startswith("checkpoint of step 4 not saved")
    assert "no space left on device" in two["full-stop"]
    assert newest_good(Path(tmp_path, "full-stop", "checkpoints")).step == 2


def _saved(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        ckpt.save(folder, step, model, opt, {"step": step, "guard": {}}, {"rng": None}, {})
    return folder, model, opt


@pytest.mark.timeout(60)
def test_damaged_checkpoints_are_found_and_the_one_before_is_used(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    assert newest_good(folder).step == 4 and verify(folder / "step_0000004") is None
    data = folder / "step_0000004" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[200:240] = torch.full((10,), 7.5).numpy().tobytes()  # ten floats overwritten in place
    data.write_bytes(bytes(raw))
    choice = newest_good(folder)
    assert choice.step == 2 and len(choice.rejected) == 1
    assert "__0_0.distcp changed after it was written" in choice.rejected[0]
    data.write_bytes(bytes(raw[:-100]))  # truncated
    assert "__0_0.distcp is truncated" in newest_good(folder).rejected[0]
    (folder / "step_0000004" / "manifest.json").unlink()  # a save cut short
    assert "did not finish" in newest_good(folder).rejected[0]
    shutil.rmtree(folder / "step_0000002")
    assert newest_good(folder).path is None
    # a model of another architecture is refused, naming the tensor that differs
    folder, _, _ = _saved(tmp_path / "again")
    wider = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"0.weight is \[8, 8\] there and \[16, 8\] here"):
        ckpt.load(folder / "step_0000004", wider, None)


@pytest.mark.timeout(60)
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, model, opt = _saved(tmp_path)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", full)
    with pytest.raises(ckpt.SaveError, match=r"step 6 not saved .*no space left on device"):
        ckpt.save(folder, 6, model, opt, {"step": 6, "guard": {}}, {"rng": None}, {})
    assert sorted(p.name for p in folder.iterdir()) == [
        "latest.json",
        "step_0000002",
        "step_0000004",
    ]


def test_fewer_workers_give_the_widest_layout_that_runs() -> None:
    cfg = TrainConfig(workers=4, dp=2, layers=4, batch_size=8, microbatches=4)
    assert refit(cfg, 8) is cfg
    seven = refit(cfg, 7)
    assert seven is not None and (seven.dp, seven.workers) == (1, 6)  # 6 layers: pp <= 6
    three = refit(cfg, 3)
    assert three is not None and (three.dp, three.workers, three.zero) == (1, 3, 0)
    assert refit(TrainConfig(workers=2, tp=2, heads=4), 1) is None  # tp 2 needs two


def test_only_a_lost_worker_is_worth_a_restart() -> None:
    assert Outcome({1: -9, 0: -15}).lost_worker  # killed by someone else
    assert Outcome({0: EXIT_PEER_LOST, 1: -15}).lost_worker  # a peer hung or vanished
    assert not Outcome({0: 1, 1: -15}).lost_worker  # an error: a restart would repeat it
    assert not Outcome({0: -15}).lost_worker and Outcome().ok


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerwise", *args]


def _workers(launcher: int) -> dict[int, int]:
    """The job's workers: rank -> pid (children of the launcher)."""
    children = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True)
    ranks = {}
    for pid in children.stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=")[1] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    return ranks


def _wait_for_step(
    run_dir: Path, step: int, proc: subprocess.Popen[str], limit: float = 120
) -> None:
    """Wait until this job (not one before it in the directory) has logged ``step``."""
    since, deadline = time.time(), time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in records(run_dir) if r.get("time", 0) >= since and "loss" in r]
        if max(steps, default=-1) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never came (exit {proc.poll()})")


def _start(run_dir: Path, corpus: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _cli(
            "train",
            "--run-dir",
            str(run_dir),
            *tiny_model(str(corpus)),
            "--steps",
            "60",
            "--save-interval",
            "10",
            "--eval-interval",
            "100",
            *flags,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a job
    )


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in records(run_dir) if r.get("event") == kind]


def _lost_workers_are_gone(workers: dict[int, int]) -> list[int]:
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers.values()):
        time.sleep(0.2)
    return [r for r, p in workers.items() if Path(f"/proc/{p}/stat").exists()
            and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]  # fmt: skip


@pytest.mark.timeout(300)
def test_a_pipeline_heals_itself_then_stops_cleanly(tmp_path: Path, corpus: Path) -> None:
    run_dir = tmp_path / "pp2"
    proc = _start(run_dir, corpus, "--workers", "2", "--steps", "400", "--timeout", "5")
    try:
        _wait_for_step(run_dir, 12, proc)
        second = subprocess.run(_cli("train", "--resume", str(run_dir)), capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert second.returncode == 2 and "in use by a live job" in second.stderr
        # a worker killed: the job restarts from its newest checkpoint by itself
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        while not _events(run_dir, "recovered") and proc.poll() is None:
            time.sleep(0.1)
        _wait_for_step(run_dir, _events(run_dir, "worker_lost")[0]["last_step"] + 1, proc)
        # Ctrl-C (SIGINT to the whole group) ends it, in one line
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.time()
        out, _ = proc.communicate(timeout=30)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and took < 10, (took, out[-2000:])
    assert "worker 1 killed by SIGKILL; restarting from the newest checkpoint" in out
    assert "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("layerwise: interrupted; every worker stopped")
    lost, recovered = _events(run_dir, "worker_lost"), _events(run_dir, "recovered")
    assert lost[0]["workers"] == [1] and lost[0]["how"] == "killed by SIGKILL"
    assert recovered[0]["recovery_s"] > 0
    # every step redone from a checkpoint repeats the lost run's loss exactly
    first = {r["step"]: r["loss"] for r in records(run_dir, "metrics.replaced.jsonl")}
    assert len(first) == recovered[0]["steps_redone"]
    assert all(losses(run_dir)[s] == loss for s, loss in first.items())
    # the directory resumes; a launcher killed as the OOM killer would takes its workers along
    proc = subprocess.Popen(
        _cli("train", "--resume", str(run_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_step(run_dir, max(losses(run_dir)) + 5, proc)
        workers = _workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert not (alive := _lost_workers_are_gone(workers)), f"{alive} outlived the launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert newest_good(run_dir / "checkpoints").step >= 20


@pytest.mark.timeout(300)
def test_replicas_heal_a_killed_and_a_hung_worker_in_memory(tmp_path: Path, corpus: Path) -> None:
    run_dir, layout = tmp_path / "dp2", ["--workers", "1", "--dp", "2", "--steps", "40"]
    proc = _start(run_dir, corpus, *layout, "--timeout", "5")
    try:
        _wait_for_step(run_dir, 8, proc)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        _wait_for_step(run_dir, 20, proc)
        os.kill(_workers(proc.pid)[0], signal.SIGSTOP)
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert sorted(losses(run_dir)) == list(range(40))
    lost, recovered = _events(run_dir, "worker_lost"), _events(run_dir, "recovered")
    assert [e["workers"] for e in lost] == [[1], [0]], lost
    assert lost[0]["how"] == "killed by SIGKILL" and "stopped answering" in lost[1]["how"]
    assert "takes its state from a surviving replica" in out
    # only the step in flight is redone: no logged step, nothing replaced
    assert [e["steps_redone"] for e in recovered] == [0, 0]
    assert all(e["recovery_s"] > 0 for e in recovered)
    assert not (run_dir / "metrics.replaced.jsonl").exists()
    from layerwise.job.diagnose import diagnose

    said = [f["what"] for f in diagnose(run_dir)["failures"]]
    assert len(said) == 2 and said[0].startswith("1 (killed by SIGKILL) after step")
    assert all("0 logged step(s) redone, from a surviving replica" in w for w in said)
    # and the healed run ends with the weights of an uninterrupted one
    whole = _start(tmp_path / "whole", corpus, *layout)
    whole.communicate(timeout=200)
    assert whole.returncode == 0
    ours, theirs = final_weights(run_dir), final_weights(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[key], rtol=1e-6, atol=1e-7, msg=key)


def test_the_supervisor_restarts_lost_workers_only_and_gives_up_after_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from layerwise.job import supervisor

    starts: list[list[str]] = []
    outcomes = [Outcome({1: -9, 0: EXIT_PEER_LOST})] * 3 + [Outcome()]

    def fake_launch(nproc: int, argv: list[str]) -> Outcome:
        starts.append(argv)
        return outcomes[len(starts) - 1]

    monkeypatch.setattr(supervisor, "launch", fake_launch)
    cfg = TrainConfig(workers=2, max_restarts=2, run_dir=str(tmp_path))
    assert supervisor.supervise(cfg, resume=False) == 1  # two restarts, then the third loss
    err = capsys.readouterr().err
    assert "gave up after 2 restart(s) (--max-restarts 2)" in err
    assert (
        starts == [["train", str(tmp_path)]] + [["train", str(tmp_path), "--resume", "if-any"]] * 2
    )
    lost = [r for r in records(tmp_path) if r.get("event") == "worker_lost"]
    assert [e["restart"] for e in lost] == [1, 2] and lost[0]["workers"] == [1]
    starts.clear()
    outcomes[:] = [Outcome({0: 1, 1: -15})]  # an error in the code: not restarted
    assert supervisor.supervise(cfg, resume=True) == 1 and len(starts) == 1
    assert starts[0][-2:] == ["--resume", "required"]
    starts.clear()
    outcomes[:] = [Outcome(interrupted=True)]
    # a lost peer noted by the job before this one is not read as a loss of this one
    (tmp_path / supervisor.PEER_NOTES).mkdir(exist_ok=True)
    (tmp_path / supervisor.PEER_NOTES / "rank0").write_text('{"peer": 1, "timed_out": true}')
    assert supervisor.supervise(cfg, resume=True) == 130
    assert not list((tmp_path / supervisor.PEER_NOTES).iterdir())
