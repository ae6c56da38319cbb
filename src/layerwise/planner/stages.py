"""How many transformer layers each pipeline stage holds: the default split and the overrides.

A layout has pp x vpp stages (model chunks), in model order; the schedule's registry entry
says which worker holds each one (``stage_worker``). The default split is the exact min-max
partition (:func:`layerwise.partition.partition`) of the embedding, the transformer layers
and the output layer, each costed in layer-equivalents: a layer is 1, the embedding its
parameters over a layer's, the output layer the larger of its parameters and its FLOPs over
a layer's. A vocabulary as large as BLOOM's (250k x 14336, 1.45 layers) thus takes a layer
off the first and the last stage, as the BLOOM run did by hand (5, 6 x 10, 5 on pp=12).

Overrides: ``--layers-per-stage`` gives every stage; ``--first-stage-layers`` and
``--last-stage-layers`` give the first and last worker's layers, Megatron-LM's meaning,
with the rest spread evenly over the other workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from layerwise.partition import partition
from layerwise.planner.bubble import schedule_name
from layerwise.planner.params import embedding_params, layer_params
from layerwise.planner.specs import Layout, ModelSpec, PlanError
from layerwise.schedules import registry


@dataclass(frozen=True)
class SplitRequest:
    """Layers per stage as the user asked for them; all empty: the default split."""

    layers_per_stage: tuple[int, ...] = ()
    first: int | None = None  # --first-stage-layers
    last: int | None = None  # --last-stage-layers

    def __post_init__(self) -> None:
        """Raises PlanError when both ways of giving a split are used at once."""
        if self.layers_per_stage and (self.first is not None or self.last is not None):
            raise PlanError(
                "give either --layers-per-stage or --first-stage-layers/--last-stage-layers, "
                "not both"
            )

    @property
    def given(self) -> bool:
        """Returns whether the user fixed any part of the split."""
        return bool(self.layers_per_stage) or self.first is not None or self.last is not None


def item_costs(m: ModelSpec) -> list[float]:
    """Returns the costs the partitioner balances, in layer-equivalents: the embedding, one
    per transformer layer, the output layer (which is a copy of the embedding when tied)."""
    layer = layer_params(m)
    emb = embedding_params(m) / layer
    head_params = m.vocab * m.hidden / layer
    # The output layer's matmul against a layer's (Narayanan et al. 2021, Eq. 3 terms).
    d = m.hidden // m.heads
    proj = m.hidden * (m.heads + 2 * m.kv) * d + m.hidden**2
    proj += (3 if m.gated_mlp else 2) * m.hidden * m.ffn_size
    head_flops = m.hidden * m.vocab / (proj + 2 * m.seq * m.hidden)
    return [emb, *([1.0] * m.layers), max(head_params, head_flops)]


@lru_cache(maxsize=1024)
def default_split(m: ModelSpec, stages: int) -> tuple[int, ...]:
    """Returns the transformer layers of each of ``stages`` stages from the exact min-max
    partition of :func:`item_costs`. A stage left with the embedding or the output layer
    alone would hold no transformer layer; the partition is then redone with them merged
    into the first and last layer, so that every stage holds at least one."""
    check_stage_count(m.layers, stages)
    if stages == 1:
        return (m.layers,)
    costs = item_costs(m)
    sizes = partition(costs, stages).sizes
    layers = [*sizes[:-1], sizes[-1] - 1]
    layers[0] -= 1
    if min(layers) >= 1:
        return tuple(layers)
    merged = [costs[0] + costs[1], *costs[2:-2], costs[-2] + costs[-1]]
    return tuple(partition(merged, stages).sizes)


def check_stage_count(layers: int, stages: int) -> None:
    """Raises PlanError when there are fewer transformer layers than stages."""
    if stages > layers:
        raise PlanError(
            f"{layers} layers cannot fill {stages} pipeline stages (pp x vpp): every stage "
            f"needs at least one transformer layer; use pp x vpp <= {layers}"
        )


def check_split(split: Sequence[int], layers: int, pp: int, vpp: int) -> None:
    """Raises PlanError saying what to change when ``split`` is not one positive layer count
    per stage summing to the model's layers."""
    flag = "--layers-per-stage"
    stages = pp * vpp
    if len(split) != stages:
        raise PlanError(
            f"{flag} gives {len(split)} stages, but pp x vpp = {pp} x {vpp} = {stages}; "
            f"give {stages} numbers (one per stage, in model order)"
        )
    for s, n in enumerate(split):
        if n < 1:
            raise PlanError(
                f"{flag} gives stage {s} {n} layers; every stage needs at least one "
                f"transformer layer: move one there from a neighbouring stage"
            )
    total = sum(split)
    if total != layers:
        change = f"add {layers - total}" if total < layers else f"remove {total - layers}"
        raise PlanError(
            f"{flag} sums to {total}, but the model has {layers} layers; {change} "
            f"layer(s) across the stages"
        )


