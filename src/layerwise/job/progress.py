"""What a run has done so far, from its ``config.json``, ``metrics.jsonl`` and checkpoint
pointer: the part of ``layerwise diagnose`` that needs no timeline, so that it also reports
on a run that stopped (or is still going) before writing ``timeline.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECENT_LOSSES = 5
CONFIG_KEYS = ("workers", "schedule", "microbatches", "chunks", "layers", "recompute", "steps")


def read_config(run_dir: Path) -> dict[str, Any]:
    """Return the run's saved flags as a dict; raise FileNotFoundError if ``run_dir`` is not
    a run directory and ValueError if its config.json is not JSON."""
    path = run_dir / "config.json"
    if not path.is_file():
        where = "does not exist" if not run_dir.exists() else "has no config.json"
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: it {where}; give a directory that "
            f"'layerwise train' wrote (its --run-dir)"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as err:  # UnicodeDecodeError included
        raise ValueError(f"{path} is not a run's config (not JSON: {err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a run's config (not a JSON object)")
    return config


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Return the step records of metrics.jsonl (none if there is no file) and the number of
    lines that could not be read, such as the last one of a run killed while writing it."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], 0
    records, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(record, dict) and "event" in record:
            continue  # a lost worker, a recovery: see read_events
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The job's events in metrics.jsonl: workers lost, recoveries."""
    path = run_dir / "metrics.jsonl"
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events


def health(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the steps whose loss or gradient was not finite (skipped) and the loss spikes."""
    return {
        "nonfinite_steps": [r["step"] for r in metrics if "skipped" in r],
        "loss_spikes": [{"step": r["step"], "what": r["spike"]} for r in metrics if "spike" in r],
    }


def checkpoint_step(run_dir: Path) -> int | None:
    """Return the step of the newest finished checkpoint, or None if none was saved."""
    from layerwise.job.ckpt_files import step_dirs

    found = step_dirs(run_dir / "checkpoints")
    return found[0][0] if found else None


def resume_command(run_dir: Path, steps_total: int | None, saved: int | None) -> str:
    """Return the command that finishes the run. A run whose last checkpoint is already at
    its final step has no step left to run, so it is given one more step to measure."""
    command = f"layerwise train --resume {run_dir}"
    if steps_total is not None and saved is not None and saved >= steps_total:
        command += f" --steps {saved + 1}"
    return command


def progress(
    run_dir: Path, cfg: dict[str, Any], metrics: list[dict[str, Any]], unreadable: int
) -> dict[str, Any]:
    """Return, as a JSON-ready dict, what an unfinished run has done: steps done of the
    configured total, the last losses, validation losses so far, non-finite steps and loss
    spikes, its latest checkpoint and the command that finishes it."""
    total = cfg.get("steps")
    saved = checkpoint_step(run_dir)
    return {
        "run_dir": str(run_dir),
        "finished": False,
        "config": {k: cfg.get(k) for k in CONFIG_KEYS},
        "steps_done": max(r["step"] for r in metrics) + 1 if metrics else 0,
        "steps_total": total,
        "last_losses": [
            {"step": r["step"], "loss": r["loss"]} for r in metrics[-RECENT_LOSSES:] if "loss" in r
        ],
        "val_losses": [
            {"step": r["step"], "val_loss": r["val_loss"]} for r in metrics if "val_loss" in r
        ],
        **health(metrics),
        "unreadable_lines": unreadable,
        "checkpoint_step": saved,
        "eval_interval": cfg.get("eval_interval"),
        "save_interval": cfg.get("save_interval"),
        "resume": resume_command(run_dir, total, saved),
    }


def _steps_losses(rows: list[dict[str, Any]], key: str) -> str:
    """Return ``step 36: 2.345, step 37: 2.301`` for the rows' ``key`` values."""
    return ", ".join(f"step {r['step']}: {r[key]:.3f}" for r in rows)


def render_progress(report: dict[str, Any]) -> str:
    """Return the report of an unfinished run as text for a terminal."""
    c = report["config"]
    total = report["steps_total"] if report["steps_total"] is not None else "?"
    lines = [
        f"run {report['run_dir']}: not finished, {report['steps_done']} of {total} steps done "
        f"({c['workers']} workers, {c['schedule']}, {c['microbatches']} micro-batches)",
        "last losses: " + (_steps_losses(report["last_losses"], "loss") or "none yet"),
        "validation losses: "
        + (
            _steps_losses(report["val_losses"], "val_loss")
            or f"none yet (one every --eval-interval {report['eval_interval']} steps)"
        ),
        f"non-finite steps: {report['nonfinite_steps'] or 'none'}; loss spikes: "
        f"{[s['step'] for s in report['loss_spikes']] or 'none'}",
    ]
    if report["unreadable_lines"]:
        lines.append(
            f"({report['unreadable_lines']} line(s) of metrics.jsonl could not be read and were "
            f"left out; a run killed while writing one leaves half a line)"
        )
    saved = report["checkpoint_step"]
    start = (
        f"it continues from the checkpoint saved after {saved} steps"
        if saved is not None
        else f"no checkpoint was saved yet (one every --save-interval "
        f"{report['save_interval']} steps), so it starts again from step 0"
    )
    lines += [
        "",
        "The timeline of the last step (timeline.json), and so the idle-time analysis and the "
        "suggestions, is written when a run finishes.",
        f"To finish this run: {report['resume']}  ({start});",
        f"then: layerwise diagnose {report['run_dir']}",
    ]
    return "\n".join(lines)
