"""Tests of the model-family interface: the GPT family agrees with the GPT module's functions,
the registry resolves names, and a second family written here works through the same
interface (layer list, loss, layout checks, planner timing)."""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerwise.models.family import (
    FAMILIES,
    LayerFactory,
    ModelFamily,
    family_names,
    get_family,
    register_family,
)
from layerwise.models.gpt import (
    GPTConfig,
    GPTFamily,
    build_gpt,
    gpt_layers,
    layer_parameter_counts,
    loss_fn,
    tied_parameter_names,
)
from layerwise.parallel.mesh import Grid
from layerwise.parallel.tensor import TensorParallelPlan
from layerwise.planner.local import measure_family_layer, measure_layer, predict_local

TINY = GPTConfig(seq_len=16, d_model=32, n_layers=3, n_heads=4, seed=7)
TIED = dataclasses.replace(TINY, tie_embeddings=True)


def _tokens(rows: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (rows, TINY.seq_len), generator=gen)


def _run_in_sequence(layers: list[nn.Module], x: Tensor) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("config", [TINY, TIED])
def test_gpt_family_layers_give_the_loss_of_build_gpt(config: GPTConfig) -> None:
    family = GPTFamily(config)
    x, y = _tokens(2, seed=1), _tokens(2, seed=2)
    layers = [factory() for factory in family.layers()]
    for src, src_name, dst, dst_name in family.tied_parameters():  # ties start equal
        torch.testing.assert_close(
            layers[src].get_parameter(src_name), layers[dst].get_parameter(dst_name)
        )
    loss = family.loss_fn(_run_in_sequence(layers, x), y)
    reference = loss_fn(build_gpt(config)(x), y)
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def test_gpt_family_agrees_with_the_module_functions() -> None:
    for config in (TINY, TIED):
        family = GPTFamily(config)
        assert family.num_layers == len(gpt_layers(config)) == config.n_layers + 2
        assert family.tied_parameters() == tied_parameter_names(config)
        assert family.parameter_counts() == layer_parameter_counts(config)
        # the closed form equals the interface's default, which builds and counts each layer
        assert family.parameter_counts() == ModelFamily.parameter_counts(family)
    assert GPTFamily(TIED).tied_parameters() == [(0, "tok.weight", 4, "lm_head.weight")]


def test_gpt_tensor_parallel_plan_splits_the_blocks_only() -> None:
    family = GPTFamily(TINY)
    layers = [factory() for factory in family.layers()]
    plans = [family.tensor_parallel_plan(i, layer) for i, layer in enumerate(layers)]
    assert plans[0] == {} and plans[-1] == {}  # embedding and head stay whole
    for layer, plan in zip(layers[1:-1], plans[1:-1], strict=True):
        assert sorted(k for k, v in plan.items() if v == "col") == [
            "attn.k_proj", "attn.q_proj", "attn.v_proj", "mlp.fc_in"
        ]  # fmt: skip
        assert sorted(k for k, v in plan.items() if v == "row") == ["attn.out_proj", "mlp.fc_out"]
        for name, style in plan.items():  # every entry names a real submodule of the block
            sub = layer.get_submodule(name)
            assert isinstance(sub, nn.Linear) or style == "shared_input"


