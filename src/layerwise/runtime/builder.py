"""Building one worker's share of a pipeline: schedule, partition, stages, ties, transport.

Nothing here runs a step; :mod:`layerwise.runtime.executor` does. Every rank of the
pipeline group builds with the same arguments, and each keeps only the stages the schedule
places on it: layers given as factories or on the ``meta`` device are built here and
nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.partition import Partition
from layerwise.profile import Balance, LayerSpec, build_layer, is_meta, materialize, resolve_balance
from layerwise.runtime.stage import Stage
from layerwise.runtime.ties import Tie
from layerwise.runtime.transport import Transport, transport_class
from layerwise.schedules import Schedule, generate, validate
from layerwise.skips import Skip, find_skips

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
TiedSpec = tuple[int, str, int, str]  # (layer, parameter name, layer, parameter name)


@dataclass
class Built:
    """What one worker holds of a pipeline, and where it sits in the group."""

    schedule: Schedule
    partition: Partition
    stages: dict[int, Stage]  # stage index -> this worker's stage
    ties: list[Tie]
    transport: Transport
    group: dist.ProcessGroup | None
    worker: int
    device: torch.device

    @property
    def num_workers(self) -> int:
        return self.schedule.num_workers

    def global_rank(self, worker: int) -> int:
        """The global rank of pipeline worker ``worker``."""
        return dist.get_global_rank(self.group, worker) if self.group is not None else worker


def group_position(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this process's worker index, number of workers) in ``group``; (0, 1) alone.

    Raises RuntimeError when the environment says this process is one of several (torchrun's
    WORLD_SIZE) but no process group exists: each would otherwise run the whole model alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise RuntimeError(
            f"WORLD_SIZE is {world} but no process group is started, so this process would run "
            f"every stage alone; call torch.distributed.init_process_group() (e.g. "
            f"init_process_group('gloo') on CPU, 'nccl' on GPU) before building the Pipeline"
        )
    return 0, 1


def make_schedule(
    schedule: str | Schedule, num_workers: int, microbatches: int, chunks: int | None
) -> Schedule:
    """The named schedule for this group (chunks from the registry when None), or the given
    one, checked against the group's size."""
    if isinstance(schedule, Schedule):
        validate(schedule)
        if schedule.num_workers != num_workers:
            raise ValueError(
                f"schedule is for {schedule.num_workers} workers but the group has {num_workers}"
            )
        return schedule
    return generate(schedule, num_workers, microbatches, chunks)


def fingerprint(
    schedule: Schedule,
    num_layers: int,
    balance: Balance,
    p2p: str,
    tied: Sequence[TiedSpec],
    skips: Sequence[Skip] = (),
) -> dict[str, Any]:
    """What every worker of a pipeline must have built alike, by name."""
    return {
        "schedule": schedule.name,
        "micro-batches": schedule.num_microbatches,
        "stages": schedule.num_stages,
        "placement of stages on workers": list(schedule.stage_worker),
        "action lists": [" ".join(map(str, acts)) for acts in schedule.actions],
        "layers": num_layers,
        "balance": balance if isinstance(balance, str) else list(balance),
        "transport": p2p,
        "tied parameters": [list(t) for t in tied],
        "skip connections": [(k.name, k.source, k.target) for k in skips],
    }


def arrive(worker: int, group: dist.ProcessGroup | None, timeout: float | None) -> None:
    """Wait at most ``timeout`` seconds for every worker of ``group`` to start building.

    The build's collectives are bounded only by the process group's own timeout, 30 minutes
    by default for a group the user started; a rank that never builds its pipeline would
    keep the others that long. gloo can wait with a bound of our choosing and name who is
    missing; other backends keep their group's timeout."""
    if timeout is None or dist.get_backend(group) != "gloo":
        return
    try:
        dist.monitored_barrier(group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"worker {worker}: not every worker of the pipeline group started building it "
            f"within {timeout:g}s ({str(err).splitlines()[0][:200]}); every rank of the group "
            f"must build the Pipeline"
        ) from err


