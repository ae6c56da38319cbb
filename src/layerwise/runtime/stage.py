"""One stage: its layers, and the forward/backward work of one micro-batch at a time.

Each forward stashes what the matching backward needs, keyed by micro-batch, and the
backward drops it. Three ways to run a backward:

- ``backward``: the whole backward at once (B);
- ``input_grad`` then ``weight_grad`` (I, W): I computes only the gradients the previous
  stage waits for, plus the gradients of the outputs of every module that owns parameters;
  W later turns those into parameter gradients, module by module, from the retained graph.
  (Correct as long as a parameter is used only by the modules that register it.)

With recomputation, the forward runs without a graph and keeps only its inputs and RNG
state; the first backward action recomputes the forward with the same random numbers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable

from layerwise.profile import call_layer
from layerwise.runtime.tree import flatten, map_tensors
from layerwise.runtime.wcheck import shared_uses, split_problem, watch_parameter_uses
from layerwise.skips import SkipError, SkipStore, declared, using

LossHead = Callable[[Any], torch.Tensor]


def _grad_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in flatten(value)[0] if t.requires_grad]


def _prepare_inputs(value: Any, needs_grad: list[bool] | None) -> Any:
    """Detach inputs from whatever produced them; the tensors ``needs_grad`` marks become
    leaves needing grad (None: none do, as the first stage's inputs are data whose gradient
    would go nowhere)."""
    flags = iter(needs_grad or [])

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.requires_grad_(True) if next(flags, False) and t.is_floating_point() else t

    return map_tensors(value, leaf)


def output_grad_flags(output: Any, recompute: bool) -> list[bool]:
    """Which tensors of a stage's output need a gradient back: those connected to its graph.

    A forward that will be recomputed ran without a graph and cannot tell, so every
    floating-point tensor is marked, as the recomputed forward may connect any of them."""
    return [t.is_floating_point() and (recompute or t.requires_grad) for t in flatten(output)[0]]


def _run_backward(
    roots: list[torch.Tensor], grads: list[torch.Tensor] | None, inputs: list[Any], keep: bool
) -> tuple[torch.Tensor | None, ...]:
    """Backward from ``roots``; return the gradients of ``inputs`` without accumulating them
    (or accumulate into leaves when ``inputs`` is empty). Uses the engine directly because the
    roots' data may have been freed after sending (only their graph is needed)."""
    if not roots:  # nothing upstream needs a gradient (a first stage without parameters)
        return tuple(None for _ in inputs)
    grad_tensors = tuple(grads) if grads is not None else tuple(torch.ones_like(r) for r in roots)
    return Variable._execution_engine.run_backward(  # type: ignore[no-any-return]
        tuple(roots), grad_tensors, keep, False, tuple(inputs), True, not inputs
    )


def _save_alias(t: torch.Tensor) -> torch.Tensor:
    # Autograd keeps a detached alias of what it saves, not the tensor object itself, so
    # swapping a tensor's .data later (free_unsaved) never changes a value a backward reads:
    # the alias still holds the old storage, which therefore lives exactly as long as needed.
    return t.detach()


def _load_alias(t: torch.Tensor) -> torch.Tensor:
    return t


def free_unsaved(tensors: list[torch.Tensor]) -> None:
    """Drop these tensors' own reference to their storage, keeping their graph nodes.

    Megatron-LM frees a stage's output once sent ("deallocate_output_tensor"). Because every
    stage forward saves aliases (see ``_save_alias``), this is safe for any tensor: memory
    that a backward still reads stays alive through the alias, the rest is freed now. Views
    are skipped: their storage belongs to their base.
    """
    for t in tensors:
        if t.grad_fn is None or t._base is not None:
            continue
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)


@dataclass
class Stash:
    """What one micro-batch's backward needs."""

    inputs: Any
    rng_state: torch.Tensor | None = None
    grad_outputs: list[bool] | None = None  # which outputs get a gradient back (None: floats)
    output: Any = None
    loss: torch.Tensor | None = None
    captures: list[tuple[nn.Module, list[torch.Tensor]]] = field(default_factory=list)
    capture_grads: list[torch.Tensor | None] = field(default_factory=list)


