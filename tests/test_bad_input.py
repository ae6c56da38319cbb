"""Bad input to every subcommand fails at the door with one line that says what is wrong and
what to do; no worker process is ever started here."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import layerwise.cli.generate
import layerwise.cli.train
import layerwise.job.supervisor
from layerwise.cli import main
from layerwise.job.config import TrainConfig
from layerwise.job.sampling import prompt_bytes, prompt_tokens
from layerwise.planner.specs import ClusterSpec, ModelSpec, PlanError, TrainSpec, gpu_preset
from layerwise.schedules import generate
from layerwise.simulate import Costs, simulate


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 2) -> str:
    """Run ``layerwise argv``; check it returns ``code`` with one error line; return it."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"layerwise {argv[0]}: error: ") and "\n" not in err, err
    return err


@pytest.fixture(autouse=True)
def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting workers an error: every case here must fail before that."""

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("workers would start")

    monkeypatch.setattr(layerwise.job.supervisor, "launch", refuse)
    monkeypatch.setattr(layerwise.cli.generate, "relaunch", refuse)
    for name in ("LOCAL_RANK", "WORLD_SIZE"):  # not a torchrun worker
        monkeypatch.delenv(name, raising=False)


def write_run(run_dir: Path, metrics: list[dict[str, Any]], **config: Any) -> Path:
    """Write a fake run directory: config.json and metrics.jsonl lines; return it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(run_dir=str(run_dir), **config)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return run_dir