def agree(
    mine: dict[str, Any],
    worker: int,
    group: dist.ProcessGroup | None,
    timeout: float | None = None,
) -> None:
    """Fail on every worker at once, naming the difference, unless all built alike.

    Without this, workers running different schedules wait for messages that never come
    until the timeout. Collective over ``group``: one small gather when the pipeline is built,
    after every worker has arrived (at most ``timeout`` seconds, see :func:`arrive`).
    """
    arrive(worker, group, timeout)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for other, theirs in enumerate(everyone):
        diff = [key for key in mine if theirs.get(key) != everyone[0].get(key)]
        if diff:
            key = diff[0]
            raise ValueError(
                f"workers built different pipelines: worker 0 has {key} "
                f"{_short(everyone[0][key])} but worker {other} has {_short(theirs[key])}"
                + (f" (also different: {', '.join(diff[1:])})" if diff[1:] else "")
                + "; every rank of a pipeline group must build it with the same arguments"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def make_partition(
    specs: list[LayerSpec],
    schedule: Schedule,
    balance: Balance,
    sample: Any,
    group: dist.ProcessGroup | None,
) -> Partition:
    """Split the layers into the schedule's stages; measured balances follow worker 0."""
    num_stages = schedule.num_stages
    if num_stages > len(specs):
        raise ValueError(
            f"{len(specs)} layers cannot fill {num_stages} stages ({schedule.num_workers} "
            f"workers x {schedule.chunks} chunks): use at most {len(specs)} stages"
        )
    part = resolve_balance(specs, num_stages, balance, sample)
    if isinstance(balance, str) and balance in ("time", "memory") and schedule.num_workers > 1:
        # measurements differ between processes: everyone takes worker 0's partition
        sizes: list[Any] = [part.sizes]
        first = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(sizes, src=first, group=group)
        part = Partition.from_sizes(sizes[0], len(specs))
    return part


def route_skips(
    skips: Sequence[Skip], schedule: Schedule, partition: Partition, stages: dict[int, Stage]
) -> Schedule:
    """Tell each stage which skips cross into and out of it; return the schedule with the
    stage pairs those skips join (a skip inside one stage stays there)."""
    pairs: dict[tuple[int, int], list[str]] = {}
    for k in skips:
        a, b = partition.stage_of(k.source), partition.stage_of(k.target)
        if a != b:
            pairs.setdefault((a, b), []).append(k.name)
    for s, stage in stages.items():
        stage.route_skips(
            {a: tuple(sorted(n)) for (a, b), n in sorted(pairs.items()) if b == s},
            {b: tuple(sorted(n)) for (a, b), n in sorted(pairs.items()) if a == s},
        )
    return dataclasses.replace(schedule, skips=tuple(sorted(pairs)))


def build_stage(
    index: int,
    partition: Partition,
    specs: list[LayerSpec],
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    parallelize: Callable[[int, nn.Module], nn.Module] | None,
) -> Stage:
    """Build (or take) the layers of stage ``index`` on ``device``."""
    r = partition.ranges[index]
    built = []
    for i in r:
        spec = specs[i]
        if isinstance(spec, nn.Module) and not is_meta(spec):
            module = spec  # given built: keep its weights exactly
        else:
            # seeded per layer, so weights do not depend on how many workers there are
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + i)
                module = build_layer(spec)
                if is_meta(module):
                    module = materialize(module, device)
        module = module.to(device)
        if parallelize is not None:
            module = parallelize(i, module)
        built.append(module)
    return Stage(index, r.start, built, amp_dtype)


def _layer(stages: dict[int, Stage], partition: Partition, index: int) -> nn.Module | None:
    stage = stages.get(partition.stage_of(index))
    return None if stage is None else stage.layers[index - stage.first_layer]


def _param(stages: dict[int, Stage], part: Partition, layer: int, name: str) -> nn.Parameter | None:
    module = _layer(stages, part, layer)
    return None if module is None else module.get_parameter(name)


def _set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, param)


def tie_groups(tied: Sequence[TiedSpec]) -> list[list[tuple[int, str]]]:
    """Join the tied pairs into groups of (layer, parameter name) that are all one parameter
    (pairs (a, b) and (b, c) make one group of three), each sorted, in order of first layer."""
    parent: dict[tuple[int, str], tuple[int, str]] = {}

    def root(x: tuple[int, str]) -> tuple[int, str]:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, na, b, nb in tied:
        ra, rb = root((a, na)), root((b, nb))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for member in parent:
        groups.setdefault(root(member), []).append(member)
    return [sorted(g) for _, g in sorted(groups.items())]


