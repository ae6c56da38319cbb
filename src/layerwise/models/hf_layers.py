"""A Hugging Face causal LM cut into pipeline layers: embeddings, each decoder block, head.

The model's own modules do the work; the wrappers here only carry what the model's forward
computes once and hands to every block. Between layers travel the hidden states, the 2-D
padding mask as the user gave it (or None), and the position ids (integers, never a
gradient), so that what a stage sends depends only on the batch's shapes and keys. Each
block recomputes from them what it needs: its causal (or sliding-window) attention mask and
the rotary embeddings ``(cos, sin)`` from its own copy of the model's ``rotary_emb``.
Packed sequences work as in the model itself: without a padding mask, position ids that
restart at 0 mark where each document begins, and the model's own mask builder keeps every
document to itself.

:func:`find_parts` says where these pieces live in a model, and fails naming any submodule
it cannot place, so that a model with more in its forward is refused rather than run wrong.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# Where each piece usually lives, by attribute name under the base model.
POSITION_NAMES = ("wpe", "embed_positions")
DROPOUT_NAMES = ("drop", "embed_dropout", "dropout")
BLOCK_LIST_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm")
ROTARY_NAMES = ("rotary_emb",)
MASK_KINDS = ("full_attention", "sliding_attention")
# configuration values some models apply in their own forward, outside any module, and their
# neutral value: the pipeline's layers would silently leave them out
FORWARD_SCALES = {
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "embedding_multiplier": 1.0,
    "scale_emb": 1.0,
}
HOW_TO_DESCRIBE = (
    "describe the model in a subclass of layerwise.models.hf.HFDecoderFamily that overrides "
    "find_parts (where each piece lives) and make_layers (what each pipeline layer does), "
    "and pass it as Pipeline.from_hf(..., family=YourFamily)"
)


@dataclass(frozen=True)
class Parts:
    """Dotted paths, from the causal LM's root, of the pieces the pipeline layers hold."""

    embed: str  # token embedding
    blocks: str  # the ModuleList of decoder blocks
    norm: str  # final norm
    head: str  # language-model head
    positions: str | None = None  # learned position embedding (GPT-2's wpe)
    dropout: str | None = None  # dropout after the embeddings
    rotary: str | None = None  # rotary embedding module (cos, sin)


def _child_name(parent: nn.Module, child: nn.Module) -> str | None:
    return next((n for n, m in parent.named_children() if m is child), None)


def _pick(base: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(base, n, None), nn.Module)), None)


def find_parts(model: Any) -> Parts:
    """Return where the embeddings, blocks, final norm and head of ``model`` live.

    Raises ValueError naming any submodule that has no place among them, or a missing piece.
    """
    kind = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        raise ValueError(f"{kind} has no base model under {prefix!r}; {HOW_TO_DESCRIBE}")
    embed = _child_name(base, model.get_input_embeddings())
    head = _child_name(model, model.get_output_embeddings())
    blocks = _pick(base, BLOCK_LIST_NAMES)
    norm = _pick(base, NORM_NAMES)
    missing = [
        what
        for what, name in (
            ("token embedding", embed),
            ("decoder block list", blocks),
            ("final norm", norm),
            ("language-model head", head),
        )
        if name is None
    ]
    if missing:
        raise ValueError(f"{kind}: found no {', '.join(missing)}; {HOW_TO_DESCRIBE}")
    assert embed is not None and blocks is not None and norm is not None and head is not None
    parts = Parts(
        embed=f"{prefix}.{embed}",
        blocks=f"{prefix}.{blocks}",
        norm=f"{prefix}.{norm}",
        head=head,
        positions=_dotted(prefix, _pick(base, POSITION_NAMES)),
        dropout=_dotted(prefix, _pick(base, DROPOUT_NAMES)),
        rotary=_dotted(prefix, _pick(base, ROTARY_NAMES)),
    )
    _check_nothing_left(model, parts)
    return parts


def _dotted(prefix: str, name: str | None) -> str | None:
    return None if name is None else f"{prefix}.{name}"


def _check_nothing_left(model: nn.Module, parts: Parts) -> None:
    """Every child of the model and of its base model is one of the parts (else ValueError)."""
    placed = {
        p
        for p in (
            parts.embed,
            parts.blocks,
            parts.norm,
            parts.head,
            parts.positions,
            parts.dropout,
            parts.rotary,
        )
        if p is not None
    }
    prefix = parts.embed.rpartition(".")[0]
    names = [n for n, _ in model.named_children() if n != prefix]
    names += [f"{prefix}.{n}" for n, _ in model.get_submodule(prefix).named_children()]
    stray = [n for n in names if n not in placed]
    if stray:
        kinds = ", ".join(f"{n!r} ({type(model.get_submodule(n)).__name__})" for n in stray)
        raise ValueError(
            f"{type(model).__name__} has {kinds}, which the hf family cannot place among the "
            f"embeddings, the decoder blocks, the final norm and the head; {HOW_TO_DESCRIBE}"
        )


