"""Pipeline schedules as data: the action IR, one validator, text and CSV forms, a generator
per schedule and the registry that says what each schedule needs.

- ``ir``: :class:`Action`, :class:`Schedule`, :class:`ScheduleError`;
- ``validate``: what each action waits for, the structure and deadlock checks;
- ``text``: ``to_text``/``from_text``, ``to_csv``/``from_csv``;
- ``generators``, ``zero_bubble``: the built-in schedules, each registered next to itself;
- ``auto``: :func:`synthesize`, a schedule searched for given stage costs under a memory cap;
- ``registry``: :class:`ScheduleSpec` per schedule, ``generate`` by name.

Imports without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from layerwise.schedules import registry
from layerwise.schedules.auto import synthesize
from layerwise.schedules.breadth_first import looped_bfs
from layerwise.schedules.dualpipe import dualpipe_v
from layerwise.schedules.generators import (
    forward_only,
    gpipe,
    interleaved_1f1b,
    naive,
    one_f_one_b,
    sequential,
)
from layerwise.schedules.ir import KIND_NAMES, KINDS, Action, Kind, Schedule, ScheduleError
from layerwise.schedules.registry import (
    Constraint,
    Placement,
    ScheduleSpec,
    alternatives,
    chunks_for,
    generate,
    generators,
    get,
    interleaved_form,
    names,
    problems,
    register,
    specs,
    stage_worker,
    unregister,
)
from layerwise.schedules.text import from_csv, from_text, to_csv, to_text
from layerwise.schedules.v_shape import v_half, v_min, zb_v
from layerwise.schedules.validate import (
    dependencies,
    dependency_keys,
    execution_order,
    stream_order_problems,
    validate,
)
from layerwise.schedules.zero_bubble import interleaved_zb, zb_h1, zb_h2

__all__ = [
    "GENERATORS",
    "KINDS",
    "KIND_NAMES",
    "SCHEDULE_NAMES",
    "Action",
    "Constraint",
    "Kind",
    "Placement",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "alternatives",
    "chunks_for",
    "dependencies",
    "dependency_keys",
    "dualpipe_v",
    "execution_order",
    "forward_only",
    "from_csv",
    "from_text",
    "generate",
    "generators",
    "get",
    "gpipe",
    "interleaved_1f1b",
    "interleaved_form",
    "interleaved_zb",
    "looped_bfs",
    "naive",
    "names",
    "one_f_one_b",
    "problems",
    "register",
    "registry",
    "sequential",
    "specs",
    "stage_worker",
    "stream_order_problems",
    "synthesize",
    "to_csv",
    "to_text",
    "unregister",
    "v_half",
    "v_min",
    "validate",
    "zb_h1",
    "zb_h2",
    "zb_v",
]

# Views of the registry, computed each time they are read, so that a schedule registered
# after this import still appears. Code in this package calls names() and generators().
_VIEWS: dict[str, Callable[[], Any]] = {"SCHEDULE_NAMES": names, "GENERATORS": generators}


def __getattr__(name: str) -> Any:
    """Return SCHEDULE_NAMES (the registered names) or GENERATORS (name -> generator)."""
    if name in _VIEWS:
        return _VIEWS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
