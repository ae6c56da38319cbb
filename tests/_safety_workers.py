"""The runtime's safety nets across workers (module level, so spawn can import them): float
side tensors that need no gradient get none, and one Parameter held by two layers on
different workers is tied, not silently duplicated. Run inside ``_workers.equivalence_cases``
so that they share its process group."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import layerwise as lw

D = 8


class MaskOut(nn.Module):
    """x -> (features, a float mask computed without a graph): the mask needs no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), (x > 0).float()


class UseMask(nn.Module):
    """(h, mask) -> (h + fc(h) * mask, mask); notes whether the mask it got needs a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.mask_needed_grad: list[bool] = []

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():
            self.mask_needed_grad.append(mask.requires_grad)
        return h + self.fc(h) * mask, mask


class DropMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(h)


def mask_layers() -> list[nn.Module]:
    torch.manual_seed(3)
    return [MaskOut(), UseMask(), UseMask(), UseMask(), UseMask(), UseMask(), UseMask(), DropMask()]


def shared_layers() -> list[nn.Module]:
    """First and last Linear hold one Parameter object (and the same bias)."""
    torch.manual_seed(4)
    layers = [nn.Linear(D, D) for _ in range(8)]
    layers[-1].weight = layers[0].weight
    return layers


def shared_thrice_layers() -> list[nn.Module]:
    """One weight in layers 0, 3 and 7 (on 4 workers: three workers hold a copy, two layers
    share one on worker 0 at 2 workers), and one bias in layers 2 and 6."""
    torch.manual_seed(6)
    layers = [nn.Linear(D, D) for _ in range(8)]
    layers[3].weight = layers[7].weight = layers[0].weight
    layers[6].bias = layers[2].bias
    return layers


def _count_gradient_sends(pipe: lw.Pipeline) -> list[int]:
    """Return a list that gets the number of tensors of every gradient message sent."""
    sent: list[int] = []
    send = pipe.transport.send_gradient

    def counting(grads: list[torch.Tensor], *args: Any) -> None:
        sent.append(len(grads))
        send(grads, *args)

    pipe.transport.send_gradient = counting  # type: ignore[method-assign]
    return sent


def safety_cases(rank: int, world: int, reference: Any, compare: Any) -> dict[str, Any]:
    """Return case -> errors (``reference`` and ``compare`` as in ``_workers``)."""
    results: dict[str, Any] = {}
    x, y = torch.randn(8, D), torch.randn(8, D)
    ref_loss, ref_grads = reference(mask_layers(), x, y, nn.functional.mse_loss)
    for schedule, recompute in (("1f1b", "never"), ("zb-h1", "never"), ("1f1b", "always")):
        pipe = lw.Pipeline(
            mask_layers(),
            schedule=schedule,
            microbatches=4,
            loss_fn=nn.functional.mse_loss,
            recompute=recompute,
        )
        sent = _count_gradient_sends(pipe)
        loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
        errors = compare(pipe, loss, ref_loss, ref_grads)
        seen = [
            f
            for st in pipe.stages.values()
            for layer in st.layers
            for f in getattr(layer, "mask_needed_grad", [])
        ]
        first_uses = [
            f
            for st in pipe.stages.values()
            if st.index > 0
            for f in getattr(st.layers[0], "mask_needed_grad", [])
        ]
        if recompute == "never":
            # only the features travel back: one gradient per message, and no received mask
            # asks for one
            if any(n != 1 for n in sent):
                errors.append(f"gradient messages of {sent} tensors, expected 1 each")
            if any(first_uses):
                errors.append(f"a received float mask required grad: {first_uses}")
        elif not seen:
            errors.append("no forward saw the mask")
        results[f"float side input {schedule} {recompute}"] = errors
    ref_loss, ref_grads = reference(shared_layers(), x, y, nn.functional.mse_loss)
    pipe = lw.Pipeline(
        shared_layers(), schedule="1f1b", microbatches=2, loss_fn=nn.functional.mse_loss
    )
    loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
    errors = compare(pipe, loss, ref_loss, ref_grads)
    if pipe.is_first or pipe.is_last:
        expected = [(0, "weight", 7, "weight")]
        got = [(t.param.shape, t.leader) for t in pipe.built.ties]
        if len(got) != 1 or got[0][1] != pipe.is_first:
            errors.append(f"ties {got}, expected one for {expected}")
    results["shared parameter across workers"] = errors
    ref_loss, ref_grads = reference(shared_thrice_layers(), x, y, nn.functional.mse_loss)
    for schedule in ("1f1b", "zb-h1"):
        pipe = lw.Pipeline(shared_thrice_layers(), schedule=schedule, microbatches=2,
                           balance=[8 // world] * world,
                           loss_fn=nn.functional.mse_loss)  # fmt: skip
        loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
        errors = compare(pipe, loss, ref_loss, ref_grads)
        holders = [0, 1] if world == 2 else [0, 1, 3]
        for tie in pipe.built.ties:
            if tie.param.shape == (D, D) and tie.ranks != holders:
                errors.append(f"weight held by ranks {tie.ranks}, expected {holders}")
        results[f"parameter shared by three layers {schedule}"] = errors
    return results


def length_cases(rank: int, world: int, reference: Any, compare: Any) -> dict[str, Any]:
    """Lengths that take turns, then a dozen lengths: exact every step; the plan broadcast
    and the metadata of a length are sent once while it is remembered; receive buffers are
    made once per length; the metadata cache stays bounded."""
    import torch.distributed as dist

    from _workers import mlp_layers
    from layerwise.runtime.shapes import PLANS_KEPT
    from layerwise.runtime.transport.base import META

    pipe = lw.Pipeline(mlp_layers(), schedule="1f1b", microbatches=2,
                       loss_fn=nn.functional.mse_loss)  # fmt: skip
    counts = {"metadata": 0, "broadcasts": 0}
    isend, broadcast = pipe.transport._isend, dist.broadcast_object_list

    def spy_send(t: torch.Tensor, peer: int, stream: int, kind: int, *rest: Any) -> Any:
        counts["metadata"] += kind == META
        return isend(t, peer, stream, kind, *rest)

    def spy_broadcast(*args: Any, **kwargs: Any) -> Any:
        counts["broadcasts"] += 1
        return broadcast(*args, **kwargs)

    pipe.transport._isend = spy_send  # type: ignore[method-assign]
    dist.broadcast_object_list = spy_broadcast
    errors, per_step = [], []
    try:
        for step, length in enumerate([6, 10, 6, 10, 6, 10, *range(3, 15)]):
            x, y = torch.randn(4, length, D), torch.randn(4, length, D)
            ref_loss, ref_grads = reference(mlp_layers(), x, y, nn.functional.mse_loss)
            pipe.zero_grad()
            loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
            errors += [f"step {step}: {e}" for e in compare(pipe, loss, ref_loss, ref_grads)]
            pool = pipe.transport.pool
            per_step.append((counts["metadata"], counts["broadcasts"],
                             pool.allocations if pool is not None else 0))  # fmt: skip
    finally:
        dist.broadcast_object_list = broadcast
    history = pipe.executor.plans
    cached = {key[1][0] for key in pipe.transport.meta_cache}
    return {
        "lengths exact": errors,
        "lengths per step": per_step,
        "lengths remembered": len(history.plans) <= PLANS_KEPT and cached <= history.signatures(),
        "lengths cached": len(cached),
    }
