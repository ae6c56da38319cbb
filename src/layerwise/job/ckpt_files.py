"""A checkpoint's files on disk: a manifest of checksums, and the newest checkpoint that is whole.

Every checkpoint directory ``step_N`` ends with ``manifest.json``: the step, the layout that
wrote it, the model's architecture, and each file's size and SHA-256. A checkpoint counts only
when its manifest is there and every file matches it, so a save cut short, a file truncated
later, or bytes overwritten in place are all found before any worker loads them, and the one
before is used instead. ``latest.json`` is only a hint: the directories are the truth.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and checksum of each named file in ``folder``."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256(folder / n)} for n in names}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    """Write the manifest last, through a temporary name: its presence means the rest is there."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({**info, "files": files}, indent=1, sort_keys=True))
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / MANIFEST).read_text()))


def verify(folder: Path) -> str | None:
    """Return what is wrong with checkpoint ``folder`` in a few words, or None if it is whole."""
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"manifest.json unreadable ({err})"
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} is truncated or grew ({size} bytes, {want['bytes']} when written)"
        if sha256(path) != want["sha256"]:
            return f"{name} changed after it was written (checksum mismatch)"
    return None


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories (not ``.tmp``), newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


@dataclass
class Choice:
    """The checkpoint to resume from (None if there is none) and the ones passed over."""

    path: Path | None
    step: int = 0
    rejected: list[str] = field(default_factory=list)


def newest_good(ckpt_dir: Path) -> Choice:
    """Find the newest checkpoint whose files all match their manifest."""
    rejected: list[str] = []
    for step, path in step_dirs(ckpt_dir):
        problem = verify(path)
        if problem is None:
            return Choice(path, step, rejected)
        rejected.append(f"checkpoint {path}: {problem}; skipped")
    return Choice(None, 0, rejected)
