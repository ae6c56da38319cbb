"""Worker function for the skip-connection tests: a small U-Net-like model on 4 workers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import layerwise as lw
from _workers import D, compare, mse, reference


@lw.skippable(stash=["e1"])
class Down(nn.Module):
    """Stashes its features for the decoder (the functional form: lw.stash in forward)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.stashes = (name,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        lw.stash(self.stashes[0], h)
        return h * 0.5


class CatLinear(nn.Module):
    """Merges a popped tensor by concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([x, skip], dim=-1))


@lw.skippable(stash=["inner"], pop=["inner"])
class Inner(nn.Module):
    """Stashes and pops inside itself: a skip that never leaves its stage."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lw.stash("inner", x)
        return self.b(torch.relu(self.a(x))) + lw.pop("inner")


def unet_layers() -> list[nn.Module]:
    """0 stashes the raw input (no gradient), 1 and 2 stash features that 4 and 7 pop, and
    9 adds the input back: with balance 3,2,3,2, stage 0 feeds stages 1, 2 and 3 directly."""
    torch.manual_seed(5)
    return [
        lw.Stash("x0"),
        Down("e1"),
        Down("e2"),
        nn.Linear(D, D),
        lw.Pop("e2", CatLinear()),
        Inner(),
        nn.Linear(D, D),
        lw.Pop("e1", "add"),
        nn.Linear(D, D),
        lw.Pop("x0", "add"),
    ]


def skip_cases(rank: int, world: int) -> dict[str, Any]:
    """Every schedule family with skips across stages; returns case -> errors (empty: equal)."""
    results: dict[str, Any] = {}
    torch.manual_seed(1)
    x, y = torch.randn(16, D), torch.randn(16, D)
    ref_loss, ref_grads = reference(unet_layers(), x, y, mse)
    cases: list[tuple[str, int, str, str, Any]] = [
        ("gpipe", 4, "never", "tags", [3, 2, 3, 2]),
        ("1f1b", 8, "always", "tags", [3, 2, 3, 2]),
        ("zb-h1", 4, "never", "tags", [3, 2, 3, 2]),
        ("zb-h1", 8, "except_last", "tags", [3, 2, 3, 2]),
        ("interleaved-1f1b", 8, "never", "tags", "params"),
        ("1f1b", 4, "never", "channels", [3, 2, 3, 2]),
        ("interleaved-1f1b", 4, "always", "channels", "params"),
    ]
    for schedule, m, recompute, p2p, balance in cases:
        pipe = lw.Pipeline(unet_layers(), schedule=schedule, microbatches=m, loss_fn=mse,
                           recompute=recompute, p2p=p2p, balance=balance)  # fmt: skip
        sent: list[tuple[int, int]] = []
        isend = pipe.transport._isend

        def spy(
            t: torch.Tensor, peer: int, stream: int, *rest: Any, _f: Any = isend, _s: Any = sent
        ) -> Any:
            _s.append((peer, stream))
            return _f(t, peer, stream, *rest)

        pipe.transport._isend = spy  # type: ignore[method-assign]
        loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
        case = f"{schedule} m={m} {recompute} {p2p}"
        results[case] = compare(pipe, loss, ref_loss, ref_grads)
        sched = pipe.schedule
        results[f"{case} skips"] = list(sched.skips)
        results[f"{case} skip peers"] = sorted(
            {(rank, peer) for peer, stream in sent if stream >= sched.num_stages}
        )
        results[f"{case} messages"] = sched.messages
    pipe.zero_grad()
    out = pipe.forward(x if pipe.is_first else None)
    expected = nn.Sequential(*unet_layers())(x)
    results["forward"] = None if out is None else float((out - expected).abs().max())
    return results