class Stage(nn.Module):
    """The consecutive layers ``first .. first + len(layers) - 1`` of the model."""

    def __init__(
        self,
        index: int,
        first_layer: int,
        layers: list[nn.Module],
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.amp_dtype = amp_dtype
        self.index = index
        self.first_layer = first_layer
        self.layers = nn.ModuleList(layers)
        self.stash: dict[int, Stash] = {}
        self.failed_layer: int | None = None  # global index of the layer that raised last
        self._capturing: list[tuple[nn.Module, list[torch.Tensor]]] | None = None
        # whether I/W may split this stage's backward; None until a split forward is watched
        self.split_safe: bool | None = None
        # skips that cross stages (set by the builder): earlier stage -> names popped here,
        # later stage -> names stashed here. With pops the stage's input is (x, {stage:
        # {name: tensor}}), with stashes its output is (y, {stage: {name: tensor}}).
        self.pops_from: dict[int, tuple[str, ...]] = {}
        self.stashes_to: dict[int, tuple[str, ...]] = {}
        self.uses_skips = any(any(declared(layer)) for layer in layers)
        for module in self.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_hook(self._capture_hook)

    def _capture_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing is not None and torch.is_grad_enabled():
            outs = [t for t in flatten(output)[0] if t.requires_grad]
            if outs:
                self._capturing.append((module, outs))

    def describe(self) -> str:
        last = self.first_layer + len(self.layers) - 1
        return f"stage {self.index} (layers {self.first_layer}-{last})"

    def route_skips(
        self, pops_from: dict[int, tuple[str, ...]], stashes_to: dict[int, tuple[str, ...]]
    ) -> None:
        """Say which skips reach this stage from earlier ones and leave it for later ones."""
        self.pops_from, self.stashes_to = dict(pops_from), dict(stashes_to)
        self.uses_skips = self.uses_skips or bool(pops_from or stashes_to)

    def run(self, value: Any) -> Any:
        """Apply the stage's layers in order (no stashing): used by inference and recompute.

        If a layer raises, ``failed_layer`` keeps its global index for the failure report."""
        self.failed_layer = None
        store = None
        if self.uses_skips:  # a store of its own: skips inside the stage meet here
            given: dict[str, torch.Tensor] = {}
            if self.pops_from:
                value, by_stage = value
                given = {n: t for names in by_stage.values() for n, t in names.items()}
            store = SkipStore(given)
        with self.autocast(), using(store) if store is not None else contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                try:
                    value = call_layer(layer, value)
                except Exception:
                    self.failed_layer = self.first_layer + i
                    raise
        return value if store is None else self._with_stashes(value, store)

    def _with_stashes(self, value: Any, store: SkipStore) -> Any:
        """The stage's output, with what it stashed for later stages; check nothing strays."""
        if store.given:
            raise SkipError(f"{self.describe()}: no layer popped {sorted(store.given)}, which "
                            f"earlier stages stashed for it")  # fmt: skip
        wanted = [n for names in self.stashes_to.values() for n in names]
        if sorted(store.stashed) != sorted(wanted):
            missing = sorted(set(wanted) - set(store.stashed))
            extra = sorted(set(store.stashed) - set(wanted))
            raise SkipError(
                f"{self.describe()}: its layers stashed {sorted(store.stashed)} but declared "
                f"{sorted(wanted)} for later stages"
                + (f" (never stashed: {missing})" if missing else "")
                + (f" (stashed without a declaration or a pop: {extra})" if extra else "")
                + "; declare what each layer stashes and pops (lw.skippable)"
            )
        if not self.stashes_to:
            return value
        # views: the output itself may be stashed, and freeing it once sent must not free
        # the copy that waits on this worker for a later stage
        out = {c: {n: store.stashed[n].view_as(store.stashed[n]) for n in names}
               for c, names in self.stashes_to.items()}  # fmt: skip
        return value, out

    def autocast(self) -> Any:
        """Return the mixed-precision context of this stage's forward (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device = next((p.device.type for p in self.parameters()), "cpu")
        return torch.autocast(device_type=device, dtype=self.amp_dtype)

    def _forward_graph(self, mb: int, inputs: Any, head: LossHead | None, capture: bool) -> Stash:
        stash = Stash(inputs=inputs)
        capture = capture and self.split_safe is not False
        self._capturing = stash.captures if capture else None
        watch = capture and self.split_safe is None
        try:
            with contextlib.ExitStack() as ctx:
                uses = ctx.enter_context(watch_parameter_uses(self)) if watch else None
                hooks = torch.autograd.graph.saved_tensors_hooks(_save_alias, _load_alias)
                ctx.enter_context(hooks)
                stash.output = self.run(inputs)
                if head is not None:
                    stash.loss = head(stash.output)
        finally:
            self._capturing = None
        if uses is not None:
            calls = [module for module, _ in stash.captures]
            problem = split_problem(self.describe(), uses.stray, shared_uses(self, calls))
            self.split_safe = problem is None
            if problem is not None:
                warnings.warn(problem, stacklevel=2)
        # W will need the captured outputs' graph nodes, not their values (anything a backward
        # reads was saved as an alias); only the stage output must survive, to be sent
        sent = {id(t) for t in flatten(stash.output)[0]}
        free_unsaved([t for _, outs in stash.captures for t in outs if id(t) not in sent])
        return stash

    def forward_step(
        self,
        mb: int,
        value: Any,
        head: LossHead | None,
        recompute: bool,
        capture: bool,
        needs_grad: list[bool] | None = None,
    ) -> tuple[Any, torch.Tensor | None]:
        """Run micro-batch ``mb`` forward; return (output, loss or None) and stash for backward.

        ``needs_grad`` marks the inputs whose gradient the previous stage waits for (what it
        sent); None means every floating-point input after the first stage."""
        if needs_grad is None and self.index > 0:
            needs_grad = [t.is_floating_point() for t in flatten(value)[0]]
        inputs = _prepare_inputs(value, needs_grad)
        if recompute:
            rng = torch.get_rng_state()
            with torch.no_grad():
                output = self.run(inputs)
                loss = head(output) if head is not None else None
            flags = output_grad_flags(output, recompute=True)
            self.stash[mb] = Stash(inputs=inputs, rng_state=rng, grad_outputs=flags)
            return output, loss
        stash = self._forward_graph(mb, inputs, head, capture)
        stash.grad_outputs = output_grad_flags(stash.output, recompute=False)
        self.stash[mb] = stash
        return stash.output, stash.loss

    def _materialize(self, mb: int, head: LossHead | None, capture: bool) -> Stash:
        stash = self.stash[mb]
        if stash.rng_state is not None:  # recomputed: run again with the forward's RNG
            flags = stash.grad_outputs
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(stash.rng_state)
                stash = self._forward_graph(mb, stash.inputs, head, capture)
            stash.grad_outputs = flags
            self.stash[mb] = stash
        return stash

    def _roots(
        self, stash: Stash, grads: list[torch.Tensor] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if stash.loss is not None:
            return ([stash.loss] if stash.loss.requires_grad else []), None
        # the outputs marked at the forward get a gradient back (zeros if unused); a caller
        # that passes one for every floating-point output is understood too
        tensors = flatten(stash.output)[0]
        floats = [t for t in tensors if t.is_floating_point()]
        flags = stash.grad_outputs
        marked = floats if flags is None else [t for t, f in zip(tensors, flags, strict=True) if f]
        count = 0 if grads is None else len(grads)
        outs = marked if count == len(marked) else floats
        if grads is None or count != len(outs):
            raise RuntimeError(
                f"{self.describe()}: got {count} output gradients for {len(marked)} outputs "
                f"that need one"
            )
        for o, g in zip(outs, grads, strict=True):
            if o.shape != g.shape and o.numel() > 0:
                raise RuntimeError(
                    f"{self.describe()}: gradient of shape {tuple(g.shape)} for an output of "
                    f"shape {tuple(o.shape)}"
                )
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def backward_step(
        self, mb: int, grads: list[torch.Tensor] | None, head: LossHead | None
    ) -> list[torch.Tensor]:
        """Full backward of ``mb``; accumulate parameter grads; return the input gradients."""
        stash = self._materialize(mb, head, capture=False)
        roots, grads = self._roots(stash, grads)
        leaves = _grad_leaves(stash.inputs)
        _run_backward(roots, grads, [], keep=False)
        del self.stash[mb]
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]

    def input_grad_step(
        self, mb: int, grads: list[torch.Tensor] | None, head: LossHead | None
    ) -> list[torch.Tensor]:
        """I: gradients of the inputs (returned) and of every module output (kept for W).

        On a stage whose backward cannot be split (``split_safe`` False), the whole backward."""
        stash = self._materialize(mb, head, capture=True)
        if self.split_safe is False:
            in_grads = self.backward_step(mb, grads, head)
            self.stash[mb] = Stash(inputs=None)  # nothing left for W
            return in_grads
        roots, grads = self._roots(stash, grads)
        leaves = _grad_leaves(stash.inputs)
        captured = [t for _, outs in stash.captures for t in outs]
        result = _run_backward(roots, grads, leaves + captured, keep=True)
        stash.capture_grads = list(result[len(leaves) :])
        stash.output = stash.loss = None
        for _, outs in stash.captures:  # W needs their graph nodes; saved values stay aliased
            free_unsaved(outs)
        return [
            g if g is not None else torch.zeros_like(t)
            for t, g in zip(leaves, result, strict=False)
        ]

    def weight_grad_step(self, mb: int) -> None:
        """W: parameter gradients from the output gradients that I kept; frees the stash."""
        stash = self.stash.pop(mb)
        grads = iter(stash.capture_grads)
        for module, outs in stash.captures:
            out_grads = [next(grads) for _ in outs]
            pairs = [(o, g) for o, g in zip(outs, out_grads, strict=True) if g is not None]
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not pairs or not params:
                continue
            # outputs may have been freed after sending: go through the engine, not autograd.grad
            got = _run_backward([o for o, _ in pairs], [g for _, g in pairs], params, keep=True)
            for p, g in zip(params, got, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
