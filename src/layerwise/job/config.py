"""A run's configuration: every flag of ``layerwise train``, saved as ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerwise.job.checks import check_run
from layerwise.models.family import ModelFamily, get_family
from layerwise.parallel.mesh import Grid


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as config.json and reloaded by --resume."""

    workers: int = 4  # the pipeline degree (pp)
    dp: int = 1
    tp: int = 1
    zero: int = 0  # 1: shard optimizer state across data-parallel replicas
    schedule: str = "1f1b"
    microbatches: int = 8
    chunks: int | None = None
    memory_cap: float | None = None  # --schedule auto: most activation memory per worker
    balance: str = "params"
    recompute: str = "never"  # activation recomputation (Pipeline's ``recompute``)
    precision: str = "fp32"
    model: str = "gpt"  # a model family's name (models.family); older config.json files: gpt
    hf_config: str | None = None  # hf:* families: a Hugging Face config.json (absolute path)
    weights: str | None = None  # a model directory whose weights start the run (--model DIR)
    tokenizer: str | None = None  # a tokenizer directory (absolute); None: bytes
    vocab_size: int | None = None  # our GPT's embedding rows (None: 256, bytes)
    text_field: str = "text"  # the field of a JSON lines / Parquet / datasets record
    pack: bool = True  # pack documents into rows (False: one document per row, padded)
    tokens: str | None = None  # the token cache the workers map (set before they start)
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    tie_embeddings: bool = False
    run_dir: str = ""
    device: str = "cpu"
    data: str | None = None
    data_bytes: int = 4_000_000
    eval_interval: int = 50
    eval_batches: int = 4
    save_interval: int = 100
    max_nonfinite: int = 3
    timeout: float = 120.0
    max_restarts: int = 3  # restarts after a lost worker before the job gives up
    on_save_error: str = "stop"  # stop | continue: what a failed checkpoint save does
    recover_from: str = "replica"  # replica | checkpoint: where restarted workers get state

    def family(self) -> ModelFamily:
        """Return the model this run trains: its family, built from the run's sizes (or, for
        a Hugging Face family, from ``hf_config`` when it is given)."""
        extra: dict[str, Any] = {}
        if self.weights is not None:
            if self.model.startswith("hf"):
                extra["checkpoint"] = self.weights
            else:
                extra["weights"] = str(Path(self.weights) / "model.safetensors")
        if self.vocab_size is not None and not self.model.startswith("hf"):
            extra["vocab_size"] = self.vocab_size
        if self.hf_config is not None:
            if not self.model.startswith("hf"):
                raise ValueError(
                    f"--hf-config is for the Hugging Face model families (--model hf:llama, "
                    f"hf:gpt2, ...), not --model {self.model}; size that one with --layers, "
                    f"--d-model and --heads"
                )
            extra["config"] = self.hf_config
        return get_family(
            self.model,
            seq_len=self.seq_len,
            d_model=self.d_model,
            n_layers=self.layers,
            n_heads=self.heads,
            tie_embeddings=self.tie_embeddings,
            seed=self.seed,
            **extra,
        )

    def grid(self) -> Grid:
        return Grid(dp=self.dp, pp=self.workers, tp=self.tp)

    def architecture(self) -> dict[str, Any]:
        """The fields that shape the model's tensors: a resumed run must keep them (its
        layout, schedule and hyper-parameters may change)."""
        keys = ("model", "hf_config", "layers", "d_model", "heads", "seq_len", "tie_embeddings",
                "vocab_size")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def load_config(run_dir: str | Path) -> TrainConfig:
    """Read a run's ``config.json`` (runs saved before ``recompute`` had its name included)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} holds no run: {path} is missing; give a directory that "
            f"'layerwise train' wrote (its --run-dir)"
        )
    saved = json.loads(path.read_text())
    if "checkpoint" in saved:
        saved["recompute"] = saved.pop("checkpoint")
    return TrainConfig(**saved)


def check_config(cfg: TrainConfig) -> ModelFamily:
    """Raise ValueError if the model's sizes or the layout cannot run; no process needed.
    Return the run's model family."""
    family = cfg.family()
    check_run(cfg, family.num_layers)
    family.check(cfg.grid())
    return family
