"""``layerwise train``: check the flags, write the run's config, start the workers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from layerwise.cli.schedule_flags import schedule_options
from layerwise.job.checks import check_writable
from layerwise.job.launcher import under_torchrun
from layerwise.parallel.mesh import describe_mesh

FLAGS: dict[str, tuple[type, str]] = {
    "workers": (int, "pipeline workers, one or more stages each (the pp degree; same as --pp)"),
    "dp": (int, "data-parallel replicas of the pipeline"),
    "tp": (int, "tensor-parallel workers per stage (split heads and MLP)"),
    "zero": (int, "1: shard optimizer state across the data-parallel replicas (ZeRO-1)"),
    "schedule": (str, "pipeline schedule or an alias (see 'layerwise simulate --help')"),
    "microbatches": (int, "micro-batches per step"),
    "chunks": (int, "stages per worker; if unset, the schedule's own"),
    "memory_cap": (
        float,
        "for --schedule auto: most activations a worker may hold, in micro-batches through "
        "one whole stage (default: 1F1B's, the smaller of workers and micro-batches)",
    ),
    "balance": (str, "uniform | params | time | memory | sizes such as 2,2,1,1"),
    "recompute": (str, "activation recomputation: never | always | except_last"),
    "precision": (str, "fp32 | bf16"),
    "model": (
        str,
        "a model directory (save_pretrained, or layerwise export) whose weights, sizes and "
        "tokenizer start the run; or a family by name, with fresh weights: gpt, or a Hugging "
        "Face decoder (needs transformers) hf:gpt2 | hf:llama | hf:mistral | hf:qwen2 | "
        "hf:gemma2 | hf:phi3",
    ),
    "tokenizer": (
        str,
        "a Hugging Face tokenizer directory, local files only (default: the model "
        "directory's, else bytes)",
    ),
    "hf_config": (
        str,
        "for --model hf:*: a Hugging Face config.json (or save_pretrained "
        "directory) whose sizes replace --layers, --d-model and --heads",
    ),
    "layers": (int, "transformer blocks"),
    "d_model": (int, "model width"),
    "heads": (int, "attention heads"),
    "seq_len": (int, "tokens per sequence"),
    "batch_size": (int, "sequences per step"),
    "steps": (int, "total steps of the run (also after --resume)"),
    "lr": (float, "peak learning rate"),
    "seed": (int, "seed for weights and batches"),
    "device": (str, "cpu | cuda"),
    "data": (
        str,
        "a text file, a folder of text files, .jsonl, .parquet or a datasets.save_to_disk "
        "directory; records hold text, prompt/response or chat messages (default: this "
        "Python's standard library source)",
    ),
    "text_field": (str, "the field of a record that holds its text"),
    "eval_interval": (int, "steps between validation losses"),
    "save_interval": (int, "steps between checkpoints"),
    "timeout": (float, "seconds any worker waits for a peer before failing"),
    "max_restarts": (
        int,
        "restarts after a worker is lost (killed, crashed, hung past --timeout): the job "
        "resumes from its newest whole checkpoint by itself; 0 stops at the first loss",
    ),
    "recover_from": (
        str,
        "replica | checkpoint: with data-parallel replicas (and no --zero), a restarted "
        "worker takes its state from a surviving replica in memory and only the step in "
        "flight is redone; 'checkpoint' restarts every worker from the newest checkpoint",
    ),
    "on_save_error": (
        str,
        "stop | continue: what a checkpoint that cannot be written (a full disk) does; "
        "the last good one is kept either way",
    ),
}


def add_parser(sub: Any) -> None:
    """Register ``train`` on the ``layerwise`` command."""
    from layerwise.job.config import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a GPT decoder split layer-wise over workers",
        description="Train a transformer decoder layer-wise across worker processes.",
    )
    for name, (kind, text) in FLAGS.items():
        default = getattr(defaults, name)
        flags = ["--" + name.replace("_", "-")]
        if name == "recompute":  # the flag's first name, kept for existing scripts
            flags.append("--checkpoint")
        options: dict[str, Any] = {"type": kind, "help": f"{text} (default: {default})"}
        if name == "schedule":  # the registered names, read when the parser is built
            options.update(schedule_options())
        p.add_argument(*flags, dest=name, default=None, **options)
    p.add_argument("--pp", dest="workers", type=int, help="pipeline degree (same as --workers)")
    p.add_argument(
        "--tie-embeddings",
        action="store_true",
        default=None,
        help="share the token embedding with the output head",
    )
    p.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        default=None,
        help="one document per row, padded, instead of packing documents into rows",
    )
    p.add_argument("--run-dir", help="where the run is written (default: runs/<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> tuple[Any, bool]:
    """Return (the run's TrainConfig, whether it resumes a saved run); bad sizes and layouts
    raise ValueError here, before any process starts."""
    from layerwise.job.config import TrainConfig, check_config, load_config
    from layerwise.job.feed import prepare_data, settle_vocabulary
    from layerwise.job.model_source import hf_sizes, resolve

    given = {
        k: getattr(args, k)
        for k in [*FLAGS, "tie_embeddings", "pack"]
        if getattr(args, k) is not None
    }
    if args.resume:
        run_dir = Path(args.resume)
        saved = load_config(run_dir)
        cfg = dataclasses.replace(saved, **given, run_dir=str(run_dir))
        check_resumable(run_dir, saved, cfg)
        prepare_data(cfg, check_config(cfg))  # the cache again, or the same one found
        return cfg, True
    # paths made absolute: workers and later commands may run elsewhere
    cfg = TrainConfig(**resolve(given))
    settle_vocabulary(cfg)
    family = check_config(cfg)
    if cfg.hf_config is not None:  # config.json records the model's real sizes
        for key, value in hf_sizes(family.config).items():  # type: ignore[attr-defined]
            setattr(cfg, key, value)
    prepare_data(cfg, family)
    cfg.run_dir = args.run_dir or cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    return cfg, False


def check_resumable(run_dir: Path, saved: Any, cfg: Any) -> None:
    """A resumed run keeps the model's architecture and needs a checkpoint; its layout may
    change (said in one line)."""
    from layerwise.job.ckpt_files import step_dirs
    from layerwise.job.train import describe_layout, layout_info

    differs = {
        k: (v, cfg.architecture()[k])
        for k, v in saved.architecture().items()
        if cfg.architecture()[k] != v
    }
    if differs:
        what = ", ".join(f"{k} {a} saved, {b} given" for k, (a, b) in differs.items())
        raise ValueError(
            f"cannot resume {run_dir}: the model's architecture differs ({what}); resume with "
            f"the saved sizes, or start a new run with --run-dir"
        )
    if not step_dirs(run_dir / "checkpoints"):
        raise ValueError(
            f"cannot resume {run_dir}: it has no checkpoint (one is saved every "
            f"--save-interval steps); start it again with --run-dir {run_dir} after removing "
            f"it, or choose another --run-dir"
        )
    if layout_info(saved) != layout_info(cfg):
        print(
            f"layerwise train: resuming {run_dir}, saved as {describe_layout(layout_info(saved))}, "
            f"on {describe_layout(layout_info(cfg))}",
            flush=True,
        )


def run(args: argparse.Namespace) -> int:
    """Start the job: under torchrun this process is a worker; otherwise start the workers
    and keep them going (job.supervisor)."""
    from layerwise.job.supervisor import RunLock, supervise

    cfg, resume = config_from_args(args)
    run_dir = Path(cfg.run_dir)
    if under_torchrun():
        return _torchrun_worker(args, cfg, resume)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume {run_dir} or another --run-dir"
        )
    check_writable(run_dir)
    lock = RunLock(run_dir)  # one live job per run directory
    try:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        layout = cfg.grid()
        print(
            f"layerwise train: {layout}, schedule {cfg.schedule}, "
            f"{cfg.microbatches} micro-batches; run directory {run_dir}",
            flush=True,
        )
        if layout.world > layout.pp:
            print(describe_mesh(layout), flush=True)
        # workers read everything from config.json: one source of truth for every rank
        return supervise(cfg, resume)
    finally:
        lock.release()


def _torchrun_worker(args: argparse.Namespace, cfg: Any, resume: bool) -> int:
    """This process is one of torchrun's workers. After torchrun restarted the job (its own
    ``--max-restarts``) it resumes from the newest whole checkpoint, on the world it got."""
    from layerwise.job.supervisor import (
        LOCK_ENV,
        RunLock,
        follow_parent,
        quiet_interrupts,
        refit,
    )
    from layerwise.job.train import train_worker

    follow_parent()
    quiet_interrupts()
    if not args.run_dir and not resume:  # every rank must agree on the directory
        cfg.run_dir = f"runs/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.grid().world:  # an elastic restart with fewer (or more) nodes
        fitted = refit(cfg, world)
        if fitted is None or fitted.grid().world != world:
            raise ValueError(f"no layout of this model runs on exactly {world} workers")
        cfg = fitted
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    lock = None
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get(LOCK_ENV):
        lock = RunLock(Path(cfg.run_dir))
    try:
        return train_worker(cfg, "required" if resume else ("if-any" if restarted else False))
    finally:
        if lock is not None:
            lock.release()
