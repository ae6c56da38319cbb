"""Check, once per stage, that a split backward (I, then W) will give every weight gradient.

W computes each module's parameter gradients by back-propagating from the outputs of that
module's call. That is exact when each parameter is used in exactly one call of a module
that registers it. It is not in two cases, which this module detects on the first split
forward of a stage:

- a parameter used outside every module that registers it (a layer calling
  ``F.linear(x, other_layer.weight)``): no call's outputs carry that term, W would drop it;
- a parameter used by two calls (a module applied twice, or one weight registered by two
  modules, as a tied embedding and head on the same worker): back-propagating from the
  later call's outputs also reaches the earlier use through the later call's input, so
  W would count that term twice.

Such a stage runs its whole backward at I and nothing at W: exact, with less overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class _ParameterUses(TorchFunctionMode):
    """Records every torch call that takes a parameter while its owner is not running."""

    def __init__(self, owners: dict[int, tuple[str, list[nn.Module]]], running: list[nn.Module]):
        super().__init__()
        self.owners, self.running = owners, running
        self.stray: list[tuple[str, str, str]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            hit = self.owners.get(id(leaf)) if isinstance(leaf, nn.Parameter) else None
            if hit is not None and not any(m is o for o in hit[1] for m in self.running):
                where = type(self.running[-1]).__name__ if self.running else "the stage"
                name = getattr(func, "__name__", str(func))
                self.stray.append((hit[0], where, name))
        return func(*args, **kwargs)


@contextmanager
def watch_parameter_uses(root: nn.Module) -> Iterator[_ParameterUses]:
    """Within the block, record uses of ``root``'s parameters outside their owners."""
    # a use inside any module that registers the parameter is not stray (two such uses are
    # a problem of their own, found by shared_uses)
    owners: dict[int, tuple[str, list[nn.Module]]] = {}
    for mod_name, module in root.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                name = f"{mod_name}.{p_name}".lstrip(".")
                owners.setdefault(id(p), (name, []))[1].append(module)
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    handles = []
    for module in root.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    mode = _ParameterUses(owners, running)
    try:
        with mode:
            yield mode
    finally:
        for h in handles:
            h.remove()


def shared_uses(root: nn.Module, calls: list[nn.Module]) -> list[str]:
    """Names of ``root``'s parameters that more than one of these module calls registers."""
    names: dict[int, str] = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    count: dict[int, int] = {}
    for module in calls:
        for p in module.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return sorted(names.get(k, "?") for k, n in count.items() if n > 1)


def split_problem(stage: str, stray: list[tuple[str, str, str]], shared: list[str]) -> str | None:
    """Why this stage's backward cannot be split into I and W, or None if it can."""
    reasons = []
    seen = sorted(set(stray))
    if seen:
        uses = "; ".join(f"{p} used by {op} in {where}" for p, where, op in seen[:5])
        more = f" (and {len(seen) - 5} more)" if len(seen) > 5 else ""
        reasons.append(f"used outside the module that registers them: {uses}{more}")
    if shared:
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        reasons.append(f"used by more than one module call: {', '.join(shared[:5])}{more}")
    if not reasons:
        return None
    why = "; parameters ".join(reasons)
    return (
        f"{stage}: its backward is not split into input and weight gradients (it runs whole "
        f"at I, and W does nothing), because W computes weight gradients call by call and "
        f"would get these wrong: parameters {why}. The gradients stay exact; only the "
        f"zero-bubble overlap is lost on this stage."
    )


def parameters_used_outside_owners(
    root: nn.Module, run: Callable[[], Any]
) -> list[tuple[str, str, str]]:
    """Run ``run`` (a forward of ``root``) and return the stray uses it made, if any."""
    with torch.no_grad(), watch_parameter_uses(root) as mode:
        run()
    return mode.stray
