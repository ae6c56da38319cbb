"""Sub-commands that run on worker processes: ``train``, ``generate``; and ``diagnose``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from layerwise.launcher import relaunch, under_torchrun
from layerwise.parallel.mesh import check_layout, describe_mesh

_FLAGS: dict[str, tuple[type, str]] = {
    "workers": (int, "pipeline workers, one or more stages each (the pp degree; same as --pp)"),
    "dp": (int, "data-parallel replicas of the pipeline"),
    "tp": (int, "tensor-parallel workers per stage (split heads and MLP)"),
    "zero": (int, "1: shard optimizer state across the data-parallel replicas (ZeRO-1)"),
    "schedule": (str, "naive | gpipe | 1f1b | interleaved-1f1b | zb-h1"),
    "microbatches": (int, "micro-batches per step"),
    "chunks": (int, "stages per worker for interleaved-1f1b"),
    "balance": (str, "uniform | params | time | memory | sizes such as 2,2,1,1"),
    "checkpoint": (str, "activation checkpointing: never | always | except_last"),
    "precision": (str, "fp32 | bf16"),
    "layers": (int, "transformer blocks"),
    "d_model": (int, "model width"),
    "heads": (int, "attention heads"),
    "seq_len": (int, "tokens per sequence"),
    "batch_size": (int, "sequences per step"),
    "steps": (int, "total steps of the run (also after --resume)"),
    "lr": (float, "peak learning rate"),
    "seed": (int, "seed for weights and batches"),
    "device": (str, "cpu | cuda"),
    "data": (str, "text file or folder (default: this Python's standard library source)"),
    "eval_interval": (int, "steps between validation losses"),
    "save_interval": (int, "steps between checkpoints"),
    "timeout": (float, "seconds any worker waits for a peer before failing"),
}


def add_parsers(sub: Any) -> None:
    """Register train, generate and diagnose on the ``layerwise`` command."""
    from layerwise.train import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a GPT decoder split layer-wise over workers",
        description="Train a transformer decoder layer-wise across worker processes.",
    )
    for name, (kind, text) in _FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"{text} (default: {default})",
        )
    p.add_argument("--pp", dest="workers", type=int, help="pipeline degree (same as --workers)")
    p.add_argument(
        "--tie-embeddings",
        action="store_true",
        default=None,
        help="share the token embedding with the output head",
    )
    p.add_argument("--run-dir", help="where the run is written (default: runs/<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.set_defaults(func=run_train)

    g = sub.add_parser("generate", help="sample text from a trained run through its pipeline")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_generate)

    d = sub.add_parser("diagnose", help="explain where a finished run's time went")
    d.add_argument("run_dir")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run_diagnose)


def _config_from_args(args: argparse.Namespace) -> tuple[Any, bool]:
    from layerwise.train import TrainConfig

    given = {
        k: getattr(args, k) for k in [*_FLAGS, "tie_embeddings"] if getattr(args, k) is not None
    }
    if args.resume:
        run_dir = Path(args.resume)
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = TrainConfig(**saved)
        changed = {k: v for k, v in given.items() if k in cfg.layout() and cfg.layout()[k] != v}
        if changed:
            raise ValueError(
                f"cannot resume {run_dir} with a different layout: {changed} vs saved "
                f"{ {k: cfg.layout()[k] for k in changed} }; resume on the same layout"
            )
        return dataclasses.replace(cfg, **given, run_dir=str(run_dir)), True
    cfg = TrainConfig(**given)
    gpt = cfg.gpt()  # bad sizes fail here, before any process starts
    check_layout(
        cfg.parallel_layout(), None, gpt.n_heads, gpt.d_model, gpt.ff_dim, gpt.num_layers_total
    )
    cfg.run_dir = args.run_dir or cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    return cfg, False


def run_train(args: argparse.Namespace) -> int:
    from layerwise.train import main_worker

    cfg, resume = _config_from_args(args)
    run_dir = Path(cfg.run_dir)
    if not under_torchrun():
        if not resume and (run_dir / "metrics.jsonl").exists():
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume {run_dir} or another --run-dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        layout = cfg.parallel_layout()
        print(
            f"layerwise train: {layout}, schedule {cfg.schedule}, "
            f"{cfg.microbatches} micro-batches; run directory {run_dir}",
            flush=True,
        )
        if layout.world > layout.pp:
            print(describe_mesh(layout), flush=True)
        # workers read everything from config.json: one source of truth for every rank
        return relaunch(cfg.parallel_layout().world, ["train", "--resume", str(run_dir)])
    if not args.run_dir and not resume:  # every rank must agree on the directory
        cfg.run_dir = f"runs/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    fresh = not resume or not (run_dir / "checkpoints" / "latest.json").exists()
    return main_worker(cfg, resume=not fresh)


def run_generate(args: argparse.Namespace) -> int:
    from layerwise.sample import main_worker

    cfg = json.loads((Path(args.run_dir) / "config.json").read_text())
    if not under_torchrun():
        argv = [
            "generate",
            args.run_dir,
            "--prompt",
            args.prompt,
            "--tokens",
            str(args.tokens),
            "--temperature",
            str(args.temperature),
            "--top-k",
            str(args.top_k),
            "--seed",
            str(args.seed),
        ]
        return relaunch(int(cfg["workers"]), argv)
    return main_worker(args)


def run_diagnose(args: argparse.Namespace) -> int:
    from layerwise.diagnose import diagnose, render

    report = diagnose(Path(args.run_dir))
    print(json.dumps(report) if args.json else render(report))
    return 0
