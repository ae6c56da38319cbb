"""Every flag of ``layerwise train``, checked once in the launcher before any worker starts.

Each problem is one line that says what is wrong and what to do; a bad run fails here, not
later inside every worker among the launcher's logs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from layerwise.runtime.executor import RECOMPUTE_MODES
from layerwise.schedules import chunks_for, get, problems, specs

BALANCE_MODES = ("uniform", "params", "time", "memory")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
SAVE_ERROR_MODES = ("stop", "continue")


def parse_balance(text: str, num_layers: int | None = None) -> str | list[int]:
    """'params' stays a mode; '2,2,1,1' becomes stage sizes (each >= 1, summing to the
    number of layers when it is given). Raises ValueError naming what to write instead."""
    text = text.strip()
    if text in BALANCE_MODES:
        return text
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(
            f"--balance {text!r}: give a mode ({' | '.join(BALANCE_MODES)}) or layers per stage "
            f"as whole numbers separated by commas, such as 2,2,1,1"
        )
    sizes = [int(p) for p in parts]
    if min(sizes) < 1:
        raise ValueError(f"--balance {text!r}: every stage needs at least one layer")
    if num_layers is not None and sum(sizes) != num_layers:
        raise ValueError(
            f"--balance {text!r} gives {sum(sizes)} layers but the model has {num_layers} "
            f"(the blocks plus the embedding and the head)"
        )
    return sizes


def _positive(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{name} must be one of {' | '.join(allowed)}, got {value!r}")


def check_schedule(
    name: str, workers: int, microbatches: int, chunks: int | None, num_layers: int
) -> None:
    """The schedule suits these sizes (its registry entry's constraints), and its stages
    (workers x stages per worker) each get at least one layer."""
    _check_chunks(name, chunks)
    v = chunks_for(name, chunks)
    found = problems(name, workers, microbatches, v)
    if found:
        raise ValueError(f"--schedule {name}: " + "; ".join(found))
    if workers * v > num_layers:
        per_worker = "1 stage" if v == 1 else f"{v} stages"
        raise ValueError(
            f"--schedule {name} with {per_worker} per worker needs {workers * v} stages of at "
            f"least one layer, but the model has {num_layers} layers (the count includes the "
            f"embedding and the head); use at most {num_layers // v} workers, fewer --chunks "
            f"or more --layers"
        )


def _check_chunks(name: str, chunks: int | None) -> None:
    """``--chunks`` is one the schedule allows; the message says what to run instead."""
    spec = get(name)
    problem = None if chunks is None else spec.chunks_problem(chunks)
    if problem is None:
        return
    if spec.multi_chunk:
        advice = f"use --chunks {spec.allowed_chunks()}"
    else:
        multi = ", ".join(s.name for s in specs() if s.multi_chunk)
        advice = f"leave --chunks out, or use a schedule with several stages per worker: {multi}"
    raise ValueError(f"--chunks {chunks}: {problem}; {advice}")


def check_device(device: str, local_workers: int) -> None:
    """The device exists, with a GPU for each local worker when it is ``cuda``."""
    _choice(device, "device", DEVICES)
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no usable GPU; use --device cpu")
    if torch.cuda.device_count() < local_workers:
        raise ValueError(
            f"--device cuda: {local_workers} workers need {local_workers} GPUs but this "
            f"machine has {torch.cuda.device_count()}; use fewer workers or more machines"
        )


def check_writable(run_dir: Path) -> None:
    """The run directory can be created and written; say which part cannot."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write the run directory {str(run_dir)!r} ({err.strerror or err}); "
            f"choose a writable --run-dir"
        ) from err


def check_data(path: str | None) -> None:
    """The corpus exists and is of a form the job reads (a binary file would train)."""
    if path is None:
        return
    from layerwise.job.documents import open_corpus

    open_corpus(path)


def check_run(cfg: Any, num_layers: int, local_workers: int | None = None) -> None:
    """Check every flag of a run before any worker starts; raise ValueError on the first
    problem. ``num_layers`` counts every layer the partitioner splits."""
    _positive(cfg, ("workers", "dp", "tp", "microbatches", "chunks", "batch_size", "seq_len",
                    "steps", "eval_interval", "save_interval", "layers", "d_model", "heads",
                    "eval_batches"))  # fmt: skip
    if cfg.zero not in (0, 1):
        raise ValueError(f"--zero must be 0 or 1, got {cfg.zero}")
    if cfg.lr <= 0 or cfg.timeout <= 0:
        raise ValueError(f"--lr and --timeout must be positive, got {cfg.lr} and {cfg.timeout}")
    _choice(cfg.recompute, "recompute", RECOMPUTE_MODES)
    _choice(getattr(cfg, "on_save_error", "stop"), "on-save-error", SAVE_ERROR_MODES)
    _choice(getattr(cfg, "recover_from", "replica"), "recover-from", ("replica", "checkpoint"))
    if getattr(cfg, "max_restarts", 0) < 0:
        raise ValueError(
            f"--max-restarts must be 0 (never restart) or more, got {cfg.max_restarts}"
        )
    cap = getattr(cfg, "memory_cap", None)
    if cap is not None and (cfg.schedule != "auto" or not cap > 0):
        raise ValueError(
            f"--memory-cap {cap:g}: give it with --schedule auto, as a number above 0 "
            f"(micro-batches of one whole stage's activations per worker)"
        )
    check_schedule(cfg.schedule, cfg.workers, cfg.microbatches, cfg.chunks, num_layers)
    _choice(cfg.precision, "precision", PRECISIONS)
    parse_balance(cfg.balance, num_layers)
    per_replica, rest = divmod(cfg.batch_size, cfg.dp)
    if rest:
        fits = [b for b in range(cfg.dp, 4 * cfg.dp + 1, cfg.dp)]
        raise ValueError(
            f"--batch-size {cfg.batch_size} cannot be shared evenly by --dp {cfg.dp} replicas; "
            f"use a multiple of {cfg.dp}, such as {fits}"
        )
    if per_replica < cfg.microbatches:
        raise ValueError(
            f"each replica's {per_replica} sequences cannot be cut into --microbatches "
            f"{cfg.microbatches}; use at most {per_replica} micro-batches or a larger batch"
        )
    check_data(cfg.data)
    local = local_workers or int(os.environ.get("LOCAL_WORLD_SIZE", cfg.dp * cfg.workers * cfg.tp))
    check_device(cfg.device, local)
