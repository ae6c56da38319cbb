"""Parameter counts of a decoder-only transformer, and of its LoRA adapters.

A GPT layer has 12h^2 + 13h parameters (Narayanan et al. 2021, Sec. 5.1); the count here is
generalised to grouped-query attention and gated MLPs. LoRA (Hu et al. 2021) adds r (d_in +
d_out) trainable parameters to each matrix it adapts: here every linear matrix of every
transformer layer (Q, K, V, the attention output, and the MLP's two or three), the
embedding and the output layer staying frozen.
"""

from __future__ import annotations

from layerwise.planner.specs import ModelSpec


def layer_params(m: ModelSpec) -> float:
    """Returns the parameters of one transformer layer (weights, biases, norms)."""
    h, d = m.hidden, m.hidden // m.heads
    qkv = h * (m.heads + 2 * m.kv) * d
    mlp = (3 if m.gated_mlp else 2) * h * m.ffn_size
    biases = 0 if m.gated_mlp else (m.heads + 2 * m.kv) * d + h + m.ffn_size + h
    return qkv + h * h + mlp + biases + 4 * h  # 4h: two norms with scale and shift


def embedding_params(m: ModelSpec) -> float:
    """Returns the parameters of the input embedding (with the position table if any)."""
    return m.vocab * m.hidden + (m.seq * m.hidden if m.learned_positions else 0)


def total_params(m: ModelSpec) -> float:
    """Returns the parameter count of the whole model."""
    head = 0 if m.tied_embeddings else m.vocab * m.hidden
    return m.layers * layer_params(m) + embedding_params(m) + head + 2 * m.hidden


def adapted_matrices(m: ModelSpec) -> list[tuple[int, int]]:
    """Returns (d_in, d_out) of each linear matrix of one layer that LoRA adapts."""
    h, d = m.hidden, m.hidden // m.heads
    attention = [(h, m.heads * d), (h, m.kv * d), (h, m.kv * d), (m.heads * d, h)]
    mlp = [(h, m.ffn_size)] * (2 if m.gated_mlp else 1) + [(m.ffn_size, h)]
    return attention + mlp


def adapter_params(m: ModelSpec, rank: int) -> float:
    """Returns the LoRA parameters of one layer: r (d_in + d_out) per adapted matrix."""
    return float(sum(rank * (d_in + d_out) for d_in, d_out in adapted_matrices(m)))
