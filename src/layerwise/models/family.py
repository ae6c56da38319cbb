"""The interface a model family implements, and the registry of families by name.

A family is what the job and the planner need to know about one kind of model: its layers
(zero-argument factories, so that a pipeline worker builds only its own), the loss (kept
outside the model, as a pipeline runtime wants it), the parameters tied across layers, each
layer's tensor-parallel plan, the layouts the model cannot be split into, and the costs the
planner measures. Nothing outside ``models/`` needs to know which family it runs, so a new
family is one module that subclasses :class:`ModelFamily` plus one registry entry.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from layerwise.parallel.mesh import Grid, check_grid

if TYPE_CHECKING:  # only for annotations: torch's tensor-parallel package is slow to import
    from torch.distributed.device_mesh import DeviceMesh

    from layerwise.parallel.tensor import TensorParallelPlan

LayerFactory = Callable[[], nn.Module]
"""Builds one layer of the pipeline, on CPU, with the same weights in any process."""

TiedParameter = tuple[int, str, int, str]
"""(layer, parameter name, layer, parameter name): two parameters that must stay equal."""


class ModelFamily(ABC):
    """One kind of model, split into the list of layers that the partitioner cuts into stages.

    Subclasses set ``name`` (the registry key) and implement the abstract methods; the others
    have defaults that suit a model without ties or tensor parallelism.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, **config: Any) -> ModelFamily:
        """Return the family built from keyword options (what :func:`get_family` passes on)."""

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """The number of layers the partitioner splits (embedding and head included)."""

    @abstractmethod
    def layers(self) -> list[LayerFactory]:
        """Return one factory per layer, in order; factories must pickle (spawned workers)."""

    @abstractmethod
    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        """Return the scalar loss of the last layer's ``output`` against ``target``."""

    @abstractmethod
    def check_layout(self, layout: Grid) -> None:
        """Raise ValueError if the model cannot be split as ``layout`` says (for instance tp
        does not divide the attention heads); :meth:`check` adds the rank grid's checks."""

    @abstractmethod
    def sample_layer(self, micro_batch: int) -> tuple[nn.Module, Tensor]:
        """Return (a representative layer, an input of ``micro_batch`` samples for it).

        The planner times this layer forward and backward and scales by the layer count, so
        it should be the layer the model repeats (a transformer block, not the embedding).
        """

    def tied_parameters(self) -> list[TiedParameter]:
        """Return the parameters that must stay equal across layers; none by default."""
        return []

    def lm_targets(self, tokens: Tensor, next_tokens: Tensor) -> Tensor:
        """Return the targets :meth:`loss_fn` expects for a language-model batch: ``tokens``
        (B, T) are the inputs and ``next_tokens`` the same text one token later. The default
        is ``next_tokens``; a family whose loss shifts labels itself returns ``tokens``."""
        return next_tokens

    def lm_batch(self, rows: Any) -> tuple[Any, Tensor]:
        """Return (inputs, targets) for a batch of token rows (``job.rows.RowBatch``: ids,
        labels with -100 where not counted, position ids, padding mask; each (B, T + 1)). The
        default feeds ids [:, :-1] and targets the labels one token later, for a model that
        takes token ids alone."""
        return rows.ids[:, :-1].contiguous(), rows.labels[:, 1:].contiguous()

    def embedding_rows(self) -> int | None:
        """How many token ids the model's embedding takes (None: not known)."""
        return None

    def loss_reduction(self) -> str | Callable[[Any], float]:
        """Return how a step weighs its micro-batches' losses (``Pipeline(loss_reduction=)``):
        ``rows`` (the default: by their number of samples), ``tokens``, or a function of a
        micro-batch's targets giving its weight."""
        return "rows"

    def tensor_parallel_plan(self, index: int, module: nn.Module) -> TensorParallelPlan:
        """Return how layer ``index`` (built as ``module``) is split over tensor-parallel ranks,
        as {submodule name: "col" | "row" | "shared_input"}; empty (the default) keeps the
        layer whole on every rank. See :mod:`layerwise.parallel.tensor` for the styles."""
        return {}

    def parallelize(self, index: int, module: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
        """Shard layer ``index`` over ``tp_mesh`` in place by its plan and return it: what a
        Pipeline's ``parallelize`` calls for every layer a worker builds."""
        from layerwise.parallel.tensor import apply_plan

        return apply_plan(module, tp_mesh, self.tensor_parallel_plan(index, module))

    def check(self, layout: Grid, world: int | None = None) -> None:
        """Raise ValueError, before any process group exists, if ``layout`` cannot run this
        model on ``world`` processes (None: not known yet): the grid's checks, then the model's."""
        check_grid(layout, world, self.num_layers, self.describe_layers())
        self.check_layout(layout)

    def describe_layers(self) -> str:
        """What the layers are, for messages (a family names its embedding and head); empty
        when there is nothing to add to their number."""
        return ""

    def parameter_counts(self) -> list[int]:
        """Return the number of parameters of each layer in order (tied copies in each layer).

        The default builds the layers one at a time; a family with a formula overrides it.
        """
        return [sum(p.numel() for p in factory().parameters()) for factory in self.layers()]


# A name maps to its class, or to "module:Class" for the built-in families, imported only when
# asked for: a family may need packages the others do not (Hugging Face's transformers).
FAMILIES: dict[str, type[ModelFamily] | str] = {
    "gpt": "layerwise.models.gpt:GPTFamily",
    "hf": "layerwise.models.hf:HFDecoderFamily",  # needs config=...
    "hf:gpt2": "layerwise.models.hf:HFGPT2Family",
    "hf:llama": "layerwise.models.hf:HFLlamaFamily",
    "hf:mistral": "layerwise.models.hf:HFMistralFamily",
    "hf:qwen2": "layerwise.models.hf:HFQwen2Family",
    "hf:gemma2": "layerwise.models.hf:HFGemma2Family",
    "hf:phi3": "layerwise.models.hf:HFPhi3Family",
}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Add ``cls`` to the registry under ``cls.name`` and return it (usable as a decorator)."""
    if cls.name in FAMILIES:
        raise ValueError(
            f"a model family named {cls.name!r} is already registered; pick another name"
        )
    FAMILIES[cls.name] = cls
    return cls


def family_names() -> list[str]:
    """Return the names of the registered model families, sorted."""
    return sorted(FAMILIES)


def family_class(name: str) -> type[ModelFamily]:
    """Return the registered family class called ``name``; ValueError lists the known names."""
    entry = FAMILIES.get(name)
    if entry is None:
        raise ValueError(
            f"unknown model family {name!r}; known families: {', '.join(family_names())}"
        )
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attribute)
        except ImportError as err:  # a family whose optional packages are not installed
            raise ValueError(f"the model family {name!r} is not available: {err}") from err
        FAMILIES[name] = entry
    return entry


def get_family(name: str, **config: Any) -> ModelFamily:
    """Return the family ``name`` built from ``config`` (the family's own options)."""
    return family_class(name).from_config(**config)
