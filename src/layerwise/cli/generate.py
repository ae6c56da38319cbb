"""``layerwise generate``: sample text from a trained run through its pipeline."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from layerwise.job.launcher import relaunch, under_torchrun


def add_parser(sub: Any) -> None:
    """Register ``generate`` on the ``layerwise`` command."""
    g = sub.add_parser("generate", help="sample text from a trained run through its pipeline")
    add_sampling_flags(g)
    g.set_defaults(func=run)


def add_sampling_flags(g: argparse.ArgumentParser) -> None:
    """The flags of ``generate``, shared with the workers' internal entry."""
    g.add_argument("run_dir", help="a run directory, or a model directory to sample from")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--workers", type=int, help="pipeline workers (default: the run's; 1 for a model)"
    )


def check_sampling(args: argparse.Namespace) -> None:
    """Raise ValueError (FileNotFoundError for a missing run or checkpoint) saying what to
    give instead, before any worker starts."""
    from layerwise.job.sampling import prompt_bytes

    prompt_bytes(args.prompt)
    if args.tokens < 0:
        raise ValueError(f"--tokens must be 0 or more, got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(
            f"--temperature must be 0 (always the likeliest byte) or more, got {args.temperature}"
        )
    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (no cut) or more, got {args.top_k}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    _check_checkpoint(Path(args.run_dir))


def _check_checkpoint(run_dir: Path) -> None:
    """Raise FileNotFoundError unless ``run_dir`` holds a run with a saved checkpoint (or is
    a model directory)."""
    from layerwise.job.config import load_config
    from layerwise.job.sampling import sampling_config

    if not (run_dir / "checkpoints").exists() and (run_dir / "config.json").exists():
        import json

        if "model_type" in json.loads((run_dir / "config.json").read_text()):
            sampling_config(run_dir)  # a model directory: its architecture is checked
            return
    load_config(run_dir)  # names the directory if it holds no run
    from layerwise.job.ckpt_files import step_dirs

    if not step_dirs(run_dir / "checkpoints"):  # a folder gets its final name once complete
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint yet (one is saved every --save-interval steps and "
            f"at the end); train it further with 'layerwise train --resume {run_dir}'"
        )


def run(args: argparse.Namespace) -> int:
    """Sample on this process's workers: under torchrun this is one; otherwise start them."""
    from layerwise.job.sampling import sampling_config, sampling_worker

    check_sampling(args)
    if under_torchrun():
        return sampling_worker(args)
    cfg, _ = sampling_config(args.run_dir, args.workers)
    # '--prompt=' keeps a prompt that starts with '-' from reading as a flag
    argv = ["generate", args.run_dir, f"--prompt={args.prompt}", "--tokens", str(args.tokens),
            "--temperature", str(args.temperature), "--top-k", str(args.top_k),
            "--seed", str(args.seed), "--workers", str(cfg.workers)]  # fmt: skip
    return relaunch(cfg.workers, argv)
