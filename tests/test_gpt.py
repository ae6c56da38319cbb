"""Tests of the GPT layer list: deterministic per-layer init, causality, ties, training."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from torch import nn

from layerwise.models.gpt import (
    Block,
    Embedding,
    GPTConfig,
    Head,
    _build_layer,
    build_gpt,
    flops_per_token,
    generate,
    gpt_layers,
    layer_parameter_counts,
    loss_fn,
    parameter_count,
    tied_parameter_names,
)

TINY = GPTConfig(seq_len=16, d_model=32, n_layers=3, n_heads=4, seed=7)


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_layer_list_shape_and_types() -> None:
    factories = gpt_layers(TINY)
    assert len(factories) == TINY.n_layers + 2 == TINY.num_layers_total
    kinds = [type(factory()) for factory in factories]
    assert kinds == [Embedding, Block, Block, Block, Head]
    # Spawned workers receive factories by pickling.
    rebuilt = pickle.loads(pickle.dumps(factories[1]))()
    torch.testing.assert_close(rebuilt.state_dict(), factories[1]().state_dict())


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, tie_embeddings=True)])
def test_factories_in_any_order_match_build_gpt(config: GPTConfig) -> None:
    reference = build_gpt(config).state_dict()
    factories = gpt_layers(config)
    order = [3, 0, 4, 2, 1]
    torch.manual_seed(12345)  # the global RNG must not matter
    built = {i: factories[i]() for i in order}
    for i in range(len(factories)):
        for name, tensor in built[i].state_dict().items():
            torch.testing.assert_close(tensor, reference[f"{i}.{name}"], rtol=0, atol=0)


def test_building_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_gpt(TINY)
    torch.testing.assert_close(torch.rand(3), expected)


def test_layers_differ_and_seed_matters() -> None:
    factories = gpt_layers(TINY)
    w1 = factories[1]().get_parameter("attn.q_proj.weight")
    w2 = factories[2]().get_parameter("attn.q_proj.weight")
    assert not torch.equal(w1, w2)
    other = gpt_layers(dataclasses.replace(TINY, seed=8))[1]().get_parameter("attn.q_proj.weight")
    assert not torch.equal(w1, other)


def test_sequential_layers_equal_nn_sequential() -> None:
    model = build_gpt(TINY)
    layers = [factory() for factory in gpt_layers(TINY)]
    x = _tokens(2, TINY.seq_len)
    h = x
    for layer in layers:
        h = layer(h)
    assert h.shape == (2, TINY.seq_len, TINY.vocab_size)
    torch.testing.assert_close(h, model(x))


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model = build_gpt(TINY)
    x = _tokens(2, TINY.seq_len)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_embedding_init_and_sharing() -> None:
    config = dataclasses.replace(TINY, tie_embeddings=True)
    factories = gpt_layers(config)
    head, emb = factories[-1](), factories[0]()  # built apart, as on two workers
    assert isinstance(head, Head) and isinstance(emb, Embedding)
    torch.testing.assert_close(head.lm_head.weight, emb.tok.weight, rtol=0, atol=0)
    assert tied_parameter_names(config) == [(0, "tok.weight", 4, "lm_head.weight")]
    assert tied_parameter_names(TINY) == []
    untied = gpt_layers(TINY)
    untied_head = untied[-1]().get_parameter("lm_head.weight")
    assert not torch.equal(untied_head, untied[0]().get_parameter("tok.weight"))
    model = build_gpt(config)
    assert model[-1].get_parameter("lm_head.weight") is model[0].get_parameter("tok.weight")


def test_tied_gradient_is_the_sum_of_both_copies() -> None:
    config = dataclasses.replace(TINY, tie_embeddings=True)
    x, y = _tokens(2, TINY.seq_len, 1), _tokens(2, TINY.seq_len, 2)
    model = build_gpt(config)
    loss_fn(model(x), y).backward()
    # Layers built apart (as on separate workers) hold two copies; summing their gradients
    # is what the runtime does, and it must equal the shared parameter's gradient.
    layers = [factory() for factory in gpt_layers(config)]
    h = x
    for layer in layers:
        h = layer(h)
    loss_fn(h, y).backward()
    src_i, src_name, dst_i, dst_name = tied_parameter_names(config)[0]
    src_grad = layers[src_i].get_parameter(src_name).grad
    dst_grad = layers[dst_i].get_parameter(dst_name).grad
    assert src_grad is not None and dst_grad is not None
    torch.testing.assert_close(src_grad + dst_grad, model[0].get_parameter("tok.weight").grad)


def test_loss_at_init_is_near_uniform() -> None:
    model = build_gpt(TINY)
    x, y = _tokens(8, TINY.seq_len, 1), _tokens(8, TINY.seq_len, 2)
    loss = loss_fn(model(x), y)
    assert loss.shape == ()
    assert abs(loss.item() - math.log(256)) < 0.1


def test_adamw_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    model = build_gpt(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A repeating pattern is learnable within a few steps.
    pattern = torch.arange(TINY.seq_len + 1) % 5 + 97
    data = pattern.repeat(4, 1)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_generate_lengths_cropping_and_determinism() -> None:
    model = build_gpt(TINY).eval()
    prompt = _tokens(2, 5)

    def sample() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return generate(model, prompt, 20, top_k=10, generator=gen, seq_len=TINY.seq_len)

    out = sample()
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 256
    assert torch.equal(out, sample())
    greedy = generate(model, prompt, 3, temperature=0.0, seq_len=TINY.seq_len)
    assert torch.equal(greedy[:, 5], model(prompt)[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="seq_len"):
        generate(model, prompt, 20)  # without cropping the context outgrows the model


def test_parameter_counts_match_modules() -> None:
    for config in [TINY, dataclasses.replace(TINY, tie_embeddings=True, bias=False, d_ff=40)]:
        layers = [factory() for factory in gpt_layers(config)]
        counts = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        assert counts == layer_parameter_counts(config)
        model = build_gpt(config)
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_flops_per_token() -> None:
    C, L, T, V = TINY.d_model, TINY.n_layers, TINY.seq_len, TINY.vocab_size
    forward = 2 * (L * 12 * C * C + V * C) + 4 * L * T * C
    assert flops_per_token(TINY, training=False) == forward
    assert flops_per_token(TINY) == 3 * forward


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"n_layers": 0}, "n_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"d_ff": -1}, "d_ff"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)  # type: ignore[arg-type]


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        Embedding(TINY)(_tokens(1, TINY.seq_len + 1))
    with pytest.raises(IndexError, match="out of range"):
        _build_layer(TINY, TINY.n_layers + 2)


def test_dropout_is_active_only_in_training() -> None:
    config = dataclasses.replace(TINY, dropout=0.5)
    model: nn.Module = build_gpt(config)
    x = _tokens(2, TINY.seq_len)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