def setup_ties(
    tied: Sequence[TiedSpec],
    schedule: Schedule,
    partition: Partition,
    stages: dict[int, Stage],
    worker: int,
    group: dist.ProcessGroup | None,
    global_rank: Callable[[int], int],
    timeout: float | None = None,
) -> list[Tie]:
    """Share tied parameters: one object for the copies on this worker, and a Tie with the
    other workers that hold copies. Ties talk point to point inside the pipeline group, so no
    extra process group is needed and pipelines inside a larger mesh stay independent."""
    ties = []
    for index, members in enumerate(tie_groups(tied)):
        holders = sorted({schedule.stage_worker[partition.stage_of(layer)] for layer, _ in members})
        mine = [(layer, name) for layer, name in members
                if _layer(stages, partition, layer) is not None]  # fmt: skip
        if not mine:
            continue
        param = _param(stages, partition, *mine[0])
        assert param is not None
        for layer, name in mine[1:]:  # one Parameter object serves every layer here
            module = _layer(stages, partition, layer)
            assert module is not None
            _set_param(module, name, param)
        if len(holders) > 1:
            ranks = [global_rank(w) for w in holders]
            tie = Tie(param, ranks, global_rank(worker), index, timeout)
            tie.sync_values(group)
            ties.append(tie)
    return ties


def shared_parameters(specs: Sequence[LayerSpec]) -> list[TiedSpec]:
    """Return a tie (first layer, name, later layer, name) for each Parameter object that
    layers given as modules hold more than once, across layers (factories build their own)."""
    first: dict[int, tuple[int, str]] = {}
    found: list[TiedSpec] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, nn.Module):
            continue
        for name, p in spec.named_parameters():
            owner = first.setdefault(id(p), (i, name))
            if owner[0] != i:
                found.append((owner[0], owner[1], i, name))
    return found


def all_ties(specs: Sequence[LayerSpec], tied: Sequence[TiedSpec]) -> list[TiedSpec]:
    """The ties given, then those found in the modules (:func:`shared_parameters`), each once.

    Without this, two workers holding one Parameter would each train their own copy."""
    ties: list[TiedSpec] = [(a, na, b, nb) for a, na, b, nb in tied]
    known = {frozenset([(a, na), (b, nb)]) for a, na, b, nb in ties}
    for tie in shared_parameters(specs):
        a, na, b, nb = tie
        if frozenset([(a, na), (b, nb)]) not in known:
            known.add(frozenset([(a, na), (b, nb)]))
            ties.append(tie)
    return ties


def build(
    layers: Sequence[LayerSpec] | nn.Sequential,
    *,
    schedule: str | Schedule,
    microbatches: int,
    chunks: int | None,
    balance: Balance,
    sample: Any,
    group: dist.ProcessGroup | None,
    device: torch.device,
    seed: int,
    precision: str,
    parallelize: Callable[[int, nn.Module], nn.Module] | None,
    tied: Sequence[TiedSpec],
    p2p: str,
    timeout: float,
) -> Built:
    """Build this worker's part of the pipeline (collective over ``group``)."""
    specs: list[LayerSpec] = (
        list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
    )
    if not specs:
        raise ValueError("a pipeline needs at least one layer")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    worker, num_workers = group_position(group)
    tied = all_ties(specs, tied)
    skips = find_skips(specs)
    sched = make_schedule(schedule, num_workers, microbatches, chunks)
    transport_cls = transport_class(p2p, group)  # bad p2p fails before anything is built
    if num_workers > 1:  # before any other collective, which would hang on a mismatch
        mine = fingerprint(sched, len(specs), balance, transport_cls.name, tied, skips)
        agree(mine, worker, group, timeout)
    part = make_partition(specs, sched, balance, sample, group)
    stages = {
        s: build_stage(s, part, specs, seed, device, PRECISIONS[precision], parallelize)
        for s in sched.stages_of(worker)
    }
    sched = route_skips(skips, sched, part, stages)
    transport = transport_cls.open(sched, worker, group, device, timeout)
    ties = setup_ties(tied, sched, part, stages, worker, group, transport.global_rank, timeout)
    return Built(sched, part, stages, ties, transport, group, worker, device)
