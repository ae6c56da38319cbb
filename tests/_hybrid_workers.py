"""Worker functions for the hybrid (dp x pp x tp) tests (module level, so spawn can import
them); each compares with single-process training of the same model."""

from __future__ import annotations

from typing import Any

import torch

from _workers import TIED_GPT_CASES, tied_gpt_pipeline, tied_gpt_reference
from layerwise.models.gpt import GPTConfig, build_gpt, loss_fn


def hybrid_layouts(
    rank: int, world: int, layouts: list[tuple[int, int, int]]
) -> list[dict[str, Any]]:
    """:func:`hybrid_cases` for each (dp, tp, pp) of ``layouts`` (each of ``world`` ranks)."""
    return [hybrid_cases(rank, world, dp, tp, pp) for dp, tp, pp in layouts]


def hybrid_cases(rank: int, world: int, dp: int, tp: int, pp: int) -> dict[str, Any]:
    """A tied GPT on a (dp, pp, tp) mesh: loss and every gradient equal to single-process
    training on the same global batch, for 1F1B and ZB-H1, and for 1F1B with messages
    matched by order in per-stream groups (one set per pipeline of the mesh)."""
    from torch.distributed.tensor import DTensor

    from layerwise.models.gpt import GPTFamily
    from layerwise.parallel.data import GradReducer
    from layerwise.parallel.mesh import Grid, build_mesh

    layout = Grid(dp=dp, pp=pp, tp=tp)
    mesh = build_mesh(layout)
    dp_rank = layout.coords(rank)[0]
    cfg = GPTConfig(seq_len=8, d_model=16, n_layers=2, n_heads=2, tie_embeddings=True, seed=5)
    x, y, ref, ref_grads = tied_gpt_reference(cfg, rows=8, seed=1)
    rows = x.shape[0] // dp
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    results: dict[str, Any] = {}
    for case in TIED_GPT_CASES:
        pipe = tied_gpt_pipeline(
            cfg,
            case,
            group=mesh["pp"].get_group(),
            parallelize=lambda i, m: GPTFamily(cfg).parallelize(i, m, mesh["tp"]),
            grad_reducer=GradReducer(mesh["dp"].get_group()) if dp > 1 else None,
        )
        loss = pipe.train_step(
            x[mine] if pipe.is_first else None, y[mine] if pipe.is_last else None
        )
        total = torch.tensor([loss])
        torch.distributed.all_reduce(total, group=mesh["dp"].get_group())
        errors = []
        if abs(total.item() / dp - ref.item()) > 1e-5:
            errors.append(f"loss {total.item() / dp} != {ref.item()}")
        sharded = 0
        for name, p in pipe.named_parameters():
            grad = p.grad
            if isinstance(grad, DTensor):
                sharded += any(pl.is_shard() for pl in grad.placements)
                grad = grad.full_tensor()
            try:
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6)
            except AssertionError as err:
                errors.append(f"{name}: {str(err).splitlines()[0]}")
        results[case] = errors
        results[f"{case} sharded"] = sharded
    if dp > 1:
        results["zero-1"] = _zero_step_matches(cfg, x, y, ref_grads, mesh, mine)
    return results


def _zero_step_matches(
    cfg: GPTConfig, x: torch.Tensor, y: torch.Tensor, ref_grads: Any, mesh: Any, mine: slice
) -> list[str]:
    """One AdamW step with optimizer state sharded over dp equals a plain AdamW step."""
    from torch.distributed.tensor import DTensor

    from layerwise.models.gpt import GPTFamily
    from layerwise.parallel.data import GradReducer
    from layerwise.parallel.zero import ShardedOptimizer

    model = build_gpt(cfg)
    loss_fn(model(x), y).backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3).step()  # eps: k-bias grads are ~0
    expected = {
        f"{i}.{k}": p.detach() for i, layer in enumerate(model) for k, p in layer.named_parameters()
    }
    expected[f"{cfg.n_layers + 1}.lm_head.weight"] = expected["0.tok.weight"]
    pipe = tied_gpt_pipeline(
        cfg,
        "1f1b",
        group=mesh["pp"].get_group(),
        parallelize=lambda i, m: GPTFamily(cfg).parallelize(i, m, mesh["tp"]),
        grad_reducer=GradReducer(mesh["dp"].get_group()),
    )
    pipe.train_step(x[mine] if pipe.is_first else None, y[mine] if pipe.is_last else None)
    opt = ShardedOptimizer(
        list(pipe.parameters()),
        mesh["dp"].get_group(),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3),
    )
    opt.step()
    errors = []
    owned = len(opt.mine)
    if not 0 < owned < len(opt.params):
        errors.append(f"replica owns {owned} of {len(opt.params)} parameters")
    for name, p in pipe.named_parameters():
        value = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        try:
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6)
        except AssertionError as err:
            errors.append(f"{name}: {str(err).splitlines()[0]}")
    return errors


def tp_collectives(rank: int, world: int) -> dict[str, int]:
    """Count the collectives one tensor-parallel GPT block issues in forward and backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from layerwise.models.gpt import Block, GPTFamily

    mesh = init_device_mesh("cpu", (world,))
    cfg = GPTConfig(seq_len=8, d_model=16, n_layers=1, n_heads=2)
    block = GPTFamily(cfg).parallelize(1, Block(cfg), mesh)  # layer 1: the first block
    x = torch.randn(2, 8, 16, requires_grad=True)
    with CommDebugMode() as fwd:
        y = block(x)
    with CommDebugMode() as bwd:
        y.sum().backward()
    return {"forward": fwd.get_total_counts(), "backward": bwd.get_total_counts()}
