"""Moving skip connections between stages: straight from the stage that stashes a tensor to
the stage that pops it, and its gradient straight back (see :mod:`layerwise.skips`).

Each pair of stages joined by skips is a stream of its own (numbered after the stages), so
its messages never pass through the workers in between. Both ends handle them at the action
that needs them: the data left long before (the stages in between still had to run), so
there is nothing to gain by posting the receives ahead.
"""

from __future__ import annotations

from typing import Any

import torch

from layerwise.runtime.builder import Built
from layerwise.runtime.step import Step, free_sent
from layerwise.runtime.tree import TensorMeta, flatten
from layerwise.schedules import Schedule


def stream(schedule: Schedule, source: int, target: int) -> int:
    """The transport stream of the skips from stage ``source`` to stage ``target``."""
    return schedule.num_stages + schedule.skips.index((source, target))


def _marked(value: Any, flags: list[bool]) -> int:
    return sum(f and t.is_floating_point() for t, f in zip(flatten(value)[0], flags, strict=True))


def gather(
    built: Built, schedule: Schedule, s: int, mb: int, x: Any, needs: list[bool] | None,
    key: Any, st: Step,
) -> tuple[Any, list[bool]]:  # fmt: skip
    """Stage ``s``'s input with the skips it pops, and which of its tensors send a gradient."""
    stage = built.stages[s]
    x_needs = needs if needs is not None else [t.is_floating_point() for t in flatten(x)[0]]
    all_needs = list(x_needs)
    given: dict[int, Any] = {}
    counts = []
    for source, names in stage.pops_from.items():
        peer = schedule.stage_worker[source]
        if peer == built.worker:
            got, flags = st.skip_local.pop((source, s, mb))
        else:
            what = f"skips {', '.join(names)} from stage {source}"
            pending = built.transport.post_activation(
                stream(schedule, source, s), mb, peer, key, what
            )
            got, flags = built.transport.complete(pending), pending.needs_grad
        flags = flags or [False] * len(flatten(got)[0])
        given[source] = got
        all_needs += flags
        counts.append((source, _marked(got, flags)))
    st.skip_split[(s, mb)] = (_marked(x, x_needs), counts)
    return (x, given), all_needs


def send(
    built: Built, schedule: Schedule, s: int, mb: int, out: Any, flags: list[bool] | None,
    key: Any, trains: bool, st: Step,
) -> tuple[Any, list[bool] | None]:  # fmt: skip
    """Send what stage ``s`` stashed for later stages; return its output for the next stage
    and that output's gradient flags."""
    y, by_target = out
    n_y = len(flatten(y)[0])
    rest = flags[n_y:] if flags is not None else None
    for target, value in by_target.items():
        count = len(flatten(value)[0])
        mine = rest[:count] if rest is not None else [False] * count
        rest = rest[count:] if rest is not None else None
        peer = schedule.stage_worker[target]
        if peer == built.worker:
            st.skip_local[(s, target, mb)] = (value, mine)
            continue
        k = stream(schedule, s, target)
        sent = built.transport.send_activation(value, k, mb, peer, key, mine)
        if trains:
            st.skip_sent[(s, target, mb)] = [
                TensorMeta.of(t) for t, f in zip(sent, mine, strict=True) if f
            ]
            free_sent(value)
    return y, (flags[:n_y] if flags is not None else None)


def output_grads(built: Built, schedule: Schedule, s: int, mb: int, st: Step) -> list[torch.Tensor]:
    """The gradients of what stage ``s`` stashed, from the stages that popped it, in order."""
    grads: list[torch.Tensor] = []
    for target, names in built.stages[s].stashes_to.items():
        peer = schedule.stage_worker[target]
        if peer == built.worker:
            grads += st.skip_grads.pop((s, target, mb))
            continue
        like = st.skip_sent.pop((s, target, mb))
        what = f"gradient of skips {', '.join(names)} from stage {target}"
        k = stream(schedule, s, target)
        pending = built.transport.post_gradient(like, k, mb, peer, what)
        grads += built.transport.complete(pending)
    return grads


def send_input_grads(
    built: Built, schedule: Schedule, s: int, mb: int, in_grads: list[torch.Tensor], st: Step
) -> list[torch.Tensor]:
    """Send the gradients of the skips stage ``s`` popped back to where they were stashed;
    return the rest, for the previous stage."""
    n_x, counts = st.skip_split.pop((s, mb))
    rest = in_grads[n_x:]
    for source, count in counts:
        part, rest = rest[:count], rest[count:]
        peer = schedule.stage_worker[source]
        if peer == built.worker:
            st.skip_grads[(source, s, mb)] = part
        else:
            built.transport.send_gradient(part, stream(schedule, source, s), mb, peer)
    return in_grads[:n_x]
