"""Skip connections: a layer stashes a named tensor that a later layer pops.

An encoder-decoder (a U-Net) or a long residual needs a tensor from far back in the model.
Passing it through every layer in between would make each of them carry it, and in a
pipeline would send it through every worker in between. Instead, a layer *stashes* it under
a name and a later layer *pops* it::

    @lw.skippable(stash=["enc1"])
    class Down(nn.Module):
        def forward(self, x):
            y = self.conv(x)
            lw.stash("enc1", y)
            return self.pool(y)

    @lw.skippable(pop=["enc1"])
    class Up(nn.Module):
        def forward(self, x):
            return self.conv(torch.cat([self.up(x), lw.pop("enc1")], dim=1))

or with the two ready-made layers, ``lw.Stash("enc1")`` (passes its input on and stashes
it) and ``lw.Pop("enc1", merge)`` (returns ``merge(x, popped)``).

Run as a plain ``nn.Sequential`` the layers meet through a module-level store. In a
:class:`~layerwise.Pipeline`, each stage runs with a store of its own, and a tensor that
crosses stages goes straight from the worker that stashed it to the worker that pops it, not
through the workers in between; its gradient comes straight back. The pipeline learns who
stashes and pops what from the declarations (``skippable``, or the ``stashes``/``pops``
attributes of a layer or of any module inside it), so each worker knows its messages
without building the others' layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class SkipError(RuntimeError):
    """A stash or pop that does not match the declarations, or a name stashed twice."""


class SkipStore:
    """The tensors stashed and not yet popped, by name, while layers run."""

    def __init__(self, given: dict[str, torch.Tensor] | None = None) -> None:
        self.given = dict(given or {})  # from earlier stages, for this stage's layers to pop
        self.stashed: dict[str, torch.Tensor] = {}  # stashed here, not popped yet

    def stash(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise SkipError(f"lw.stash({name!r}, ...) takes a tensor, got {type(tensor).__name__}")
        if name in self.stashed:
            raise SkipError(f"{name!r} was stashed twice before being popped; use distinct names")
        self.stashed[name] = tensor

    def pop(self, name: str) -> torch.Tensor:
        if name in self.stashed:
            return self.stashed.pop(name)
        if name in self.given:
            return self.given.pop(name)
        raise SkipError(
            f"lw.pop({name!r}): nothing stashed under that name; a layer before this one must "
            f"call lw.stash({name!r}, tensor) for every micro-batch"
        )


_DEFAULT = SkipStore()  # plain nn.Sequential runs, outside any pipeline
_current: ContextVar[SkipStore | None] = ContextVar("layerwise_skip_store", default=None)


def stash(name: str, tensor: torch.Tensor) -> None:
    """Keep ``tensor`` under ``name`` for a later layer to :func:`pop`."""
    (_current.get() or _DEFAULT).stash(name, tensor)


def pop(name: str) -> torch.Tensor:
    """Take the tensor an earlier layer stashed under ``name``."""
    return (_current.get() or _DEFAULT).pop(name)


@contextlib.contextmanager
def using(store: SkipStore) -> Iterator[SkipStore]:
    """Run layers with ``store`` as the place stashes go to and pops come from."""
    token = _current.set(store)
    try:
        yield store
    finally:
        _current.reset(token)


def skippable(stash: Sequence[str] = (), pop: Sequence[str] = ()) -> Callable[[type[T]], type[T]]:
    """Declare on a module class the names its forward stashes and pops."""

    def mark(cls: type[T]) -> type[T]:
        cls.stashes = tuple(stash)  # type: ignore[attr-defined]
        cls.pops = tuple(pop)  # type: ignore[attr-defined]
        return cls

    return mark


class Stash(nn.Module):
    """Pass the input on unchanged, and stash it (or ``module(input)``'s output) as ``name``."""

    def __init__(self, name: str, module: nn.Module | None = None) -> None:
        super().__init__()
        self.stashes, self.pops = (name,), ()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.module is None else self.module(x)
        stash(self.stashes[0], out)
        return out


class Pop(nn.Module):
    """Return ``merge(x, popped)``; ``merge`` is ``"add"``, ``"cat"`` (on dim 1) or a module
    or function of two tensors."""

    def __init__(self, name: str, merge: str | Callable[..., Any] = "add") -> None:
        super().__init__()
        self.stashes, self.pops = (), (name,)
        if isinstance(merge, str) and merge not in ("add", "cat"):
            raise ValueError(f"merge must be 'add', 'cat' or a callable, got {merge!r}")
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = pop(self.pops[0])
        if self.merge == "add":
            return x + skip
        if self.merge == "cat":
            return torch.cat([x, skip], dim=1)
        assert callable(self.merge)
        return self.merge(x, skip)


def declared(spec: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names stashed, names popped) that a layer (module, meta module or factory) declares,
    its own and those of every module inside it, in order."""
    owners = list(spec.modules()) if isinstance(spec, nn.Module) else [spec]
    stashes = tuple(n for m in owners for n in getattr(m, "stashes", ()))
    pops = tuple(n for m in owners for n in getattr(m, "pops", ()))
    return stashes, pops


@dataclass(frozen=True)
class Skip:
    """One named tensor: stashed by layer ``source``, popped by the later layer ``target``."""

    name: str
    source: int
    target: int


def find_skips(specs: Sequence[Any]) -> list[Skip]:
    """Pair each declared stash with its pop; refuse a name without both, or out of order."""
    made: dict[str, int] = {}
    skips: list[Skip] = []
    for i, spec in enumerate(specs):
        stashes, pops = declared(spec)
        inside = set(stashes) & set(pops)  # stashed and popped within this layer
        stashes = tuple(n for n in stashes if n not in inside)
        for name in (n for n in pops if n not in inside):
            if name not in made:
                where = "only a later" if any(name in declared(s)[0] for s in specs[i:]) else "no"
                raise SkipError(
                    f"layer {i} pops {name!r}, which {where} layer stashes; a pop needs an "
                    f"earlier layer that declares stash={name!r}"
                )
            skips.append(Skip(name, made.pop(name), i))
        for name in stashes:
            if name in made:
                raise SkipError(
                    f"layers {made[name]} and {i} both stash {name!r} before it is popped; "
                    f"give each skip its own name"
                )
            made[name] = i
    if made:
        name, layer = next(iter(made.items()))
        raise SkipError(
            f"layer {layer} stashes {name!r} but no later layer pops it; declare pop={name!r} "
            f"on the layer that uses it, or stop stashing it"
        )
    return skips
