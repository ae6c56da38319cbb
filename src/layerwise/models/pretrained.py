"""A model directory as a model family: what ``Pipeline.from_pretrained`` reads.

A directory that ``save_pretrained`` wrote (a Hugging Face decoder, read through
:func:`layerwise.models.hf.hf_family`), or one that ``layerwise export`` wrote from our own
GPT (``config.json`` with ``model_type`` ``layerwise-gpt`` and ``model.safetensors`` named by
layer index). Either way each worker reads only its own layers' tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from layerwise.models.family import ModelFamily
from layerwise.models.safetensors_io import load_prefixed

GPT_TYPE = "layerwise-gpt"  # model_type of an exported GPT's config.json
# an exported GPT's config.json key (the job's flag name) -> its GPTConfig field
GPT_FIELDS = {"layers": "n_layers", "d_model": "d_model", "heads": "n_heads",
              "seq_len": "seq_len", "tie_embeddings": "tie_embeddings",
              "vocab_size": "vocab_size"}  # fmt: skip


def family_from_dir(path: str | Path, **options: Any) -> ModelFamily:
    """The family of the model in ``path``, its weights read from there; ``options`` go to
    a Hugging Face family (``attn_implementation``, ``family``)."""
    root = Path(path)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{root} holds no config.json; give a directory that save_pretrained or "
            f"layerwise export wrote"
        )
    data = json.loads(config.read_text())
    if data.get("model_type") == GPT_TYPE:
        from layerwise.models.gpt import GPTConfig, GPTFamily

        sizes = {field: data[key] for key, field in GPT_FIELDS.items() if key in data}
        return GPTFamily(GPTConfig(**sizes), weights=str(root / "model.safetensors"))
    from layerwise.models.hf import hf_family

    return hf_family(root, family=options.get("family"))


class PretrainedLayer:
    """Layer ``index`` built as usual, then overwritten by its tensors in an exported model's
    ``model.safetensors`` (named by layer index: '3.mlp.fc_in.weight'); picklable."""

    def __init__(self, config: Any, index: int, weights: str) -> None:
        self.config, self.index, self.weights = config, index, weights

    def __call__(self) -> nn.Module:
        from layerwise.models.gpt import _build_layer

        module = _build_layer(self.config, self.index)
        load_prefixed(module, self.weights, f"{self.index}.")
        return module
