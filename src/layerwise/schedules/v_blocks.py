"""V schedules built from a repeating building block (Qi et al. 2024, "Pipeline Parallelism
with Controllable Memory"): one micro-batch's six actions per worker (F, I and W of both
chunks) placed at fixed offsets, repeated every ``INTERVAL`` units for every micro-batch.

On unit costs (F = I = W = 1 per chunk) a worker spends six units on each micro-batch, so a
block repeated every six units keeps it busy in the steady state as long as its six offsets
fall on six different residues modulo six. A chunk's activation lives from its F to its W
(its *lifespan*), so a worker holds about the sum of its two lifespans over six activations:
the shorter the block, the less memory.

The tightest block sends a micro-batch down the first chunks, back up the second ones, down
their input gradients and up the first chunks' ones, each action one unit after the one it
waits for, moved on by a few units only where its worker's residue is taken; each W takes
the first free residue after its I. On p = 4, micro-batch 0 (F1/F2, I1/I2, W1/W2: first and
second chunk; one column per unit)::

    t     0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17
    w0    F1 .  .  .  .  .  .  F2 I2 .  W2 .  .  .  .  I1 .  W1
    w1    .  F1 .  .  .  .  F2 .  .  I2 W2 .  .  .  I1 .  .  W1
    w2    .  .  F1 .  .  F2 .  .  .  .  I2 .  W2 I1 .  W1 .  .
    w3    .  .  .  F1 F2 .  .  .  .  .  .  I2 I1 W2 W1 .  .  .

Micro-batch j runs the same block 6j units later. Each worker's order is its actions sorted
by block time; the simulator then starts every action as early as its inputs and that order
allow, which squeezes the idle slots of the warm-up (the forwards of later micro-batches move
up) and of the cool-down. A worker's memory is fixed by its order: the most activations it
has started (F) and not yet released (W) at any point of it.
"""

from __future__ import annotations

from functools import lru_cache

from layerwise.schedules.ir import Action, Kind

INTERVAL = 6  # units per micro-batch per worker: F, I and W of two chunks
CHUNKS = 2

Slot = tuple[int, Kind, int]  # (worker, kind, chunk): one action of a block


@lru_cache(maxsize=64)
def tight_block(num_workers: int, up_slack: int = 0) -> dict[Slot, int]:
    """Return the start time of each of micro-batch 0's actions in the tightest block: each
    one at the first unit after its input whose residue modulo ``INTERVAL`` its worker has
    not used yet (see the module's picture). ``up_slack`` units more before each forward of
    the second chunks (on the way back up): longer lifespans, so more memory, and room for
    the next micro-batches' forwards, so less idle time (v-half's block)."""
    p = num_workers
    used: list[set[int]] = [set() for _ in range(p)]
    times: dict[Slot, int] = {}

    def place(slot: Slot, ready: int) -> int:
        # two actions on one residue would collide in every repetition of the block
        t = ready
        while t % INTERVAL in used[slot[0]]:
            t += 1
        used[slot[0]].add(t % INTERVAL)
        times[slot] = t
        return t + 1

    ready = 0
    for w in range(p):  # down the first chunks
        ready = place((w, "F", 0), ready)
    for w in reversed(range(p)):  # back up the second chunks to the loss on worker 0
        ready = place((w, "F", 1), ready + up_slack)
    for w in range(p):  # input gradients down the second chunks
        ready = place((w, "I", 1), ready)
    for w in reversed(range(p)):  # and up the first chunks
        ready = place((w, "I", 0), ready)
    for w in range(p):  # W wait for nobody: the next free residue after their I
        place((w, "W", 1), times[(w, "I", 1)] + 1)
        place((w, "W", 0), times[(w, "I", 0)] + 1)
    return times


def block_lists(
    num_workers: int, num_microbatches: int, block: dict[Slot, int]
) -> list[list[Action]]:
    """Return each worker's actions: ``block`` repeated every ``INTERVAL`` units for each
    micro-batch, sorted by time. Worker w's chunks are stages w and 2p - 1 - w."""
    last = CHUNKS * num_workers - 1
    timed: list[list[tuple[int, Action]]] = [[] for _ in range(num_workers)]
    for (w, kind, chunk), start in block.items():
        stage = w if chunk == 0 else last - w
        for j in range(num_microbatches):
            timed[w].append((start + INTERVAL * j, Action(stage, kind, j)))
    return [[action for _, action in sorted(acts)] for acts in timed]


def order_peak(actions: list[Action]) -> int:
    """Return the most activations a worker with this order holds at once: started by an F,
    released by its W."""
    held = peak = 0
    for action in actions:
        held += {"F": 1, "W": -1}.get(action.kind, 0)
        peak = max(peak, held)
    return peak


@lru_cache(maxsize=256)
def tight_block_peaks(num_workers: int, num_microbatches: int) -> tuple[int, ...]:
    """Return each worker's peak activations (chunks) in the tight block's schedule."""
    lists = block_lists(num_workers, num_microbatches, tight_block(num_workers))
    return tuple(order_peak(acts) for acts in lists)
