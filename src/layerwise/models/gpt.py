"""A decoder-only transformer (nanoGPT style) expressed as a list of layers.

The model is ``[Embedding, Block 0 .. Block L-1, Head]``. ``gpt_layers`` returns one
zero-argument factory per layer, and every factory seeds its own initialization from
``(config.seed, layer index)``: a pipeline worker that builds only layers i..j gets exactly
the weights that building the whole model in one process would give. ``GPTFamily`` is the
model as the job and the planner see it (:mod:`layerwise.models.family`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerwise.models.family import LayerFactory, ModelFamily, TiedParameter

if TYPE_CHECKING:  # only for annotations: torch's tensor-parallel package is slow to import
    from layerwise.parallel.mesh import Grid
    from layerwise.parallel.tensor import TensorParallelPlan


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of the transformer; the only input of every layer constructor."""

    vocab_size: int = 256
    seq_len: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None  # None means 4 * d_model
    dropout: float = 0.0
    tie_embeddings: bool = False
    bias: bool = True
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = ["vocab_size", "seq_len", "d_model", "n_layers", "n_heads"]
        for name in sizes + (["d_ff"] if self.d_ff is not None else []):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}); try n_heads in {divisors}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0.0:
            raise ValueError(f"GPTConfig.init_std must be positive, got {self.init_std}")

    @property
    def ff_dim(self) -> int:
        """Width of the MLP hidden layer."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def num_layers_total(self) -> int:
        """Length of the layer list: embedding + blocks + head."""
        return self.n_layers + 2


class Embedding(nn.Module):
    """Token + learned position embeddings: int64 tokens (B, T) -> activations (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.seq_len = config.seq_len
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"Embedding expects tokens of shape (B, T), got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len {self.seq_len}")
        positions = torch.arange(length, device=tokens.device)  # (T,)
        return self.drop(self.tok(tokens) + self.pos(positions))  # (B, T, C)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v and output projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C = config.d_model
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.out_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape  # (B, T, C)
        hs = self.head_dim
        # Heads are counted from q_proj's width (-1), not the config: under tensor parallelism
        # q/k/v are column-sharded and out_proj row-sharded, so a rank holds fewer heads.
        q = self.q_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return self.resid_drop(self.out_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: fc_in (column-parallel) -> GELU -> fc_out (row-parallel)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.fc_out = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc_in(x))  # (B, T, F)
        return self.drop(self.fc_out(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); (B, T, C) -> same."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class Head(nn.Module):
    """Final LayerNorm + language-model projection: (B, T, C) -> logits (B, T, V)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        # No bias, so that the weight can be tied to the token embedding (same shape V x C).
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def _generator(seed: int, index: int) -> torch.Generator:
    """Return a CPU generator seeded from (seed, layer index), stable across processes."""
    digest = hashlib.blake2b(f"layerwise.gpt:{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _init_parameters(module: nn.Module, config: GPTConfig, gen: torch.Generator) -> None:
    """Initialize in module-definition order from ``gen`` only (never the global RNG)."""
    # GPT-2: residual projections get std / sqrt(2 L) so the residual stream's variance
    # does not grow with depth.
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith(("out_proj", "fc_out")) else config.init_std
            nn.init.normal_(sub.weight, 0.0, std, generator=gen)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
        if isinstance(sub, (nn.Linear, nn.LayerNorm)) and sub.bias is not None:
            nn.init.zeros_(sub.bias)


def _build_layer(config: GPTConfig, index: int) -> nn.Module:
    """Build layer ``index`` of the list on CPU, initialized from (config.seed, index)."""
    last = config.n_layers + 1
    if not 0 <= index <= last:
        raise IndexError(f"layer index {index} out of range 0..{last}")
    # Constructing on meta skips torch's default init, which would consume the global RNG.
    with torch.device("meta"):
        if index == 0:
            module: nn.Module = Embedding(config)
        elif index == last:
            module = Head(config)
        else:
            module = Block(config)
    module = module.to_empty(device="cpu")
    _init_parameters(module, config, _generator(config.seed, index))
    if index == last and config.tie_embeddings:
        # Re-draw the token embedding exactly as layer 0 does (first draw of its generator),
        # so that the two copies start equal even when built in different processes.
        weight = module.get_parameter("lm_head.weight")
        nn.init.normal_(weight, 0.0, config.init_std, generator=_generator(config.seed, 0))
    return module


def gpt_layers(config: GPTConfig) -> list[Callable[[], nn.Module]]:
    """Return one zero-argument factory per layer: [embedding, block 0..L-1, head]."""
    # partial rather than a lambda: factories stay picklable for spawned worker processes.
    return [functools.partial(_build_layer, config, i) for i in range(config.num_layers_total)]


def build_gpt(config: GPTConfig) -> nn.Sequential:
    """Return the whole model as an ``nn.Sequential``: the single-process reference.

    Tied parameters are shared, so autograd sums their gradients as the runtime does.
    """
    model = nn.Sequential(*(factory() for factory in gpt_layers(config)))
    for src_i, src_name, dst_i, dst_name in tied_parameter_names(config):
        owner, _, attr = dst_name.rpartition(".")
        shared = model[src_i].get_parameter(src_name)
        model[dst_i].get_submodule(owner).register_parameter(attr, shared)
    return model


def tied_parameter_names(config: GPTConfig) -> list[tuple[int, str, int, str]]:
    """Return [(src layer, src param, dst layer, dst param)] that must stay equal (or [])."""
    if not config.tie_embeddings:
        return []
    return [(0, "tok.weight", config.n_layers + 1, "lm_head.weight")]


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Return the mean cross-entropy over all tokens; logits (B, T, V), targets (B, T)."""
    # float32 so that low-precision logits do not lose accuracy in the log-softmax.
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


@torch.no_grad()
def generate(
    model_fn: Callable[[Tensor], Tensor],
    prompt_tokens: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    seq_len: int | None = None,
) -> Tensor:
    """Return ``prompt_tokens`` (B, T) followed by ``max_new_tokens`` sampled tokens.

    ``model_fn`` maps tokens (B, t) to logits (B, t, V); the context is cropped to the last
    ``seq_len`` tokens. ``temperature <= 0`` means greedy decoding. Shape (B, T + new).
    """
    if prompt_tokens.dim() != 2 or prompt_tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens must have shape (B, T>=1), got {prompt_tokens.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokens = prompt_tokens
    for _ in range(max_new_tokens):
        context = tokens if seq_len is None else tokens[:, -seq_len:]
        logits = model_fn(context)[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            if generator is not None:  # multinomial wants probs on the generator's device
                probs = probs.to(generator.device)
            next_token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        tokens = torch.cat([tokens, next_token.to(tokens.device, tokens.dtype)], dim=1)
    return tokens


def layer_parameter_counts(config: GPTConfig) -> list[int]:
    """Return the number of parameters of each layer in list order (ties counted twice)."""
    C, F_, V, b = config.d_model, config.ff_dim, config.vocab_size, int(config.bias)
    layer_norm = C + b * C
    embedding = V * C + config.seq_len * C
    block = 2 * layer_norm + 4 * (C * C + b * C) + (C * F_ + b * F_) + (F_ * C + b * C)
    head = layer_norm + V * C
    return [embedding, *([block] * config.n_layers), head]


def parameter_count(config: GPTConfig) -> int:
    """Return the number of distinct parameters of the model (a tied matrix counts once)."""
    tied = config.vocab_size * config.d_model if config.tie_embeddings else 0
    return sum(layer_parameter_counts(config)) - tied


def flops_per_token(config: GPTConfig, training: bool = True) -> int:
    """Return FLOPs per token at full context, as in PaLM appendix B: forward is 2 per matmul
    weight + 4 L T C for attention; training (forward + backward) is 3x forward."""
    C, L, T = config.d_model, config.n_layers, config.seq_len
    matmul_params = L * (4 * C * C + 2 * C * config.ff_dim) + config.vocab_size * C
    forward = 2 * matmul_params + 4 * L * T * C
    return 3 * forward if training else forward


# Attention: q, k, v column-wise (each rank gets whole heads), output projection row-wise; MLP:
# first linear column-wise, second row-wise. Embedding, norms and head stay whole: their
# inputs are identical on every tensor-parallel rank.
BLOCK_PLAN: TensorParallelPlan = {
    "attn.q_proj": "col",
    "attn.k_proj": "col",
    "attn.v_proj": "col",
    "attn.out_proj": "row",
    "mlp.fc_in": "col",
    "mlp.fc_out": "row",
    "attn": "shared_input",
}


class GPTFamily(ModelFamily):
    """The GPT of this module as a model family: [Embedding, Block 0..L-1, Head];
    ``weights``: an exported model's safetensors file to start from."""

    name = "gpt"

    def __init__(self, config: GPTConfig, weights: str | None = None) -> None:
        self.config, self.weights = config, weights

    @classmethod
    def from_config(cls, **config: Any) -> GPTFamily:
        """Return the family of ``GPTConfig(**config)`` (and ``weights``, a safetensors file
        written by ``layerwise export``); ValueError names unknown options."""
        weights = config.pop("weights", None)
        unknown = sorted(set(config) - {f.name for f in fields(GPTConfig)})
        if unknown:
            known = [f.name for f in fields(GPTConfig)] + ["weights"]
            raise ValueError(f"the gpt model family has no option {unknown}; its options: {known}")
        return cls(GPTConfig(**config), None if weights is None else str(weights))

    def embedding_rows(self) -> int | None:
        return self.config.vocab_size

    def loss_reduction(self) -> str:
        """By counted targets: rows of a padded or masked batch count what they hold."""
        return "tokens"

    @property
    def num_layers(self) -> int:
        return self.config.num_layers_total

    def describe_layers(self) -> str:
        return f"{self.config.n_layers} blocks plus the embedding and the head"

    def layers(self) -> list[LayerFactory]:
        if self.weights is not None:
            from layerwise.models.pretrained import PretrainedLayer

            return [PretrainedLayer(self.config, i, self.weights)
                    for i in range(self.config.num_layers_total)]  # fmt: skip
        return gpt_layers(self.config)

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output, target)  # the module's function: logits (B, T, V), targets (B, T)

    def tied_parameters(self) -> list[TiedParameter]:
        return tied_parameter_names(self.config)

    def tensor_parallel_plan(self, index: int, module: nn.Module) -> TensorParallelPlan:
        return BLOCK_PLAN if 1 <= index <= self.config.n_layers else {}

    def check_layout(self, layout: Grid) -> None:
        """Raise ValueError unless tp divides the heads, the hidden size and the MLP width."""
        if layout.tp < 1:
            return  # not a layout at all: check_grid says so
        c = self.config
        sizes = (
            ("attention heads", c.n_heads),
            ("hidden size", c.d_model),
            ("MLP width", c.ff_dim),
        )
        for what, size in sizes:
            if size % layout.tp:
                divisors = [t for t in range(1, c.n_heads + 1) if all(s % t == 0 for _, s in sizes)]
                raise ValueError(
                    f"--tp {layout.tp} does not divide the {what} ({size}); "
                    f"tensor parallelism splits them evenly: try --tp in {divisors}"
                )

    def parameter_counts(self) -> list[int]:
        return layer_parameter_counts(self.config)

    def sample_layer(self, micro_batch: int) -> tuple[nn.Module, Tensor]:
        """Return block 0 and an activation of shape (micro_batch, seq_len, d_model)."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)  # leaves the global RNG alone
        return _build_layer(c, 1), torch.randn(micro_batch, c.seq_len, c.d_model, generator=gen)