@pytest.mark.parametrize(
    ("config", "layout", "world", "message"),
    [
        (TINY, Grid(1, 1, 3), None, r"--tp 3 does not divide the attention heads \(4\)"),
        (TINY, Grid(1, 1, 8), None, r"attention heads \(4\).*try --tp in \[1, 2, 4\]"),
        (
            dataclasses.replace(TINY, d_ff=98),
            Grid(1, 1, 4),
            None,
            r"--tp 4 does not divide the MLP width \(98\).*try --tp in \[1, 2\]",
        ),
        (
            TINY,
            Grid(1, 6, 1),
            None,
            r"--pp 6 is larger than the number of layers \(5: 3 blocks plus the embedding and "
            r"the head\).*use --pp 5 or fewer",
        ),
        (TINY, Grid(2, 2, 2), 6, r"world size 6 is not dp\*pp\*tp"),
        (TINY, Grid(1, 1, 0), None, r"--tp must be >= 1"),
    ],
)
def test_gpt_layout_checks(
    config: GPTConfig, layout: Grid, world: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GPTFamily(config).check(layout, world)


def test_gpt_layouts_that_fit_pass() -> None:
    family = GPTFamily(TINY)
    for layout in (Grid(1, 5, 1), Grid(2, 1, 4), Grid(1, 2, 2)):
        family.check(layout, layout.world)


def test_registry_resolves_gpt_and_names_the_known_families() -> None:
    assert "gpt" in family_names()
    family = get_family("gpt", seq_len=16, d_model=32, n_layers=3, n_heads=4, seed=7)
    assert isinstance(family, GPTFamily) and family.config == TINY
    with pytest.raises(ValueError, match=r"unknown model family 'llama'; known families: .*gpt"):
        get_family("llama")
    with pytest.raises(ValueError, match=r"no option \['heads'\]; its options: .*n_heads"):
        get_family("gpt", heads=4)
    with pytest.raises(ValueError, match="'gpt' is already registered"):
        register_family(GPTFamily)


def test_measure_layer_times_a_gpt_block() -> None:
    cost = measure_layer(hidden=32, heads=4, seq=16, micro_batch=2, threads=1, repeats=1)
    assert cost.forward > 0 and cost.backward > 0
    config = GPTConfig(seq_len=16, d_model=32, n_heads=4, n_layers=1)
    assert cost.params == layer_parameter_counts(config)[1]


# A second family, in one place: a residual-free MLP of ``depth`` hidden blocks between an
# input and an output projection, regressing one number on one number.


def _toy_layer(width: int, depth: int, seed: int, index: int) -> nn.Module:
    """Layer ``index`` of the toy MLP, initialized from (seed, index) only."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays where it was
        torch.manual_seed(seed * 1000 + index)
        if index == 0:
            return nn.Linear(1, width)
        if index == depth + 1:
            return nn.Linear(width, 1)
        return nn.Sequential(
            OrderedDict(
                up=nn.Linear(width, 2 * width), act=nn.ReLU(), down=nn.Linear(2 * width, width)
            )
        )


class ToyMLP(ModelFamily):
    """[Linear 1->w, (Linear w->2w, ReLU, Linear 2w->w) x depth, Linear w->1]."""

    name = "toy-mlp"

    def __init__(self, width: int = 8, depth: int = 3, seed: int = 0) -> None:
        self.width, self.depth, self.seed = width, depth, seed

    @classmethod
    def from_config(cls, **config: Any) -> ToyMLP:
        return cls(**config)

    @property
    def num_layers(self) -> int:
        return self.depth + 2

    def layers(self) -> list[LayerFactory]:
        return [
            functools.partial(_toy_layer, self.width, self.depth, self.seed, i)
            for i in range(self.num_layers)
        ]

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)

    def tensor_parallel_plan(self, index: int, module: nn.Module) -> TensorParallelPlan:
        return {"up": "col", "down": "row"} if 1 <= index <= self.depth else {}

    def check_layout(self, layout: Grid) -> None:
        if layout.tp >= 1 and (2 * self.width) % layout.tp:
            raise ValueError(
                f"--tp {layout.tp} does not divide the hidden width ({2 * self.width}); "
                f"pick a divisor of it"
            )

    def sample_layer(self, micro_batch: int) -> tuple[nn.Module, Tensor]:
        layer = _toy_layer(self.width, self.depth, self.seed, 1)  # a hidden block
        return layer, torch.randn(micro_batch, self.width)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ModelFamily:
    """The toy family, registered for this test only and built through the registry."""
    monkeypatch.setitem(FAMILIES, ToyMLP.name, ToyMLP)
    return get_family("toy-mlp", width=8, depth=3, seed=1)


def test_a_second_family_trains_through_the_interface(toy: ModelFamily) -> None:
    assert "toy-mlp" in family_names()
    x = torch.linspace(-1, 1, 16).unsqueeze(1)  # (16, 1)
    y = x.pow(2)
    layers = [factory() for factory in toy.layers()]
    params = [p for layer in layers for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = toy.loss_fn(_run_in_sequence(layers, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # factories rebuild the same weights whatever the global RNG did in between
    torch.testing.assert_close(toy.layers()[2]().state_dict(), toy.layers()[2]().state_dict())


def test_a_second_family_has_its_own_checks_plan_and_counts(toy: ModelFamily) -> None:
    assert toy.num_layers == 5
    assert toy.parameter_counts() == [1 * 8 + 8, *([8 * 16 + 16 + 16 * 8 + 8] * 3), 8 * 1 + 1]
    assert toy.tied_parameters() == []
    layer = toy.layers()[1]()
    for name in toy.tensor_parallel_plan(1, layer):
        assert isinstance(layer.get_submodule(name), nn.Linear)
    assert toy.tensor_parallel_plan(0, toy.layers()[0]()) == {}
    with pytest.raises(ValueError, match=r"--tp 3 does not divide the hidden width \(16\)"):
        toy.check(Grid(1, 1, 3))
    with pytest.raises(ValueError, match=r"--pp 6 is larger than the number of layers \(5\)"):
        toy.check(Grid(1, 6, 1))
    toy.check(Grid(1, 5, 2), world=10)


def test_a_second_family_is_timed_by_the_local_planner(toy: ModelFamily) -> None:
    cost = measure_family_layer(toy, micro_batch=4, threads=1, repeats=1)
    assert cost.forward > 0 and cost.backward > 0
    assert cost.params == toy.parameter_counts()[1]
    rows = predict_local(3, 8, 1, 1, 4, 16, workers=2, cost=cost, cores=4)
    # 3 blocks with the embedding and the head split in 2 as the job splits them
    assert {r["layout"] for r in rows} == {"dp2 tp1 pp1 mb4", "dp1 tp1 pp2 mb4"}
    assert {sum(r["stage_layers"]) for r in rows} == {5}
    assert rows[0]["layer_forward_s"] == cost.forward


def test_diagnose_counts_layers_from_the_runs_family() -> None:
    from layerwise.job.diagnose import _num_layers

    # a config.json from before the ``model`` field (and with ``checkpoint`` for recompute)
    saved = {"workers": 2, "layers": 6, "heads": 4, "checkpoint": "never", "stage_sizes": None}
    assert _num_layers(saved) == 8
    assert _num_layers({**saved, "model": "gpt", "layers": 2}) == 4