# -- simulate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ("--compare --workers 0", "--workers must be at least 1, got 0"),
        ("--workers -1", "--workers must be at least 1, got -1"),
        ("--microbatches 0", "--microbatches must be at least 1, got 0"),
        ("--fwd 0", "--fwd 0: a stage's compute time must be a positive number"),
        ("--fwd -1", "--fwd -1: a stage's compute time must be a positive number"),
        ("--bwd 0", "--bwd 0: a stage's compute time must be a positive number"),
        ("--bwd -2", "--bwd -2: a stage's compute time must be a positive number"),
        ("--fwd nan", "--fwd nan: a stage's compute time must be a positive number"),
        ("--comm -1", "--comm -1: the send time must be 0 or more"),
        ("--width 5", "--width 5 is too narrow to draw a chart; use at least 20"),
        ("--schedule zb-h1 --wgrad 5 --bwd 2", "--wgrad 5: the weight-gradient part of the "
         "backward must be more than 0 and less than --bwd 2"),
        ("--schedule zb-h1 --wgrad 0", "must be more than 0 and less than --bwd 2"),
        ("--schedule zb-h1 --wgrad 2", "must be more than 0 and less than --bwd 2"),
    ],
)  # fmt: skip
def test_simulate_rejects_sizes_and_times(
    flags: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert words in fails(["simulate", *flags.split()], capsys)


def test_simulate_valid_wgrad_still_draws(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--schedule", "zb-h1", "--wgrad", "0.5", "--bwd", "2"]) == 0
    assert "zb-h1: 4 workers" in capsys.readouterr().out


def test_schedule_file_title_and_metrics_use_the_files_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two = tmp_path / "two.txt"
    two.write_text("worker 0: 0F0 0F1 0B0 0B1\nworker 1: 1F0 1B0 1F1 1B1\n")
    assert main(["simulate", "--schedule-file", str(two)]) == 0  # --workers left at 4
    out = capsys.readouterr().out
    assert "custom: 2 workers, 2 micro-batches" in out and "4 workers" not in out
    assert "peak in-flight activations per worker: 2 1\n" in out
    assert main(["simulate", "--schedule-file", str(two), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics["workers"]) == 2 and metrics["ideal"] == 6.0


def test_schedule_file_that_is_binary_missing_or_broken_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    err = fails(["simulate", "--schedule-file", str(binary)], capsys)
    assert str(binary) in err and "is not a schedule text/CSV file" in err
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"worker 0: 0F0\x00 0B0\n")  # valid UTF-8, but NUL marks a binary file
    assert "is not a schedule text/CSV file" in fails(["simulate", "--schedule-file", str(nul)],
                                                      capsys)  # fmt: skip
    missing = tmp_path / "nope.txt"
    err = fails(["simulate", "--schedule-file", str(missing)], capsys)
    assert str(missing) in err and "does not exist" in err
    err = fails(["simulate", "--schedule-file", str(tmp_path)], capsys)
    assert str(tmp_path) in err and "is a directory" in err


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("bad.txt", "worker 0: 0F0 0B0\nworker 1: 1F0 X 1B0\n",
         "line 2: worker 1, position 1: cannot parse action 'X'"),
        ("bad.txt", "# microbatches=two\nworker 0: 0F0 0B0\n",
         "line 1: microbatches must be a whole number, got 'two'"),
        ("bad.txt", "worker zero: 0F0 0B0\n",
         "line 1: the worker number must be a whole number, got 'zero'"),
        ("bad.txt", "worker 0: 0F0 0B0\nworker 0: 0F1 0B1\n",
         "line 2: worker 0 already has a row (line 1)"),
        ("bad.txt", "worker 0: 0F0 0B0\nhello\n", "line 2: expected 'worker N: 0F0 0F1 ...'"),
        ("bad.csv", "0F0,0B0\n1F0,oops\n", "line 2: worker 1, position 1: cannot parse action"),
        ("empty.csv", "\n", "schedule is empty"),
    ],
)  # fmt: skip
def test_schedule_file_that_does_not_parse_names_file_and_line(
    name: str, content: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_text(content)
    err = fails(["simulate", "--schedule-file", str(path)], capsys)
    assert f"--schedule-file {str(path)!r}: " in err and words in err


# -- plan ----------------------------------------------------------------------------------

ARCH = "--layers 4 --hidden 64 --heads 4 --seq 128 --vocab 256 --gpus 8"
EVALUATE = f"evaluate {ARCH} --tp 1 --pp 2 --micro-batch 1"


@pytest.mark.parametrize("mode", ["search", "evaluate"])
@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("--layers 0", "ModelSpec.layers must be at least 1, got 0; set --layers to 1 or more"),
        ("--hidden 0", "ModelSpec.hidden must be at least 1, got 0; set --hidden"),
        ("--heads 0", "ModelSpec.heads must be at least 1, got 0; set --heads"),
        ("--seq 0", "ModelSpec.seq must be at least 1, got 0; set --seq"),
        ("--vocab 0", "ModelSpec.vocab must be at least 1, got 0; set --vocab"),
        ("--vocab -3", "ModelSpec.vocab must be at least 1, got -3"),
        ("--kv-heads -1", "ModelSpec.kv_heads must be 0 or more, got -1"),
        ("--kv-heads 3", "4 attention heads cannot be shared by 3 key/value heads"),
        ("--ffn -1", "ModelSpec.ffn must be 0 or more, got -1"),
        ("--gpus 0", "--gpus must be at least 1, got 0"),
        ("--gpus-per-node 0", "a cluster needs at least one node of at least one GPU"),
        ("--global-batch 0", "TrainSpec.global_batch must be at least 1, got 0; set "
         "--global-batch"),
        ("--peak-tflops 0", "GPUSpec.peak_tflops must be a positive number, got 0.0"),
        ("--matmul-efficiency 0", "Calibration.matmul_efficiency must be a positive number"),
        ("--tp 0", "--tp must be at least 1, got 0"),
        ("--pp 0", "--pp must be at least 1, got 0"),
        ("--micro-batch 0", "--micro-batch must be at least 1, got 0"),
        ("--dp 0", "--dp must be at least 1, got 0"),
        ("--vpp 0", "--vpp must be at least 1, got 0"),
        ("--zero 7", "--zero must be 0, 1, 2 or 3, got 7"),
        ("--top 0", "--top must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_plan_rejects_sizes_below_one(
    mode: str, flag: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = EVALUATE if mode == "evaluate" else ARCH
    err = fails(["plan", *base.split(), *flag.split()], capsys, code=1)
    assert words in err


def test_plan_preset_with_no_layers_and_local_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert "ModelSpec.layers must be at least 1" in fails(
        ["plan", "--model", "gpt3-175b", "--layers", "0"], capsys, code=1
    )
    # --local checks its sizes through the same specs before it measures anything
    assert "ModelSpec.layers must be at least 1" in fails(
        ["plan", "--local", "--layers", "0"], capsys, code=1
    )
    assert "TrainSpec.global_batch must be at least 1" in fails(
        ["plan", "--local", "--global-batch", "0"], capsys, code=1
    )
    assert "--workers must be at least 1" in fails(
        ["plan", "--local", "--workers", "0"], capsys, code=1
    )


def test_specs_check_their_own_fields() -> None:
    with pytest.raises(PlanError, match=re.escape("ModelSpec.layers must be at least 1")):
        ModelSpec("m", layers=0, hidden=8, heads=2, seq=4, vocab=16)
    with pytest.raises(PlanError, match=re.escape("TrainSpec.global_batch must be at least 1")):
        TrainSpec(global_batch=0)
    with pytest.raises(PlanError, match="precision must be one of"):
        TrainSpec(global_batch=8, precision="fp8")
    with pytest.raises(PlanError, match="a cluster needs at least one node"):
        ClusterSpec(gpu_preset("a100-80gb"), 8, 0)
    with pytest.raises(PlanError, match=re.escape("GPUSpec.memory_gib must be a positive number")):
        dataclasses.replace(gpu_preset("a100-80gb"), memory_gib=float("nan"))


# -- generate ------------------------------------------------------------------------------


def saved_run(tmp_path: Path) -> Path:
    """A fake run with a checkpoint pointer, so that only the flags can be wrong."""
    run = write_run(tmp_path / "run", [])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.json").write_text('{"step": 10, "path": "step_0000010"}')
    (run / "checkpoints" / "step_0000010").mkdir()
    return run


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--prompt", ""], "the prompt is empty; give at least one character"),
        (["--tokens", "-1"], "--tokens must be 0 or more, got -1"),
        (["--temperature", "-0.5"], "--temperature must be 0 (always the likeliest byte) or more"),
        (["--temperature", "nan"], "--temperature must be 0"),
        (["--top-k", "-1"], "--top-k must be 0 (no cut) or more, got -1"),
    ],
)
def test_generate_rejects_flags(
    flags: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert words in fails(["generate", str(saved_run(tmp_path)), *flags], capsys)


def test_generate_needs_a_run_with_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(["generate", str(tmp_path)], capsys)
    assert f"{tmp_path} holds no run" in err and "config.json is missing" in err
    run = write_run(tmp_path / "young", [])
    err = fails(["generate", str(run)], capsys)
    assert "has no checkpoint yet" in err and f"layerwise train --resume {run}" in err


def test_generate_takes_a_non_utf8_prompt_as_raw_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # argv holds the byte 0xff as the surrogate escape U+DCFF
    assert prompt_bytes("\udcff") == b"\xff"
    assert prompt_tokens("a\udcffb").tolist() == [[97, 255, 98]]
    assert prompt_tokens("é").tolist() == [[195, 169]]
    with pytest.raises(ValueError, match="the prompt is empty"):
        prompt_tokens("")
    launched: list[list[str]] = []

    def launch(nproc: int, argv: list[str]) -> int:
        launched.append(argv)
        return 0

    monkeypatch.setattr(layerwise.cli.generate, "relaunch", launch)
    assert main(["generate", str(saved_run(tmp_path)), "--prompt", "\udcff", "--tokens", "3"]) == 0
    assert "--prompt=\udcff" in launched[0]


# -- diagnose ------------------------------------------------------------------------------


def killed_run(tmp_path: Path) -> Path:
    """A run of 300 steps killed after step 40, with one non-finite step and one spike."""
    records: list[dict[str, Any]] = []
    for step in range(40):
        record: dict[str, Any] = {"step": step, "loss": 5.0 - 0.05 * step, "grad_norm": 1.0}
        if (step + 1) % 10 == 0:
            record["val_loss"] = 4.0 - 0.01 * step
        records.append(record)
    records[12]["skipped"] = "non-finite loss (nan) or gradient norm (1.0)"
    records[20]["spike"] = "loss 9.000 is 3.0 x the recent median"
    run = write_run(tmp_path / "run", records, steps=300, eval_interval=10, save_interval=20)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "lo')  # the line being written when the run was killed
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.json").write_text('{"step": 40, "path": "step_0000040"}')
    (run / "checkpoints" / "step_0000040").mkdir()
    return run


def test_diagnose_reports_what_an_unfinished_run_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = killed_run(tmp_path)
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert "not finished, 40 of 300 steps done" in out
    assert "last losses: step 35: 3.250" in out and "step 39: 3.050" in out
    assert "validation losses: step 9: 3.910, step 19: 3.810" in out
    assert "non-finite steps: [12]; loss spikes: [20]" in out
    assert "1 line(s) of metrics.jsonl could not be read" in out
    assert "timeline.json" in out and "written when a run finishes" in out
    assert f"layerwise train --resume {run}" in out and "saved after 40 steps" in out
    assert main(["diagnose", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["finished"] is False
    assert (report["steps_done"], report["steps_total"], report["checkpoint_step"]) == (40, 300, 40)
    assert [r["step"] for r in report["val_losses"]] == [9, 19, 29, 39]
    assert report["nonfinite_steps"] == [12] and report["loss_spikes"][0]["step"] == 20


def test_diagnose_of_a_run_killed_before_its_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", [], steps=300, save_interval=100)
    (run / "metrics.jsonl").unlink()
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert "0 of 300 steps done" in out and "last losses: none yet" in out
    assert "no checkpoint was saved yet (one every --save-interval 100 steps)" in out


def test_diagnose_of_a_finished_run_still_reads_its_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", [{"step": s, "loss": 3.0, "step_time": 0.1}
                                       for s in range(3)], steps=3)  # fmt: skip
    timeline = simulate(generate("1f1b", 4, 8), Costs.uniform(4, 1.0, 2.0)).to_json()
    (run / "timeline.json").write_text(json.dumps({"measured": timeline, "simulated": timeline}))
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert "4 workers, 1f1b, 8 micro-batches, 3 steps, final loss 3.000" in out
    assert "not finished" not in out


def test_diagnose_of_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(["diagnose", str(tmp_path)], capsys)
    assert f"{tmp_path} is not a run directory: it has no config.json" in err
    err = fails(["diagnose", str(tmp_path / "nope")], capsys)
    assert "is not a run directory: it does not exist" in err


# -- train (checked before any worker starts) ----------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ("--save-interval 0", "--save-interval must be at least 1, got 0"),
        ("--eval-interval 0", "--eval-interval must be at least 1, got 0"),
        ("--steps 0", "--steps must be at least 1, got 0"),
        ("--dp 3 --batch-size 8", "--batch-size 8 cannot be shared evenly by --dp 3 replicas; "
         "use a multiple of 3"),
        ("--balance 1,a", "--balance '1,a': give a mode"),
        ("--balance 1,1", "--balance '1,1' gives 2 layers but the model has 6 (the blocks plus "
         "the embedding and the head)"),
        ("--workers 99 --layers 2", "needs 99 stages of at least one layer, but the model has 4 "
         "layers (the count includes the embedding and the head); use at most 4 workers"),
        ("--schedule interleaved-1f1b --microbatches 6", "--schedule interleaved-1f1b: "
         "interleaved-1f1b needs the number of micro-batches to be a multiple of the number of "
         "workers"),
        ("--chunks 2", "--chunks 2: schedule '1f1b' runs one stage per worker; chunks must be 1, "
         "got 2; leave --chunks out, or use a schedule with several stages per worker: "),
    ],
)  # fmt: skip
def test_train_rejects_flags(
    flags: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert words in fails(["train", *flags.split(), "--run-dir", str(run)], capsys)
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_on_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["train", "--device", "cuda", "--run-dir", str(tmp_path / "run")], capsys)
    assert "--device cuda: this machine has no usable GPU; use --device cpu" in err


