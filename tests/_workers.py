"""Worker functions for multi-process runtime tests (module level, so spawn can import them).

Each function runs many cases inside one process group and returns plain data; the tests
compare it with single-process training of the same model.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import layerwise as lw
from _safety_workers import length_cases, safety_cases
from layerwise.models.gpt import GPTConfig, build_gpt, gpt_layers, loss_fn, tied_parameter_names

D = 8


class Residual(nn.Module):
    """x + W2 gelu(W1 x): its output is not saved by autograd, so it is freed once sent."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class TanhLayer(nn.Module):
    """Output saved by autograd (tanh): must be kept after sending."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class Split(nn.Module):
    """Returns a tuple: (features, integer positions): several tensors cross the boundary."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (x > 0).long()  # an integer tensor that needs no gradient
        return self.fc(x), pos


class TupleLayer(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x) + 0.01 * pos.float(), pos


class ToDict(nn.Module):
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": x, "scale": torch.sigmoid(x.mean(dim=1, keepdim=True))}


class FromDict(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(x * scale)


def mlp_layers(n: int = 8) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Residual() if i % 2 == 0 else TanhLayer() for i in range(n)]


def struct_layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        Split(),
        TupleLayer(),
        ToDict(),
        FromDict(),
        Residual(),
        TanhLayer(),
        Residual(),
        TanhLayer(),
    ]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def reference(
    layers: list[nn.Module], x: Any, y: Any, loss: Any
) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain single-process training: the loss and every parameter's gradient by global name."""
    model = nn.Sequential(*layers)
    value = x
    for layer in model:
        value = (
            layer(*value)
            if isinstance(value, tuple)
            else layer(**value)
            if isinstance(value, dict)
            else layer(value)
        )
    out = loss(value, y)
    out.backward()
    grads = {
        f"{i}.{k}": p.grad.clone()
        for i, layer in enumerate(model)
        for k, p in layer.named_parameters()
    }
    return out.item(), grads


def compare(
    pipe: lw.Pipeline, loss: float, ref_loss: float, ref_grads: dict[str, torch.Tensor]
) -> list[str]:
    """Return what differs from the reference (empty when everything matches)."""
    errors = []
    if abs(loss - ref_loss) > 1e-5 * max(1.0, abs(ref_loss)):
        errors.append(f"loss {loss} != {ref_loss}")
    for name, p in pipe.named_parameters():
        if p.grad is None:
            errors.append(f"{name}: no gradient")
            continue
        try:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6)
        except AssertionError as err:
            errors.append(f"{name}: {str(err).splitlines()[0]}")
    return errors


def equivalence_cases(rank: int, world: int) -> dict[str, Any]:
    """Every schedule x micro-batches x checkpointing on this world size, plus structured
    inputs, uneven micro-batches, inference and timelines. Returns case -> list of errors."""
    results: dict[str, Any] = {}
    torch.manual_seed(1)
    x, y = torch.randn(16, D), torch.randn(16, D)
    ref_loss, ref_grads = reference(mlp_layers(), x, y, mse)
    for schedule in ("naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1"):
        for m in (1, 2, 4, 8):
            if schedule == "interleaved-1f1b" and (m % world or 2 * world > 8):
                continue
            for ckpt in ("never", "always", "except_last"):
                pipe = lw.Pipeline(
                    mlp_layers(), schedule=schedule, microbatches=m, loss_fn=mse, recompute=ckpt
                )
                loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
                results[f"{schedule} m={m} {ckpt}"] = compare(pipe, loss, ref_loss, ref_grads)
    tl = pipe.timeline()
    results["timeline"] = (
        tl.num_workers,
        sorted({e.kind for e in tl.events}),
        len([e for e in tl.events if e.kind in "FBIW"]),
    )
    results["idle"] = (pipe.bubble_fraction(), tl.bubble_fraction())  # gathered small, whole

    # tuples and dicts between stages; 10 rows into 4 micro-batches (3, 3, 2, 2)
    xs, ys = torch.randn(10, D), torch.randn(10, D)
    ref_loss, ref_grads = reference(struct_layers(), xs, ys, mse)
    for schedule in ("1f1b", "zb-h1"):
        pipe = lw.Pipeline(
            struct_layers(),
            schedule=schedule,
            microbatches=4,
            loss_fn=mse,
            balance=[1, 2, 2, 3] if world == 4 else [3, 5],
        )
        loss = pipe.train_step(xs if pipe.is_first else None, ys if pipe.is_last else None)
        results[f"structured {schedule}"] = compare(pipe, loss, ref_loss, ref_grads)

    # inference equals the plain model; a second step with new shapes re-sends metadata
    pipe = lw.Pipeline(mlp_layers(), schedule="1f1b", microbatches=2, loss_fn=mse)
    expected = nn.Sequential(*mlp_layers())(x)
    out = pipe.forward(x if pipe.is_first else None)
    results["forward"] = None if out is None else float((out - expected).abs().max())
    x5, y5 = torch.randn(5, D), torch.randn(5, D)
    ref_loss, ref_grads = reference(mlp_layers(), x5, y5, mse)
    pipe.zero_grad()
    loss = pipe.train_step(x5 if pipe.is_first else None, y5 if pipe.is_last else None)
    results["new shapes"] = compare(pipe, loss, ref_loss, ref_grads)

    # messages matched by order in per-stream groups (what NCCL needs), run here on gloo:
    # several stages per worker, split backwards, and a change of shapes in mid-step
    for schedule, m in (("interleaved-1f1b", 2 * world), ("zb-h1", 4), ("1f1b", 2)):
        ref_loss, ref_grads = reference(mlp_layers(), x, y, mse)
        pipe = lw.Pipeline(
            mlp_layers(), schedule=schedule, microbatches=m, loss_fn=mse, p2p="channels"
        )
        loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
        results[f"channels {schedule} m={m}"] = compare(pipe, loss, ref_loss, ref_grads)
    # 5 rows in 2 micro-batches (3, 2): the second has new shapes, known only after the first
    ref_loss, ref_grads = reference(mlp_layers(), x5, y5, mse)
    pipe.zero_grad()
    loss = pipe.train_step(x5 if pipe.is_first else None, y5 if pipe.is_last else None)
    results["channels new shapes"] = compare(pipe, loss, ref_loss, ref_grads)
    results["channels groups"] = len(pipe.transport.channels)
    results["calibrate"] = calibrate_cases(world, x, y)
    results.update(safety_cases(rank, world, reference, compare))
    if world == 2:
        results.update(length_cases(rank, world, reference, compare))
        results["tied gpt"] = gpt_cases(rank, world)
    return results


