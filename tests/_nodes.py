"""Run `layerwise train` as two torchrun "nodes" on localhost, for multi-node tests."""

from __future__ import annotations

import subprocess
import sys

from layerwise.job.launcher import free_port


def tiny_model(corpus: str, microbatches: int = 2) -> list[str]:
    """Flags for a model small enough to train in seconds, on ``corpus``."""
    return ["--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "16",
            "--batch-size", "8", "--eval-interval", "2", "--save-interval", "2",
            "--microbatches", str(microbatches), "--data", corpus]  # fmt: skip


def train_on_two_nodes(nproc_per_node: int, train_args: list[str], timeout: float = 240) -> None:
    """Start both nodes, wait for them, and fail with their output if either fails."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(i),
                "--nproc-per-node",
                str(nproc_per_node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "-m",
                "layerwise",
                "train",
                *train_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [n.communicate(timeout=timeout)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