def test_train_run_dir_that_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    err = fails(["train", "--run-dir", str(a_file / "run")], capsys)
    assert f"cannot write the run directory {str(a_file / 'run')!r}" in err
    assert "choose a writable --run-dir" in err


def test_train_data_that_is_binary_or_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"text then \x00\x01\x02")
    run = str(tmp_path / "run")
    err = fails(["train", "--data", str(binary), "--run-dir", run], capsys)
    assert f"--data {str(binary)!r} is neither text (it holds NUL bytes) nor .jsonl" in err
    missing = tmp_path / "nope.txt"
    err = fails(["train", "--data", str(missing), "--run-dir", run], capsys)
    assert f"--data {str(missing)!r} does not exist; give a file or a folder" in err


def test_train_resume_of_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(["train", "--resume", str(tmp_path)], capsys)
    assert f"{tmp_path} holds no run: {tmp_path / 'config.json'} is missing" in err
    assert "give a directory that 'layerwise train' wrote" in err


def test_train_resume_needs_a_checkpoint_and_the_same_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", [])
    err = fails(["train", "--resume", str(run)], capsys)
    assert f"cannot resume {run}: it has no checkpoint" in err
    (run / "checkpoints" / "step_0000010.tmp").mkdir(parents=True)  # a save cut short
    assert "it has no checkpoint" in fails(["train", "--resume", str(run)], capsys)
    (run / "checkpoints" / "step_0000010").mkdir()
    err = fails(["train", "--resume", str(run), "--heads", "8", "--layers", "6"], capsys)
    assert (
        "the model's architecture differs (layers 4 saved, 6 given, heads 4 saved, 8 given)" in err
    )
    # a layout change is allowed, and said; then the workers would start
    with pytest.raises(AssertionError, match="workers would start"):
        main(["train", "--resume", str(run), "--workers", "2", "--dp", "2", "--zero", "1"])
    out = capsys.readouterr().out
    assert "saved as dp1 pp4 tp1 1f1b m=8, on dp2 pp2 tp1 zero1 1f1b m=8" in out


def test_train_flags_of_a_job_that_heals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--run-dir", str(tmp_path / "r"), "--steps", "2"]
    assert "--max-restarts must be 0 (never restart) or more, got -1" in fails(
        [*base, "--max-restarts", "-1"], capsys
    )
    err = fails([*base, "--on-save-error", "ignore"], capsys)
    assert "--on-save-error must be one of stop | continue, got 'ignore'" in err
    err = fails([*base, "--recover-from", "disk"], capsys)
    assert "--recover-from must be one of replica | checkpoint, got 'disk'" in err
