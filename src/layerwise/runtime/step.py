"""One run's bookkeeping: cutting the batch, what is in flight, stage failures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from layerwise.runtime.stage import Stage, free_unsaved
from layerwise.runtime.transport import PendingRecv
from layerwise.runtime.tree import TensorMeta, flatten, map_tensors
from layerwise.schedules import Action


def split_batch(value: Any, m: int) -> list[Any]:
    """Cut every tensor of ``value`` into ``m`` micro-batches along dim 0."""
    tensors, _ = flatten(value)
    if not tensors:
        raise ValueError("a batch must contain at least one tensor")
    rows = tensors[0].shape[0]
    if rows < m:
        raise ValueError(f"a batch of {rows} rows cannot be cut into {m} micro-batches")
    for t in tensors:
        if t.shape[0] != rows:
            raise ValueError(
                f"all tensors of a batch need the same first dimension ({rows}), "
                f"got {tuple(t.shape)}"
            )
    pieces = [torch.tensor_split(t, m) for t in tensors]
    return [map_tensors(value, _indexer(pieces, i)) for i in range(m)]


def _indexer(
    pieces: list[tuple[torch.Tensor, ...]], i: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    it: Iterator[tuple[torch.Tensor, ...]] = iter(pieces)
    return lambda _t: next(it)[i]


@dataclass
class Step:
    """What one training step keeps while this worker walks its action list."""

    plan: list[Any]  # per micro-batch: (rows, shape signature), the same on every worker
    rows: list[int]
    inputs: list[Any] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # last worker: each micro-batch's weight
    share: float = 1.0  # last worker: how much this replica counts (GradReducer.replica_share)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)  # forward only: the last stage's
    local: dict[tuple[int, str, int], Any] = field(default_factory=dict)  # same-worker hand-offs
    posted: dict[Action, PendingRecv] = field(default_factory=dict)  # receives already posted
    sent: dict[tuple[int, int], list[TensorMeta]] = field(default_factory=dict)  # grads to expect
    # skips between stages, keyed (stashing stage, popping stage, micro-batch): what waits on
    # this worker for a later stage, the gradients that wait for an earlier one, and the
    # sent tensors whose gradient will come back
    skip_local: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    skip_grads: dict[tuple[int, int, int], list[torch.Tensor]] = field(default_factory=dict)
    skip_sent: dict[tuple[int, int, int], list[TensorMeta]] = field(default_factory=dict)
    # (popping stage, micro-batch) -> how its input gradients split: the count for the
    # previous stage, then (stashing stage, count) for each skip source
    skip_split: dict[tuple[int, int], tuple[int, list[tuple[int, int]]]] = field(
        default_factory=dict
    )


class StageError(RuntimeError):
    """A stage's own computation failed; the message names the stage and its input."""


def describe_failure(stage: Stage, mb: int, x: Any, s: int, err: Exception) -> str:
    """Say which stage failed on which micro-batch, in which of its layers, and what the stage
    was given."""
    inputs = ", ".join(TensorMeta.of(t).describe() for t in flatten(x)[0])
    source = "the batch" if s == 0 else f"stage {s - 1}"
    where = ""
    if stage.failed_layer is not None:
        layer = stage.layers[stage.failed_layer - stage.first_layer]
        where = f", in layer {stage.failed_layer} ({describe_layer(layer)})"
    return (
        f"{stage.describe()} failed on micro-batch {mb}, whose input from {source} is "
        f"[{inputs}]{where}: {type(err).__name__}: {err}"
    )


def describe_layer(layer: torch.nn.Module) -> str:
    """A layer's class, and that of the module it wraps when it says so (``wraps``)."""
    inner = getattr(layer, "wraps", None)
    kind = type(layer).__name__
    return f"{kind} of {type(inner).__name__}" if isinstance(inner, torch.nn.Module) else kind


def free_sent(out: Any) -> None:
    """Free an output's memory once sent; its autograd node stays for the backward."""
    free_unsaved(flatten(out)[0])
