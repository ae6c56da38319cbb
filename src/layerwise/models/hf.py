"""Hugging Face decoder-only models as a model family, with no glue to write.

``get_family("hf:llama")`` (or ``hf:gpt2``, ``hf:mistral``, ``hf:qwen2``, ``hf:gemma2``,
``hf:phi3``) is a small built-in configuration of that architecture (byte vocabulary, 256
tokens) for ``layerwise train``; ``config=`` gives one's own (a config object, a dict, a
``config.json`` or a ``save_pretrained`` directory) and ``checkpoint=`` its weights.
:meth:`layerwise.Pipeline.from_hf` builds a pipeline from a model, a configuration or a
directory through this family.

The layers are ``[embeddings, block 0 .. block L-1, final norm + head]``
(:mod:`layerwise.models.hf_layers`); built from a configuration, each is cut out of the
model on the ``meta`` device and only a worker's own are materialized, initialized the way
the model initializes itself or read from the checkpoint, tensor by tensor
(:mod:`layerwise.models.hf_weights`). The loss is the model's own causal-LM loss (labels
shifted inside, ``-100`` ignored), and micro-batches are weighted by their counted tokens, so
that a pipeline step returns exactly ``model(input_ids, labels=labels).loss``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from layerwise.models.family import LayerFactory, ModelFamily, TiedParameter
from layerwise.parallel.tensor import TensorParallelPlan

try:
    import transformers
except ImportError as err:  # an optional extra: say how to get it
    raise ImportError(
        "the hf:* model families need Hugging Face transformers: "
        "pip install 'layerwise[hf]' (or pip install 'transformers>=5.0,<6')"
    ) from err

from layerwise.models.hf_layers import (
    Parts,
    SoloBlock,
    check_forward_scales,
    find_parts,
    make_layers,
    model_name,
)
from layerwise.models.hf_tp import block_plan, check_tensor_parallel
from layerwise.models.hf_weights import (
    INDEX_FILE,
    SINGLE_FILE,
    MetaLayer,
    Source,
    materialize,
    skeleton_parts,
)

if TYPE_CHECKING:
    from layerwise.parallel.mesh import Grid

# the architectures whose pipeline loss and gradients are checked against the model's own
VERIFIED = ("gpt2", "llama", "mistral", "qwen2", "gemma2", "phi3")
IGNORE_INDEX = -100  # labels the loss skips (Hugging Face's convention)


def builtin_config(
    model_type: str,
    seq_len: int = 128,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    tie_embeddings: bool = False,
) -> Any:
    """Return a small configuration of ``model_type`` for byte-level text (vocabulary 256),
    without dropout, sized like the job's GPT (``--layers``, ``--d-model``, ``--heads``)."""
    common: dict[str, Any] = {
        "vocab_size": 256,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if model_type == "gpt2":
        sizes: dict[str, Any] = {
            "n_embd": d_model,
            "n_layer": n_layers,
            "n_head": n_heads,
            "n_positions": seq_len,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        head_dim = d_model // n_heads
        sizes = {
            "hidden_size": d_model,
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "head_dim": head_dim,
            "num_key_value_heads": n_heads // 2 if n_heads % 2 == 0 else n_heads,
            "intermediate_size": 4 * d_model,
            "max_position_embeddings": seq_len,
        }
        if model_type == "gemma2":  # its defaults assume head_dim 256
            sizes["query_pre_attn_scalar"] = head_dim
    return transformers.AutoConfig.for_model(model_type, **common, **sizes)


def read_config(config: Any) -> Any:
    """Return a configuration object from an object, a dict, a config.json or a directory."""
    if isinstance(config, transformers.PreTrainedConfig):
        return config
    if isinstance(config, dict):
        data = dict(config)
    else:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(
                f"no Hugging Face configuration at {path}; give a "
                f"config.json or a directory that save_pretrained wrote"
            )
        data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError("the configuration has no model_type; write it as save_pretrained does")
    model_type = data.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **data)


def label_tokens(labels: Tensor) -> int:
    """Return how many labels the causal-LM loss counts: all but the first of each row (the
    loss shifts labels by one), less those equal to -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class HFDecoderFamily(ModelFamily):
    """A Hugging Face causal LM as the list [embeddings, blocks..., final norm + head].

    ``config``: the model's configuration; ``model``: a built model whose own modules become
    the layers (its weights, shared), or None to build layers from ``config`` on demand;
    ``checkpoint``: a ``save_pretrained`` directory to read the weights from."""

    name = "hf"
    model_type: ClassVar[str | None] = None  # fixed by the registered hf:<type> families

    def __init__(
        self,
        config: Any,
        model: nn.Module | None = None,
        checkpoint: str | Path | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        config = read_config(config)
        if self.model_type is not None and config.model_type != self.model_type:
            raise ValueError(
                f"the {self.name} family got a configuration of model_type "
                f"{config.model_type!r}; use hf:{config.model_type} (or plain hf)"
            )
        check_forward_scales(config)
        if config.model_type not in VERIFIED:
            warnings.warn(
                f"layerwise has not checked {config.model_type!r} models against their own "
                f"forward (it has: {', '.join(VERIFIED)}); compare a step's loss with the "
                f"model's before training on it",
                stacklevel=2,
            )
        self.config = config
        self.model = model
        ckpt = None if checkpoint is None else str(Path(checkpoint).resolve())
        attn = attn_implementation or (
            getattr(model.config, "_attn_implementation", None) if model is not None else None
        )
        self.source = Source(config.to_json_string(), ckpt, attn, type(self))
        self.parts = self.find_parts(model) if model is not None else None

    @classmethod
    def from_config(cls, **options: Any) -> HFDecoderFamily:
        """Return the family from keyword options: ``config`` (object, dict, config.json or
        directory; default: :func:`builtin_config` of this family's type sized by
        ``seq_len``, ``d_model``, ``n_layers``, ``n_heads``, ``tie_embeddings``),
        ``checkpoint``, ``attn_implementation``; ``seed`` is accepted for the job's sake (the
        weights follow ``Pipeline(seed=...)``). ValueError names unknown options."""
        sizes = ("seq_len", "d_model", "n_layers", "n_heads", "tie_embeddings")
        known = ("config", "checkpoint", "attn_implementation", "seed", *sizes)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"the {cls.name} model family has no option {unknown}; its options: {list(known)}"
            )
        config = options.get("config")
        if config is None:
            if cls.model_type is None:
                raise ValueError(
                    "the hf family needs config=...; or name the architecture, "
                    "as in hf:llama, for a small built-in one"
                )
            config = builtin_config(
                cls.model_type, **{k: options[k] for k in sizes if options.get(k) is not None}
            )
        family = cls(
            config,
            checkpoint=options.get("checkpoint"),
            attn_implementation=options.get("attn_implementation"),
        )
        seq_len = options.get("seq_len")
        limit = getattr(family.config, "max_position_embeddings", None)
        if seq_len is not None and limit is not None and seq_len > limit:
            raise ValueError(
                f"--seq-len {seq_len} is longer than the model's "
                f"max_position_embeddings ({limit}); use --seq-len {limit} or less"
            )
        return family

    # -- the layers ---------------------------------------------------------------------------

    @classmethod
    def find_parts(cls, model: Any) -> Parts:
        """Return where the embeddings, blocks, final norm and head of ``model`` live; a
        subclass for a model laid out otherwise overrides it (or raises naming what is
        missing)."""
        return find_parts(model)

    @classmethod
    def make_layers(
        cls, model: Any, parts: Parts, indices: list[int] | None = None
    ) -> dict[int, nn.Module]:
        """Return the pipeline layers ``indices`` (all when None) around ``model``'s modules;
        a subclass for a model whose forward does more between its pieces overrides it (and
        :meth:`model_name` if its layers name their children otherwise)."""
        return dict(make_layers(model, parts, indices))

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_layers(self) -> int:
        return self.num_blocks + 2

    def describe_layers(self) -> str:
        return f"{self.num_blocks} {self.config.model_type} blocks plus the embedding and the head"

    def layers(self) -> list[LayerFactory]:
        """The model's own modules when built from a model; else one factory per layer that
        returns it on the meta device, materialized by the pipeline on its worker only."""
        if self.model is not None:
            assert self.parts is not None
            built = self.make_layers(self.model, self.parts)
            return [built[i] for i in range(self.num_layers)]
        return [MetaLayer(self.source, i) for i in range(self.num_layers)]

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        """The model's causal-LM loss: logits (B, T, V), labels (B, T), shifted inside."""
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(output, target, vocab_size=output.shape[-1])

    def lm_targets(self, tokens: Tensor, next_tokens: Tensor) -> Tensor:
        """The inputs themselves: the model's loss shifts its labels."""
        return tokens

    def lm_batch(self, rows: Any) -> tuple[Any, Tensor]:
        """The model's own inputs (ids, position ids restarting per document, the padding
        mask when rows are padded) and its labels, which it shifts itself."""
        inputs = {"input_ids": rows.ids[:, :-1].contiguous(),
                  "position_ids": rows.positions[:, :-1].contiguous()}  # fmt: skip
        if rows.mask is not None:
            inputs["attention_mask"] = rows.mask[:, :-1].contiguous()
        return inputs, rows.labels[:, :-1].contiguous()

    def embedding_rows(self) -> int | None:
        return int(self.config.vocab_size)

    def loss_reduction(self) -> Any:
        """Micro-batches weigh by their counted labels, as the model averages over tokens."""
        return label_tokens

    def tied_parameters(self) -> list[TiedParameter]:
        if not getattr(self.config, "tie_word_embeddings", False):
            return []
        return [(0, "tokens.weight", self.num_layers - 1, "head.weight")]

    def model_name(self, name: str) -> str:
        """Return the model's name of a pipeline parameter ('3.block.mlp.up_proj.weight' ->
        'model.layers.2.mlp.up_proj.weight'), as in its state dict and checkpoints."""
        index, _, local = name.partition(".")
        parts = self.parts if self.parts is not None else skeleton_parts(self.source)
        return model_name(parts, int(index), self.num_blocks, local)

    def check_layout(self, layout: Grid) -> None:
        if layout.tp > 1:  # a block built on the meta device says whether it can be split
            block_plan(MetaLayer(self.source, 1)())
            check_tensor_parallel(self.config, layout.tp)

    def tensor_parallel_plan(self, index: int, module: nn.Module) -> TensorParallelPlan:
        """Blocks split as Llama's (:mod:`layerwise.models.hf_tp`); the rest stays whole."""
        return block_plan(module) if 1 <= index <= self.num_blocks else {}

    def sample_layer(self, micro_batch: int) -> tuple[nn.Module, Tensor]:
        """Return block 0 (fed hidden states alone) and hidden states of (micro_batch, T, C)."""
        if self.model is not None:
            assert self.parts is not None
            block: nn.Module = self.make_layers(self.model, self.parts, [1])[1]
        else:
            block = materialize(MetaLayer(self.source, 1)(), self.source, 1)
        seq = min(int(getattr(self.config, "max_position_embeddings", 128)), 256)
        gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
        hidden = torch.randn(micro_batch, seq, self.config.hidden_size, generator=gen)
        return SoloBlock(block), hidden


