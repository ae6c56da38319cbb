"""``layerwise generate``: sample text from a trained run through its pipeline."""

from __future__ import annotations

import argparse
from typing import Any

from layerwise.job.launcher import relaunch, under_torchrun


def add_parser(sub: Any) -> None:
    """Register ``generate`` on the ``layerwise`` command."""
    g = sub.add_parser("generate", help="sample text from a trained run through its pipeline")
    add_sampling_flags(g)
    g.set_defaults(func=run)


def add_sampling_flags(g: argparse.ArgumentParser) -> None:
    """The flags of ``generate``, shared with the workers' internal entry."""
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Sample on this process's workers: under torchrun this is one; otherwise start them."""
    from layerwise.job.config import load_config
    from layerwise.job.sampling import sampling_worker

    if under_torchrun():
        return sampling_worker(args)
    cfg = load_config(args.run_dir)
    argv = ["generate", args.run_dir, "--prompt", args.prompt, "--tokens", str(args.tokens),
            "--temperature", str(args.temperature), "--top-k", str(args.top_k),
            "--seed", str(args.seed)]  # fmt: skip
    return relaunch(cfg.workers, argv)