def calibrate_cases(world: int, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Pipeline.calibrate: sensible costs for every stage, and training state left as it was
    (the gradients already accumulated, and the next step's loss and gradients)."""
    errors = []
    ref_loss, ref_grads = reference(mlp_layers(), x, y, mse)
    for schedule, m in (("1f1b", 4), ("zb-h1", 4), ("interleaved-1f1b", 2 * world)):
        pipe = lw.Pipeline(mlp_layers(), schedule=schedule, microbatches=m, loss_fn=mse)
        first, last = pipe.is_first, pipe.is_last
        pipe.train_step(x if first else None, y if last else None)
        before = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        rng = torch.get_rng_state()
        costs = pipe.calibrate(x if first else None, y if last else None, steps=2)
        after = {n: p.grad for n, p in pipe.named_parameters() if p.grad is not None}
        if before.keys() != after.keys() or any(
            not torch.equal(before[n], after[n]) for n in before
        ):
            errors.append(f"{schedule}: calibrate changed the accumulated gradients")
        if not torch.equal(rng, torch.get_rng_state()):
            errors.append(f"{schedule}: calibrate changed the random state")
        n = pipe.schedule.num_stages
        if len(costs.forward) != n or min(costs.forward) <= 0 or min(costs.backward) <= 0:
            errors.append(f"{schedule}: costs {costs}")
        if schedule == "zb-h1" and min(costs.weight_grad) <= 0:
            errors.append(f"{schedule}: no measured W cost {costs.weight_grad}")
        if not 0 < costs.comm_latency < 1.0:
            errors.append(f"{schedule}: hand-off {costs.comm_latency}")
        if lw.simulate(pipe.schedule, costs).makespan() <= 0:
            errors.append(f"{schedule}: empty prediction")
        pipe.zero_grad()
        loss = pipe.train_step(x if first else None, y if last else None)
        errors += [
            f"{schedule} after calibrate: {e}" for e in compare(pipe, loss, ref_loss, ref_grads)
        ]
    return errors


def tied_gpt_reference(
    cfg: GPTConfig, rows: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A batch, and single-process training's loss and gradients by global parameter name.

    The reference model shares one tensor between embedding and head; its gradient is the sum
    of both uses, which is what each of the pipeline's two copies must end up with."""
    tokens = torch.randint(
        0, 256, (rows, cfg.seq_len + 1), generator=torch.Generator().manual_seed(seed)
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = build_gpt(cfg)
    ref = loss_fn(model(x), y)
    ref.backward()
    grads = {
        f"{i}.{k}": p.grad.clone()
        for i, layer in enumerate(model)
        for k, p in layer.named_parameters()
    }
    grads[f"{cfg.n_layers + 1}.lm_head.weight"] = grads["0.tok.weight"]
    return x, y, ref, grads


def gpt_cases(rank: int, world: int) -> dict[str, Any]:
    """A tied-embedding GPT built from factories: equal to single-process training, and the
    tied copies stay identical."""
    cfg = GPTConfig(seq_len=8, d_model=16, n_layers=2, n_heads=2, tie_embeddings=True, seed=3)
    x, y, ref, ref_grads = tied_gpt_reference(cfg, rows=4, seed=0)
    results: dict[str, Any] = {}
    for case in TIED_GPT_CASES:
        pipe = tied_gpt_pipeline(cfg, case)
        loss = pipe.train_step(x if pipe.is_first else None, y if pipe.is_last else None)
        results[case] = compare(pipe, loss, ref.item(), ref_grads)
    return results


TIED_GPT_CASES = ("1f1b", "zb-h1", "1f1b channels")  # schedule, then p2p mode if not auto


def tied_gpt_pipeline(cfg: GPTConfig, case: str, **options: Any) -> lw.Pipeline:
    """The tied GPT of ``cfg`` as a 2-micro-batch pipeline for one of ``TIED_GPT_CASES``."""
    schedule, _, p2p = case.partition(" ")
    return lw.Pipeline(
        gpt_layers(cfg),
        schedule=schedule,
        p2p=p2p or "auto",
        microbatches=2,
        loss_fn=loss_fn,
        tied=tied_parameter_names(cfg),
        **options,
    )


def dying_worker(rank: int, world: int, victim: int) -> str | None:
    """``victim`` kills itself with SIGKILL during the second step; the others report."""

    class Killer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if rank == victim and self.calls > 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return x

    layers = [nn.Linear(D, D) if i % 2 == 0 else Killer() for i in range(world * 2)]
    pipe = lw.Pipeline(layers, schedule="1f1b", microbatches=2, loss_fn=mse, timeout=20.0)
    x, y = torch.randn(4, D), torch.randn(4, D)
    t0 = time.perf_counter()
    try:
        for _ in range(3):
            pipe.train_step(x, y)
    except lw.PeerError as err:
        return f"{time.perf_counter() - t0:.1f}s {err}"
    return "no error"


def shape_mismatch(rank: int, world: int) -> str:
    """Stage 1 expects 8 features but stage 0 sends 5."""
    layers = [nn.Linear(D, 5), nn.Linear(D, D)]
    pipe = lw.Pipeline(layers, schedule="gpipe", microbatches=1, loss_fn=mse, timeout=20.0)
    try:
        pipe.train_step(torch.randn(3, D), torch.randn(3, D))
    except RuntimeError as err:
        return str(err)
    return "no error"


def divide_by_zero(rank: int, world: int) -> float:
    return 1 / 0


def train_cases(rank: int, world: int, run_root: str, data: str) -> dict[str, Any]:
    """Short training runs on this world size: layouts, and an interrupted run resumed."""
    from layerwise.job.config import TrainConfig
    from layerwise.job.train import train

    base = dict(
        workers=world,
        layers=2,
        d_model=32,
        heads=2,
        seq_len=16,
        batch_size=8,
        steps=4,
        eval_interval=2,
        save_interval=2,
        data=data,
        lr=1e-2,
        warmup=2,
        balance="uniform",
    )
    out: dict[str, Any] = {}
    layouts = [("1f1b", 4), ("gpipe", 2), ("zb-h1", 8), ("auto", 4)] if world > 1 else [("1f1b", 1)]
    for schedule, m in layouts:
        cfg = TrainConfig(
            **base, schedule=schedule, microbatches=m, run_dir=f"{run_root}/{schedule}{world}"
        )
        train(cfg)
        out[f"{schedule} m={m}"] = cfg.run_dir
    if world > 1:
        cut = TrainConfig(**{**base, "steps": 2}, run_dir=f"{run_root}/resumed")
        train(cut)
        train(TrainConfig(**base, run_dir=f"{run_root}/resumed"), resume=True)
        out["resumed"] = cut.run_dir
        # a searched schedule is saved with the run and taken up again on resume
        auto = {**base, "schedule": "auto", "microbatches": 4, "memory_cap": 1.5}
        train(TrainConfig(**{**auto, "steps": 2}, run_dir=f"{run_root}/auto-cut"))
        out["auto searched"] = Path(run_root, "auto-cut", "schedule.txt").read_text()
        train(TrainConfig(**auto, run_dir=f"{run_root}/auto-cut"), resume=True)
        train(TrainConfig(**auto, run_dir=f"{run_root}/auto-whole"))
        out["auto resumed"] = (f"{run_root}/auto-cut", f"{run_root}/auto-whole")
    return out


def one_run(rank: int, world: int, run_dir: str, data: str) -> str:
    """One short 1F1B run with four micro-batches on this world size; returns its directory."""
    from layerwise.job.config import TrainConfig
    from layerwise.job.train import train

    cfg = TrainConfig(workers=world, layers=2, d_model=32, heads=2, seq_len=16, batch_size=8,
                      steps=3, eval_interval=3, save_interval=3, data=data, warmup=1,
                      microbatches=4, balance="uniform", run_dir=run_dir)  # fmt: skip
    train(cfg)
    return run_dir


def big_result(rank: int, world: int) -> bytes:
    return bytes(2**20)  # larger than a pipe buffer: must not block the worker's exit