def hf_family(
    source: Any,
    checkpoint: str | Path | None = None,
    family: type[HFDecoderFamily] | None = None,
) -> HFDecoderFamily:
    """Return the family (``family``, by default :class:`HFDecoderFamily`) of a model (its
    own modules), a configuration (object or dict), or a path: a config.json, or a
    save_pretrained directory, whose weights it reads unless ``checkpoint`` names another."""
    cls = HFDecoderFamily if family is None else family
    if isinstance(source, nn.Module):
        if checkpoint is not None:
            raise ValueError(
                "a built model brings its own weights; give its configuration "
                "instead of the model to read them from a checkpoint"
            )
        return cls(source.config, model=source)
    weights = (
        [Path(source) / SINGLE_FILE, Path(source) / INDEX_FILE]
        if isinstance(source, str | Path)
        else []
    )
    if checkpoint is None and any(w.exists() for w in weights):
        checkpoint = Path(source)
    return cls(source, checkpoint=checkpoint)


class HFGPT2Family(HFDecoderFamily):
    name, model_type = "hf:gpt2", "gpt2"


class HFLlamaFamily(HFDecoderFamily):
    name, model_type = "hf:llama", "llama"


class HFMistralFamily(HFDecoderFamily):
    name, model_type = "hf:mistral", "mistral"


class HFQwen2Family(HFDecoderFamily):
    name, model_type = "hf:qwen2", "qwen2"


class HFGemma2Family(HFDecoderFamily):
    name, model_type = "hf:gemma2", "gemma2"


class HFPhi3Family(HFDecoderFamily):
    name, model_type = "hf:phi3", "phi3"
