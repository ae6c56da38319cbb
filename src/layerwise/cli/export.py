"""``layerwise export RUN_DIR OUT_DIR``: a run's checkpoint as a model directory."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``export`` on the ``layerwise`` command."""
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as a model directory (save_pretrained's layout)",
        description="Write a run's checkpoint as safetensors with its config and tokenizer, "
        "one layer at a time: AutoModelForCausalLM.from_pretrained(OUT_DIR) loads a Hugging "
        "Face run; 'layerwise train --model OUT_DIR' and 'layerwise generate OUT_DIR' read "
        "either kind.",
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="above this size the weights are split into files with an index (default: 5GB)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        help="floating tensors' type (default: the starting weights' own, else fp32)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerwise.job.export import export, parse_size

    export(args.run_dir, args.out_dir, args.step, parse_size(args.max_shard_size), args.dtype)
    return 0
