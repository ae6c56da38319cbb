"""Zero-bubble schedules (Qi et al. 2023): the backward split into I and W, so that weight
gradients, which nobody waits for, fill what would otherwise be idle time."""

from __future__ import annotations

from layerwise.schedules.generators import plain
from layerwise.schedules.ir import Action, Schedule, check_sizes
from layerwise.schedules.registry import ScheduleSpec, register


def zb_h1(num_workers: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward
    split into I (input gradient, on the critical path) and W (weight gradient, deferrable).

    The order is built by list scheduling on unit costs (F = I = W = 1): a free worker runs a
    ready F while fewer than ``p - w`` of its micro-batches await their I (1F1B's warm-up)
    and fewer than ``p`` await their W (1F1B's peak memory, as in the paper); else a ready I;
    else its oldest pending W. Later workers thus defer their W into the cool-down that 1F1B
    leaves idle, which cuts the bubble to about a third of 1F1B's when F = I = W. (Trying I
    before F leaves the first worker idle in the cool-down: its last forward then leaves too
    late for the gradients to come back in time.)
    """
    check_sizes(num_workers, num_microbatches)
    p, m = num_workers, num_microbatches
    done: dict[tuple[int, str, int], int] = {}  # (stage, kind, mb) -> finish time
    lists: list[list[Action]] = [[] for _ in range(p)]
    next_f = [0] * p
    next_i = [0] * p
    pending_w: list[list[int]] = [[] for _ in range(p)]
    free_at = [0] * p
    remaining = 3 * p * m
    t = 0
    while remaining:
        for w in range(p):
            if free_at[w] > t:
                continue
            choice: Action | None = None
            i = next_i[w]
            if (
                next_f[w] < m
                and next_f[w] - next_i[w] < p - w
                and next_f[w] - (next_i[w] - len(pending_w[w])) < p
                and (w == 0 or done.get((w - 1, "F", next_f[w]), t + 1) <= t)
            ):
                choice = Action(w, "F", next_f[w])
                next_f[w] += 1
            elif i < next_f[w] and (w == p - 1 or done.get((w + 1, "I", i), t + 1) <= t):
                choice = Action(w, "I", i)
                next_i[w] += 1
                pending_w[w].append(i)
            elif pending_w[w]:
                choice = Action(w, "W", pending_w[w].pop(0))
            if choice is not None:
                lists[w].append(choice)
                done[(choice.stage, choice.kind, choice.microbatch)] = t + 1
                free_at[w] = t + 1
                remaining -= 1
        t += 1
    return plain("zb-h1", m, lists)


register(
    ScheduleSpec(
        name="zb-h1",
        generator=zb_h1,
        description="1F1B with the backward split into I and W: deferred weight gradients "
        "fill the cool-down bubble at 1F1B's peak memory",
        # A forward waits only until fewer than p micro-batches await their W, so every
        # worker, not only the first, may hold p; deferred W keep later workers' inputs.
        peak_inflight=lambda p, m, v, w: min(p, m),
        aliases=("zb", "zbh1"),
        split_backward=True,
    )
)
