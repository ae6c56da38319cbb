"""A split backward (ZB-H1's I and W) is kept only where W gets every weight gradient right;
elsewhere the stage runs its whole backward at I, and the gradients stay exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _workers as w
import layerwise as lw
from layerwise.runtime.wcheck import parameters_used_outside_owners, shared_uses

pytestmark = pytest.mark.timeout(60)


class Borrower(nn.Module):
    """Uses another module's weight without registering it (hidden from ``parameters()``)."""

    def __init__(self, lender: nn.Linear) -> None:
        super().__init__()
        self.lender = [lender]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.lender[0].weight)


class Borrowing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.borrow = Borrower(self.lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.borrow(torch.tanh(self.lin(x)))


class TiedPair(nn.Module):
    """The same Parameter registered by two sub-modules (tied inside one layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_stray_and_shared_uses_are_found_and_named() -> None:
    layer = Borrowing()
    stray = parameters_used_outside_owners(layer, lambda: layer(torch.randn(2, 4)))
    assert stray == [("lin.weight", "Borrower", "linear")]
    tied = TiedPair()
    assert parameters_used_outside_owners(tied, lambda: tied(torch.randn(2, 4))) == []
    assert shared_uses(tied, [tied.a, tied.b]) == ["a.weight"]
    twice = Twice()
    assert shared_uses(twice, [twice.lin, twice.lin]) == ["lin.bias", "lin.weight"]
    assert shared_uses(twice, [twice.lin]) == []


def reference_grads(
    layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    """Single-process loss and gradients; the layers are left without gradients, since the
    pipeline then trains these very modules."""
    loss, grads = w.reference(layers, x, y, F.mse_loss)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return loss, grads


class Twice(nn.Module):
    """One Linear applied twice: its weight is used by two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("make", [Borrowing, TiedPair, Twice], ids=["borrow", "tied", "twice"])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_zero_bubble_stays_exact_where_w_cannot_split(make: type, checkpoint: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    layers = [make(), nn.Linear(4, 4)]
    expected_loss, expected = reference_grads(layers, x, y)
    pipe = lw.Pipeline(layers, schedule="zb-h1", microbatches=2, loss_fn=F.mse_loss,
                       recompute=checkpoint)  # fmt: skip
    with pytest.warns(UserWarning, match=r"stage 0 .* not split .* gradients stay exact"):
        loss = pipe.train_step(x, y)
    assert pipe.stages[0].split_safe is False
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name, p in pipe.named_parameters():
        torch.testing.assert_close(p.grad, expected[name])
    pipe.zero_grad()
    pipe.train_step(x, y)  # decided once: no second warning, same gradients
    for name, p in pipe.named_parameters():
        torch.testing.assert_close(p.grad, expected[name])


def test_ordinary_layers_keep_the_split() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    layers = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 4)]
    expected_loss, expected = reference_grads(layers, x, y)
    pipe = lw.Pipeline(layers, schedule="zb-h1", microbatches=2, loss_fn=F.mse_loss)
    assert pipe.train_step(x, y) == pytest.approx(expected_loss, rel=1e-6)
    assert pipe.stages[0].split_safe is True
    for name, p in pipe.named_parameters():
        torch.testing.assert_close(p.grad, expected[name])
    w_events = [e for e in pipe.timeline().events if e.kind == "W"]
    assert len(w_events) == 2
