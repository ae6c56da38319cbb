"""Weights of one pipeline layer of a Hugging Face model, without the rest of the model.

The whole model is built once per process on the ``meta`` device (no memory), each layer is
cut out of it, and only the layers a worker holds are materialized: initialized the way the
model initializes itself (its ``_init_weights``, applied children first as ``post_init``
does), then, with a checkpoint, overwritten by the tensors of that layer alone, read from
``save_pretrained``'s safetensors files (one file, or shards with their index).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwise.models.hf_layers import HFLayer, Parts, model_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Source:
    """What any process needs to rebuild the model's layers: picklable and hashable."""

    config_json: str  # the model's configuration, as config.to_json_string()
    checkpoint: str | None = None  # a save_pretrained directory, or None: initialize
    attn_implementation: str | None = None  # sdpa, eager, ...; None: the library's default
    # the HFDecoderFamily class whose find_parts and make_layers cut the model (importable,
    # so that spawned workers can unpickle it)
    family: Any = None

    def config(self) -> Any:
        """Return the model's configuration object."""
        from transformers import AutoConfig

        data = json.loads(self.config_json)
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)


@functools.lru_cache(maxsize=4)
def skeleton(source: Source) -> Any:
    """Return the whole causal LM on the meta device (built once per process and source)."""
    from transformers import AutoModelForCausalLM

    options = (
        {}
        if source.attn_implementation is None
        else {"attn_implementation": source.attn_implementation}
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(source.config(), **options)


@functools.lru_cache(maxsize=4)
def skeleton_parts(source: Source) -> Parts:
    """Return where the pieces of ``source``'s model live (its family's find_parts)."""
    return source.family.find_parts(skeleton(source))


def num_blocks(source: Source) -> int:
    return len(skeleton(source).get_submodule(skeleton_parts(source).blocks))


class MetaLayer:
    """Pipeline layer ``index`` of ``source``: calling it returns the layer on the meta device,
    which the pipeline materializes (:meth:`HFLayer.materialize`) only on its worker."""

    def __init__(self, source: Source, index: int) -> None:
        self.source, self.index = source, index

    def __call__(self) -> HFLayer:
        model = skeleton(self.source)
        parts = skeleton_parts(self.source)
        (layer,) = self.source.family.make_layers(model, parts, [self.index]).values()
        # a copy, so that materializing it never touches the shared skeleton; the config
        # stays shared (every block reads the same one)
        layer = copy.deepcopy(layer, memo={id(model.config): model.config})
        layer.source, layer.index = self.source, self.index
        return layer

    def __reduce__(self) -> tuple[Any, ...]:
        return (MetaLayer, (self.source, self.index))


def materialize(
    layer: nn.Module, source: Source, index: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """Allocate ``layer`` (built by :class:`MetaLayer`) on the CPU, initialize it as the model
    does, load its tensors from the checkpoint if there is one, and return it.

    The tensors are filled with NaN first, so that one the model's initialization does not
    set (and no checkpoint holds) is caught here instead of training on garbage. ``device``
    is where the caller will move it; initializing on the CPU gives the same weights on
    every device."""
    del device  # initialized on the CPU: the same random draws whatever the device
    layer = layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
        init = skeleton(source)._init_weights
        for module in _children_first(layer):
            init(module)
        if source.checkpoint is not None:
            load_layer(layer, source, index)
    _check_initialized(layer, index, source.checkpoint)
    return layer


def _children_first(module: nn.Module) -> list[nn.Module]:
    """Submodules in the order post_init initializes them: each one's children before it."""
    order: list[nn.Module] = []
    for child in module.children():
        order += _children_first(child)
    return [*order, module]


def _check_initialized(layer: nn.Module, index: int, checkpoint: str | None) -> None:
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            where = (
                f"and the checkpoint {checkpoint} has no value for it"
                if checkpoint
                else ("(no checkpoint was given)")
            )
            raise ValueError(
                f"pipeline layer {index}: the model's _init_weights left {name!r} unset "
                f"{where}; load it from a save_pretrained checkpoint (checkpoint=...) or set it "
                f"in a subclass of HFDecoderFamily"
            )


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """Return {tensor name: the safetensors file that holds it} for a save_pretrained
    directory (one file, or shards listed by their index)."""
    root = Path(directory)
    index = root / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    single = root / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(
            f"{root} holds neither {SINGLE_FILE} nor {INDEX_FILE}; give the directory that "
            f"save_pretrained wrote (safetensors weights)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_layer(layer: nn.Module, source: Source, index: int) -> None:
    """Copy into ``layer`` its tensors from the checkpoint, opening only the files that hold
    them and reading only those tensors; ValueError names a parameter it lacks. A head tied
    to the token embedding is read from the embedding's tensor, as save_pretrained keeps
    only that one."""
    from safetensors import safe_open

    assert source.checkpoint is not None
    files = checkpoint_files(source.checkpoint)
    parts, n = skeleton_parts(source), num_blocks(source)
    prefix = parts.embed.partition(".")[0] + "."
    wanted: dict[Path, list[tuple[str, str]]] = {}
    missing = []
    params = dict(layer.named_parameters())
    for local in layer.state_dict():
        name = model_name(parts, index, n, local)
        if _tied_away(source, parts, name):  # saved once, as the token embedding
            name = f"{parts.embed}.weight"
        # checkpoints saved from the base model alone name tensors without its prefix
        found = name if name in files else name.removeprefix(prefix)
        if found in files:
            wanted.setdefault(files[found], []).append((local, found))
        elif local in params:
            missing.append(name)
    if missing:
        raise ValueError(
            f"checkpoint {source.checkpoint} has no {', '.join(missing)} for pipeline layer "
            f"{index}; was it written by save_pretrained of this model and configuration?"
        )
    state = layer.state_dict()
    for path, names in wanted.items():
        with safe_open(str(path), framework="pt") as f:
            for local, found in names:
                state[local].copy_(f.get_tensor(found))


def _tied_away(source: Source, parts: Parts, name: str) -> bool:
    """Return True for the head of a model whose token embedding is tied to it."""
    return name == f"{parts.head}.weight" and bool(
        getattr(skeleton(source).config, "tie_word_embeddings", False)
    )