def _even(total: int, parts: int) -> list[int]:
    """Returns ``total`` spread over ``parts``, the earlier parts taking the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def first_last_split(
    layers: int, stage_worker: Sequence[int], pp: int, first: int | None, last: int | None
) -> tuple[int, ...]:
    """Returns the split with ``first`` layers on the first worker and ``last`` on the last
    (either may be None), the other layers spread evenly over the other workers, and each
    worker's layers spread evenly over its stages (its chunks, when vpp > 1)."""
    if pp == 1:
        raise PlanError(
            "--first-stage-layers and --last-stage-layers need pp > 1: with one pipeline "
            "stage it holds every layer"
        )
    vpp = len(stage_worker) // pp
    pinned = {w: n for w, n in ((0, first), (pp - 1, last)) if n is not None}
    for w, n in pinned.items():
        name = "--first-stage-layers" if w == 0 else "--last-stage-layers"
        if n < vpp:
            raise PlanError(
                f"{name} {n} leaves a chunk of that worker without a layer: give at least "
                f"vpp = {vpp}"
            )
    others = [w for w in range(pp) if w not in pinned]
    rest = layers - sum(pinned.values())
    if not others and rest != 0:
        raise PlanError(
            f"with pp=2 the first and last stages hold every layer: --first-stage-layers + "
            f"--last-stage-layers = {layers - rest}, but the model has {layers} layers"
        )
    if others and rest < len(others) * vpp:
        raise PlanError(
            f"--first-stage-layers/--last-stage-layers leave {rest} layers for the other "
            f"{len(others) * vpp} stages, which need at least one each; lower them"
        )
    per_worker = dict(pinned)
    per_worker.update(zip(others, _even(rest, len(others)) if others else [], strict=True))
    split = [0] * len(stage_worker)
    for w in range(pp):
        mine = [s for s, owner in enumerate(stage_worker) if owner == w]
        for s, n in zip(mine, _even(per_worker[w], len(mine)), strict=True):
            split[s] = n
    return tuple(split)


def stage_map(lay: Layout) -> tuple[int, ...]:
    """Returns the worker of each stage for the schedule ``lay`` runs."""
    name = schedule_name(lay.schedule, lay.vpp)
    return registry.get(name).stage_worker(lay.pp, lay.vpp)


def request_split(m: ModelSpec, lay: Layout, request: SplitRequest) -> tuple[int, ...]:
    """Returns the split ``request`` asks for on ``lay`` (checked), or () for the default."""
    if request.layers_per_stage:
        check_split(request.layers_per_stage, m.layers, lay.pp, lay.vpp)
        return request.layers_per_stage
    if request.first is None and request.last is None:
        return ()
    split = first_last_split(m.layers, stage_map(lay), lay.pp, request.first, request.last)
    check_split(split, m.layers, lay.pp, lay.vpp)
    return split


def resolve(m: ModelSpec, lay: Layout) -> tuple[int, ...]:
    """Returns the transformer layers of each stage of ``lay``: its own split (checked), or
    the default one."""
    if lay.stage_layers:
        check_split(lay.stage_layers, m.layers, lay.pp, lay.vpp)
        return lay.stage_layers
    return default_split(m, lay.pp * lay.vpp)


def worker_layers(split: Sequence[int], stage_worker: Sequence[int], pp: int) -> list[int]:
    """Returns the transformer layers each worker holds (summed over its stages)."""
    out = [0] * pp
    for n, w in zip(split, stage_worker, strict=True):
        out[w] += n
    return out
