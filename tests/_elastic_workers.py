"""Worker functions for tests/test_elastic.py (run by launcher.run_workers; importable)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

BASE: dict[str, Any] = dict(layers=2, d_model=32, heads=2, seq_len=16, batch_size=8, steps=4,
                            eval_interval=2, save_interval=2, lr=1e-2, warmup=2,
                            microbatches=2, balance="uniform", tie_embeddings=True)  # fmt: skip


def cut_copy(source: str, target: str, keep_step: int) -> None:
    """Rank 0 copies a finished run and removes its checkpoints after ``keep_step`` and the
    ``latest.json`` pointer, as if the job had died after saving ``keep_step``."""
    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        for path in Path(target, "checkpoints").glob("step_*"):
            if int(path.name.split("_")[1]) > keep_step:
                shutil.rmtree(path)
        Path(target, "checkpoints", "latest.json").unlink()
    dist.barrier()


def four_workers(rank: int, world: int, root: str, data: str) -> dict[str, str]:
    """pp4, and dp2 x pp2 with ZeRO-1, uninterrupted; each cut after step 2 and resumed on
    the other's layout (ZeRO shards to a plain pipeline, and back)."""
    from layerwise.job.config import TrainConfig
    from layerwise.job.train import train

    pp4 = dict(BASE, workers=4, data=data)
    dp2 = dict(BASE, workers=2, dp=2, zero=1, data=data)
    out = {}
    for name, layout in (("pp4", pp4), ("dp2pp2", dp2)):
        train(TrainConfig(**layout, run_dir=f"{root}/{name}"))
        out[name] = f"{root}/{name}"
    cut_copy(out["dp2pp2"], f"{root}/dp2pp2-on-pp4", 2)
    train(TrainConfig(**pp4, run_dir=f"{root}/dp2pp2-on-pp4"), resume=True)
    cut_copy(out["pp4"], f"{root}/pp4-on-dp2pp2", 2)
    train(TrainConfig(**dp2, run_dir=f"{root}/pp4-on-dp2pp2"), resume=True)
    out.update({k: f"{root}/{k}" for k in ("dp2pp2-on-pp4", "pp4-on-dp2pp2")})
    return out


def two_workers(rank: int, world: int, root: str, data: str) -> dict[str, Any]:
    """The pp4 run resumed on two workers; then a disk that fills up at step 4's save, once
    with ``--on-save-error continue`` and once with ``stop``."""
    from layerwise.job import checkpoints as ckpt
    from layerwise.job.config import TrainConfig
    from layerwise.job.train import train

    cut_copy(f"{root}/pp4", f"{root}/pp4-on-pp2", 2)
    train(TrainConfig(**dict(BASE, workers=2, data=data), run_dir=f"{root}/pp4-on-pp2"),
          resume=True)  # fmt: skip
    out: dict[str, Any] = {"pp4-on-pp2": f"{root}/pp4-on-pp2"}
    real_save = ckpt.dcp.save

    def full_disk(state: Any, checkpoint_id: str) -> Any:
        if "step_0000004" in checkpoint_id:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    ckpt.dcp.save = full_disk
    try:
        for mode in ("continue", "stop"):
            cfg = TrainConfig(**dict(BASE, workers=2, data=data), on_save_error=mode,
                              run_dir=f"{root}/full-{mode}")  # fmt: skip
            try:
                out[f"full-{mode}"] = train(cfg)
            except ckpt.SaveError as err:
                out[f"full-{mode}"] = str(err)
    finally:
        ckpt.dcp.save = real_save
    return out