def check_forward_scales(config: Any) -> None:
    """Raise ValueError if the configuration sets a value that the model's forward applies
    outside its modules (Cohere's logit_scale, Granite's multipliers), which the layers here
    would leave out."""
    found = {
        k: getattr(config, k)
        for k, neutral in FORWARD_SCALES.items()
        if getattr(config, k, None) not in (None, neutral)
    }
    if found:
        raise ValueError(
            f"{config.model_type} models apply {found} in their own forward, outside any "
            f"module, which the hf family does not do; {HOW_TO_DESCRIBE}"
        )


def check_block(block: nn.Module, rotary: bool) -> None:
    """Raise ValueError unless ``block`` takes what the pipeline gives every block."""
    params = inspect.signature(block.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = ["attention_mask"] + (["position_embeddings"] if rotary else [])
    missing = [n for n in wanted if n not in params and not takes_any]
    required = [
        n
        for i, (n, p) in enumerate(params.items())
        if i > 0
        and p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if missing or required:
        what = missing + [f"{n} (required, and not given by the pipeline)" for n in required]
        raise ValueError(
            f"{type(block).__name__}.forward does not fit the pipeline's call "
            f"block(hidden_states, attention_mask=..., position_ids=..."
            f"{', position_embeddings=...' if rotary else ''}): {', '.join(what)}; "
            f"{HOW_TO_DESCRIBE}"
        )


def check_rotary(rotary: nn.Module) -> None:
    """Raise ValueError unless ``rotary`` is called as the pipeline calls it: (x, position_ids)."""
    params = list(inspect.signature(rotary.forward).parameters.values())[2:]
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise ValueError(
            f"{type(rotary).__name__}.forward also needs {', '.join(required)}, which the "
            f"pipeline's call rotary(hidden_states, position_ids) does not give; "
            f"{HOW_TO_DESCRIBE}"
        )


def mask_kind(config: Any, index: int) -> str:
    """Return the attention of block ``index``: full_attention or sliding_attention."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        kind = str(types[index])
    else:
        kind = (
            "full_attention"
            if getattr(config, "sliding_window", None) is None
            else ("sliding_attention")
        )
    if kind not in MASK_KINDS:
        raise ValueError(
            f"block {index} uses {kind!r} attention; the hf family builds masks for "
            f"{' and '.join(MASK_KINDS)} only; {HOW_TO_DESCRIBE}"
        )
    return kind


def positions(hidden: Tensor) -> Tensor:
    """Return the position ids the model's own forward uses without a cache: (1, T)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


Carried = tuple[Tensor, Tensor | None, Tensor]  # hidden, padding mask or None, position ids


class HFLayer(nn.Module):
    """A pipeline layer of the model; one built on the meta device knows where its weights
    come from (``source``, set by :class:`~layerwise.models.hf_weights.MetaLayer`)."""

    source: Any = None  # hf_weights.Source
    index: int = -1  # its place in the pipeline's list of layers

    def materialize(self, device: torch.device | str = "cpu") -> nn.Module:
        """Return this layer allocated and initialized (or read from the checkpoint)."""
        if self.source is None:
            raise ValueError(
                f"{type(self).__name__} was cut out of a model on the meta device, which has "
                f"no weights to give; pass the model's configuration (or save_pretrained "
                f"directory) to Pipeline.from_hf instead of the model"
            )
        from layerwise.models.hf_weights import materialize

        return materialize(self, self.source, self.index, device)


class HFEmbedding(HFLayer):
    """input_ids (B, T) [, attention_mask (B, T)] [, position_ids (B, T)] -> (hidden (B, T, C),
    padding mask (B, T) or None, position ids (B or 1, T))."""

    def __init__(
        self, tokens: nn.Module, positions: nn.Module | None, dropout: nn.Module | None
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.dropout = dropout

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Carried:
        limit = getattr(self.positions, "num_embeddings", None)  # learned positions (GPT-2)
        if position_ids is None and limit is not None and input_ids.shape[1] > limit:
            raise ValueError(
                f"a sequence of {input_ids.shape[1]} tokens is longer than the model's "
                f"{limit} positions; cut the batch to {limit} tokens or fewer"
            )
        hidden = self.tokens(input_ids)  # (B, T, C)
        pos = positions(hidden) if position_ids is None else position_ids
        if self.positions is not None:
            hidden = hidden + self.positions(pos)
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        # the mask as given (a batch with one sends one, whether it pads or not): the model
        # treats "no mask" otherwise (packed sequences are read from the position ids)
        mask = None if attention_mask is None else (attention_mask != 0).long()
        return hidden, mask, pos


class HFBlock(HFLayer):
    """One decoder block: (hidden, padding mask) -> (hidden, the same mask).

    ``config`` is the model's configuration (it says which attention and mask to build);
    ``kind`` is full_attention or sliding_attention."""

    def __init__(self, block: nn.Module, rotary: nn.Module | None, config: Any, kind: str) -> None:
        super().__init__()
        self.block = block
        self.rotary = rotary
        self.config = config
        self.kind = kind

    @property
    def wraps(self) -> nn.Module:
        """The model's own block, for messages."""
        return self.block

    def forward(self, hidden: Tensor, mask: Tensor | None, pos: Tensor) -> Carried:
        make = (
            create_causal_mask
            if self.kind == "full_attention"
            else (create_sliding_window_causal_mask)
        )
        attention = make(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            cache=None,
            position_ids=pos,
        )
        extra = {} if self.rotary is None else {"position_embeddings": self.rotary(hidden, pos)}
        out = self.block(hidden, attention_mask=attention, position_ids=pos, **extra)
        return (out[0] if isinstance(out, tuple) else out), mask, pos


class HFHead(HFLayer):
    """Final norm, language-model head and (Gemma 2) logit soft-capping: -> logits (B, T, V)."""

    def __init__(self, norm: nn.Module, head: nn.Module, softcap: float | None) -> None:
        super().__init__()
        self.norm = norm
        self.head = head
        self.softcap = softcap

    def forward(
        self, hidden: Tensor, mask: Tensor | None = None, pos: Tensor | None = None
    ) -> Tensor:
        logits = self.head(self.norm(hidden))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class SoloBlock(nn.Module):
    """A block that takes and returns hidden states alone (no padding), for timing."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, hidden: Tensor) -> Tensor:
        return self.inner(hidden, None, positions(hidden))[0]


def make_layers(model: Any, parts: Parts, indices: list[int] | None = None) -> dict[int, HFLayer]:
    """Return the pipeline layers ``indices`` (all when None) built around ``model``'s own
    modules: 0 the embeddings, 1..L the blocks, L+1 the head."""
    blocks = model.get_submodule(parts.blocks)
    assert isinstance(blocks, nn.ModuleList)
    n = len(blocks)
    config = model.config
    rotary = None if parts.rotary is None else model.get_submodule(parts.rotary)
    if rotary is not None:
        check_rotary(rotary)
    out: dict[int, HFLayer] = {}
    for i in range(n + 2) if indices is None else indices:
        if i == 0:
            out[i] = HFEmbedding(
                model.get_submodule(parts.embed),
                None if parts.positions is None else model.get_submodule(parts.positions),
                None if parts.dropout is None else model.get_submodule(parts.dropout),
            )
        elif i == n + 1:
            softcap = getattr(config, "final_logit_softcapping", None)
            out[i] = HFHead(
                model.get_submodule(parts.norm), model.get_submodule(parts.head), softcap
            )
        else:
            check_block(blocks[i - 1], rotary is not None)
            out[i] = HFBlock(blocks[i - 1], rotary, config, mask_kind(config, i - 1))
    return out


def source_names(parts: Parts, index: int, num_blocks: int) -> dict[str, str]:
    """Return {child of pipeline layer ``index``: the model's module path it holds}."""
    if index == 0:
        names = {"tokens": parts.embed, "positions": parts.positions}
        return {k: v for k, v in names.items() if v is not None}
    if index == num_blocks + 1:
        return {"norm": parts.norm, "head": parts.head}
    return {"block": f"{parts.blocks}.{index - 1}"}


def model_name(parts: Parts, index: int, num_blocks: int, local: str) -> str:
    """Return the model's name ('model.layers.2.mlp.up_proj.weight') of tensor ``local``
    ('block.mlp.up_proj.weight') of pipeline layer ``index``."""
    child, _, rest = local.partition(".")
    sources = source_names(parts, index, num_blocks)
    if child not in sources:
        raise KeyError(f"pipeline layer {index} has no tensor {local!r} from the model")
    return f"{sources[child]}.{rest}"
