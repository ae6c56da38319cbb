"""Flatten what stages pass to each other (a tensor, tuple, list or dict) into tensors and back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor: enough to allocate its receive buffer."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(t.shape), t.dtype)

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def describe(self) -> str:
        return f"{tuple(self.shape)} {str(self.dtype).removeprefix('torch.')}"


def flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """Return the tensors in ``value`` (depth first) and a picklable spec of its structure."""
    if isinstance(value, torch.Tensor):
        return [value], "T"
    if isinstance(value, tuple | list):
        tensors: list[torch.Tensor] = []
        specs = []
        for v in value:
            ts, sp = flatten(v)
            tensors += ts
            specs.append(sp)
        return tensors, ("tuple" if isinstance(value, tuple) else "list", specs)
    if isinstance(value, dict):
        tensors = []
        items = []
        for k, v in value.items():
            ts, sp = flatten(v)
            tensors += ts
            items.append((k, sp))
        return tensors, ("dict", items)
    if value is None or isinstance(value, int | float | bool | str):
        return [], ("const", value)
    raise TypeError(
        f"stages may pass tensors, tuples, lists, dicts and constants between them, "
        f"not {type(value).__name__}"
    )


def unflatten(tensors: list[torch.Tensor], spec: Any) -> Any:
    """Rebuild the structure described by ``spec`` from ``tensors`` (inverse of flatten)."""
    return _build(spec, iter(tensors))


def _build(spec: Any, it: Iterator[torch.Tensor]) -> Any:
    # A module-level function, not a closure that calls itself: such a closure is a reference
    # cycle holding the tensors, which would then live until the garbage collector runs.
    if spec == "T":
        return next(it)
    kind, body = spec
    if kind == "const":
        return body
    if kind == "dict":
        return {k: _build(s, it) for k, s in body}
    items = [_build(s, it) for s in body]
    return tuple(items) if kind == "tuple" else items


def map_tensors(value: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor in ``value``, keeping the structure."""
    tensors, spec = flatten(value)
    return unflatten([fn(t) for t in tensors], spec)


def signature(value: Any) -> tuple[Any, ...]:
    """Return a hashable description of the shapes and dtypes in ``value``."""
    tensors, spec = flatten(value)
    return (repr(spec), *(TensorMeta.of(t).describe() for t in tensors))
