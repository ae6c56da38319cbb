"""Per-layer costs (parameters, activation bytes, forward and backward time) and balancing.

Measurement is kept apart from the solver in :mod:`layerwise.partition`: this module turns
layers into numbers, the solver turns numbers into stages. Layers are measured on copies,
one at a time, so the user's modules are never changed and the whole model never needs to
exist at once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerwise.partition import Partition, PartitionError, partition, uniform

LayerSpec = nn.Module | Callable[[], nn.Module]
Balance = str | Sequence[int] | Partition
BALANCE_MODES = ("uniform", "params", "time", "memory")


def build_layer(spec: LayerSpec) -> nn.Module:
    """Return the module for a layer given as a module or a zero-argument factory."""
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        module = spec()
        if not isinstance(module, nn.Module):
            raise TypeError(f"layer factory returned {type(module).__name__}, expected nn.Module")
        return module
    raise TypeError(
        f"a layer must be an nn.Module or a zero-argument factory, got {type(spec).__name__}"
    )


def is_meta(module: nn.Module) -> bool:
    """Return True if any of ``module``'s parameters or buffers live on the meta device."""
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def materialize(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Allocate a meta module on ``device`` and initialize it; return it.

    A module with a ``materialize(device)`` method of its own does it that way (a library's
    own initialization, or reading a checkpoint); others get their ``reset_parameters``."""
    own = getattr(module, "materialize", None)
    if callable(own):
        built = own(device)
        if not isinstance(built, nn.Module):
            raise TypeError(f"{type(module).__name__}.materialize returned "
                            f"{type(built).__name__}, expected nn.Module")  # fmt: skip
        return built
    module = module.to_empty(device=device)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return module


@dataclass(frozen=True)
class LayerProfile:
    """Measured or counted cost of one layer for one micro-batch."""

    params: int
    param_bytes: int
    activation_bytes: int  # size of the layer's output
    forward_s: float
    backward_s: float


def count_params(spec: LayerSpec) -> int:
    """Return the parameter count of a layer; works on the meta device without allocating."""
    module = build_layer(spec)
    return sum(p.numel() for p in module.parameters())


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _float_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() and value.requires_grad else []
    if isinstance(value, tuple | list):
        return [t for v in value for t in _float_leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _float_leaves(v)]
    return []


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach()
        return out.requires_grad_(True) if out.is_floating_point() else out
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def call_layer(module: nn.Module, value: Any) -> Any:
    """Apply a layer: tuples are unpacked into positional arguments, dicts into keywords."""
    if isinstance(value, tuple):
        return module(*value)
    if isinstance(value, dict):
        return module(**value)
    return module(value)


def profile_layers(
    layers: Sequence[LayerSpec], sample: Any, repeats: int = 3
) -> list[LayerProfile]:
    """Measure each layer on a copy, feeding each layer the previous layer's output.

    Times are the median of ``repeats`` runs after one warm-up; backward time is that of a
    sum-of-outputs backward through the layer alone.
    """
    profiles = []
    value = _detach(sample)
    for spec in layers:
        original = build_layer(spec)
        module = (
            materialize(copy.deepcopy(original)) if is_meta(original) else copy.deepcopy(original)
        )
        fwd: list[float] = []
        bwd: list[float] = []
        out: Any = None
        for _ in range(repeats + 1):
            inp = _detach(value)
            t0 = time.perf_counter()
            out = call_layer(module, inp)
            t1 = time.perf_counter()
            leaves = _float_leaves(out)
            if leaves:
                torch.autograd.backward([t.sum() for t in leaves])
            t2 = time.perf_counter()
            module.zero_grad(set_to_none=True)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        params = list(module.parameters())
        profiles.append(
            LayerProfile(
                params=sum(p.numel() for p in params),
                param_bytes=sum(p.numel() * p.element_size() for p in params),
                activation_bytes=_nbytes(out),
                forward_s=sorted(fwd[1:])[len(fwd[1:]) // 2],
                backward_s=sorted(bwd[1:])[len(bwd[1:]) // 2],
            )
        )
        value = _detach(out)
        del module
    return profiles


def resolve_balance(
    layers: Sequence[LayerSpec], num_stages: int, balance: Balance = "uniform", sample: Any = None
) -> Partition:
    """Turn a balance request into a Partition.

    ``balance`` is a mode (``uniform``: by layer count; ``params``: by parameter count;
    ``time``: by measured forward+backward time; ``memory``: by parameter plus activation
    bytes), a list of stage sizes such as ``[6, 6, 6, 6]``, or a ready Partition.
    ``time`` and ``memory`` need a ``sample`` input for the first layer.
    """
    n = len(layers)
    if isinstance(balance, Partition):
        if balance.num_layers != n or balance.num_stages != num_stages:
            raise PartitionError(
                f"partition has {balance.num_stages} stages over {balance.num_layers} layers; "
                f"expected {num_stages} stages over {n} layers"
            )
        return balance
    if not isinstance(balance, str):
        sizes = list(balance)
        if len(sizes) != num_stages:
            raise PartitionError(f"balance {sizes} has {len(sizes)} stages, expected {num_stages}")
        return Partition.from_sizes(sizes, n)
    if balance == "uniform":
        return uniform(n, num_stages)
    if balance == "params":
        return partition([count_params(spec) for spec in layers], num_stages)
    if balance in ("time", "memory"):
        if sample is None:
            raise PartitionError(f"balance={balance!r} measures layers and needs a sample input")
        profiles = profile_layers(layers, sample)
        costs = [
            p.forward_s + p.backward_s if balance == "time" else p.param_bytes + p.activation_bytes
            for p in profiles
        ]
        return partition(costs, num_stages)
    raise PartitionError(f"unknown balance {balance!r}; use one of {BALANCE_MODES} or stage sizes")
