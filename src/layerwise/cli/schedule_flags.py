"""Command-line flags that read the schedule registry, shared by the subcommands that take
a ``--schedule``: the names, aliases and descriptions come from the registry, never a list."""

from __future__ import annotations

from typing import Any

from layerwise.schedules import get, names, specs


def schedule_name(text: str) -> str:
    """Return the registered name ``text`` refers to (an alias, '_' for '-'), or ``text``
    unchanged, so that the flag's choices reject it with the list of names."""
    try:
        return get(text).name
    except ValueError:
        return text


def schedule_options() -> dict[str, Any]:
    """Return ``add_argument`` options for a ``--schedule`` flag: the registered names as
    choices, aliases accepted. Read when the parser is built, so late entries appear."""
    return {"type": schedule_name, "choices": names()}


def schedule_help() -> str:
    """Return the registered schedules with their one-line descriptions, for help text."""
    return "; ".join(f"{s.name}: {s.description}" for s in specs())


def chunks_help() -> str:
    """Return the help of a ``--chunks`` flag: each multi-stage schedule's default and range."""
    multi = [
        f"{s.name}: default {s.chunks_default}, allowed {s.allowed_chunks()}"
        for s in specs()
        if s.multi_chunk
    ]
    return "stages per worker (" + "; ".join([*multi, "others: 1"]) + ")"
