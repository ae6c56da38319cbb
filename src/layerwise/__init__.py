"""layerwise: layer-wise model parallelism for PyTorch.

The pure parts (partition, schedules, simulate, timeline) import without torch; the runtime
is loaded on first use so that ``layerwise simulate`` starts fast.
"""

from typing import Any

from layerwise.partition import Partition, PartitionError, partition
from layerwise.schedules import Action, Schedule, ScheduleError, generate, validate
from layerwise.simulate import Costs, simulate
from layerwise.timeline import Event, Timeline

__version__ = "0.1.0"
__all__ = [
    "Action",
    "Costs",
    "Event",
    "Partition",
    "PartitionError",
    "PeerError",
    "Pipeline",
    "Pop",
    "Schedule",
    "ScheduleError",
    "Stash",
    "Timeline",
    "generate",
    "partition",
    "pop",
    "simulate",
    "skippable",
    "stash",
    "validate",
]
_SKIPS = ("Stash", "Pop", "stash", "pop", "skippable")


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "PeerError"):
        from layerwise import runtime

        return getattr(runtime, name)
    if name in _SKIPS:
        from layerwise import skips

        return getattr(skips, name)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
