"""``layerwise plan``: argument parsing and output for the ``plan`` sub-command.

    layerwise plan --model llama3-70b --gpu h100-80gb --gpus 64 --global-batch 1024
    layerwise plan evaluate --layers 96 --hidden 12288 --heads 96 --seq 2048 --vocab 51200 \\
        --gpu a100-80gb --gpus 1024 --tp 8 --pp 8 --micro-batch 1 --global-batch 1536 --json
    layerwise plan --model llama3-70b --gpu h100-80gb --gpus 8 --allow lora,offload,8bit \\
        --host-memory-gib 2048
    layerwise plan evaluate --model bloom-176b --gpus 384 --tp 4 --pp 12 --micro-batch 2 \\
        --layers-per-stage 5,6,6,6,6,6,6,6,6,6,6,5 --recompute full --zero 1
    layerwise plan --local
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Any

from layerwise.planner.evaluate import evaluate
from layerwise.planner.report import render_evaluation, render_plan
from layerwise.planner.search import ALLOWED, Fixed, plan
from layerwise.planner.specs import (
    GPU_PRESETS,
    MODEL_PRESETS,
    MODES,
    OPTIMIZER_BITS,
    PRECISIONS,
    RECOMPUTE,
    ClusterSpec,
    Layout,
    ModelSpec,
    PlanError,
    TrainSpec,
    gpu_preset,
    model_preset,
    schedules,
)
from layerwise.planner.stages import SplitRequest, request_split
from layerwise.planner.timing import DEFAULT_CALIBRATION, Calibration

ARCH = ("layers", "hidden", "heads", "kv_heads", "ffn", "seq", "vocab")
# The small model ``plan --local`` measures when no size is given.
LOCAL_MODEL = {"layers": 8, "hidden": 256, "heads": 4, "seq": 128}
GPU_FIELDS = ("peak_tflops", "memory_gib", "hbm_gbps", "nvlink_gbps", "network_gbps", "host_gbps")


def add_parser(subparsers: Any) -> None:
    """Registers the ``plan`` subcommand (with its ``evaluate`` mode) on ``subparsers``."""
    p = subparsers.add_parser(
        "plan",
        help="choose data/tensor/pipeline degrees for a model and cluster, and explain why",
        description="Rank the layouts that fit, or score one with 'plan evaluate'.",
    )
    p.add_argument("mode", nargs="?", choices=["search", "evaluate"], default="search")
    m = p.add_argument_group("model (a preset, or the architecture; flags override the preset)")
    m.add_argument("--model", help=f"preset: {', '.join(MODEL_PRESETS)}")
    for name in ARCH:
        m.add_argument(f"--{name.replace('_', '-')}", type=int)
    m.add_argument("--gated-mlp", action="store_true", default=None, help="SwiGLU FFN")
    m.add_argument("--flash-attention", action="store_true", default=None)
    c = p.add_argument_group("cluster")
    c.add_argument("--gpu", default="a100-80gb", help=f"preset: {', '.join(GPU_PRESETS)}")
    c.add_argument("--gpus", type=int, help="total GPUs (default: nodes x gpus-per-node)")
    c.add_argument("--nodes", type=int)
    c.add_argument("--gpus-per-node", type=int, default=8)
    for name in GPU_FIELDS:
        c.add_argument(f"--{name.replace('_', '-')}", type=float, help="override the preset")
    c.add_argument("--host-memory-gib", type=float, help="CPU memory of one node (for offload)")
    t = p.add_argument_group("training")
    t.add_argument("--global-batch", type=int, help="sequences per step (default 8 x GPUs)")
    t.add_argument("--precision", choices=PRECISIONS, default="bf16")
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    t.add_argument("--fp32-grads", action="store_true", help="Megatron's fp32 gradients")
    t.add_argument("--no-overlap-grad-reduce", action="store_true")
    t.add_argument("--mode", dest="train_mode", choices=MODES, default="full",
                   help="what is trained (default: %(default)s)")  # fmt: skip
    t.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    t.add_argument("--offload", choices=("optimizer",), help="optimizer states in host memory")
    t.add_argument("--optimizer-bits", type=int, choices=OPTIMIZER_BITS)
    t.add_argument("--allow", default="", help=f"the search may use: {','.join(ALLOWED)}")
    d = p.add_argument_group("layout (fixed degrees; required by 'evaluate')")
    for name in ("dp", "tp", "pp", "vpp", "micro-batch", "zero"):
        d.add_argument(f"--{name}", type=int)
    d.add_argument("--recompute", choices=RECOMPUTE)
    d.add_argument("--layers-per-stage", help="layers of each of the pp x vpp stages: 5,6,6,5")
    d.add_argument("--first-stage-layers", type=int, help="layers on the first pipeline stage")
    d.add_argument("--last-stage-layers", type=int, help="layers on the last pipeline stage")
    d.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction)
    d.add_argument(
        "--schedule",
        choices=(*schedules(), "all"),
        default=schedules()[0],
        help="one stage per worker; --vpp > 1 runs its interleaved form (default: %(default)s)",
    )
    o = p.add_argument_group("output and calibration")
    o.add_argument("--top", type=int, default=5, help="layouts to show")
    o.add_argument("--json", action="store_true", help="print JSON")
    o.add_argument("--local", action="store_true", help="measure this CPU and predict")
    o.add_argument("--workers", type=int, default=2, help="CPU processes for --local")
    o.add_argument("--matmul-efficiency", type=float)
    o.add_argument("--elementwise-traffic", type=float)
    p.set_defaults(func=run_plan)


def model_from_args(args: argparse.Namespace) -> ModelSpec:
    """Returns the preset with overrides, or the model the architecture flags describe."""
    given = {k: getattr(args, k) for k in ARCH if getattr(args, k) is not None}
    for flag in ("gated_mlp", "flash_attention"):
        if getattr(args, flag) is not None:
            given[flag] = getattr(args, flag)
    if args.model:
        return dataclasses.replace(model_preset(args.model), **given)
    missing = [f"--{k}" for k in ("layers", "hidden", "heads", "seq", "vocab") if k not in given]
    if missing:
        raise PlanError(f"give --model PRESET or the architecture (missing {' '.join(missing)})")
    return ModelSpec(name="custom", **given)


def cluster_from_args(args: argparse.Namespace) -> ClusterSpec:
    """Returns the cluster; raises PlanError if the GPU count does not fill whole nodes."""
    gpu = gpu_preset(args.gpu)
    gpu = dataclasses.replace(
        gpu, **{k: getattr(args, k) for k in GPU_FIELDS if getattr(args, k) is not None}
    )
    per_node, host = args.gpus_per_node, args.host_memory_gib
    if args.gpus is None:
        return ClusterSpec(gpu, per_node, 1 if args.nodes is None else args.nodes, host)
    if args.gpus < per_node or per_node < 1:  # the spec rejects a node without GPUs
        return ClusterSpec(gpu, min(args.gpus, per_node), 1, host)
    if args.gpus % per_node:
        raise PlanError(
            f"--gpus {args.gpus} is not a whole number of nodes of {per_node} GPUs "
            f"(set --gpus-per-node, or use {args.gpus // per_node * per_node})"
        )
    return ClusterSpec(gpu, per_node, args.gpus // per_node, host)


def train_from_args(args: argparse.Namespace, gpus: int) -> TrainSpec:
    """Returns the training settings (global batch defaults to 8 sequences per GPU)."""
    return TrainSpec(
        global_batch=8 * gpus if args.global_batch is None else args.global_batch,
        precision=args.precision,
        optimizer=args.optimizer,
        fp32_grads=args.fp32_grads,
        overlap_grad_reduce=not args.no_overlap_grad_reduce,
        mode=args.train_mode,
        lora_rank=args.lora_rank,
    )


def _calibration(args: argparse.Namespace) -> Calibration:
    cal = DEFAULT_CALIBRATION
    if args.matmul_efficiency is not None:
        cal = dataclasses.replace(cal, matmul_efficiency=args.matmul_efficiency)
    if args.elementwise_traffic is not None:
        cal = dataclasses.replace(cal, elementwise_traffic=args.elementwise_traffic)
    return cal


def split_from_args(args: argparse.Namespace) -> SplitRequest:
    """Returns the stage split the flags ask for; raises PlanError on a malformed list."""
    given: tuple[int, ...] = ()
    if args.layers_per_stage:
        try:
            given = tuple(int(x) for x in args.layers_per_stage.split(","))
        except ValueError:
            raise PlanError(
                f"--layers-per-stage must be whole numbers separated by commas, such as "
                f"5,6,6,5; got {args.layers_per_stage!r}"
            ) from None
    return SplitRequest(given, args.first_stage_layers, args.last_stage_layers)


def fixed_from_args(args: argparse.Namespace) -> Fixed:
    """Returns the degrees and choices the flags pin; raises PlanError on a degree below 1."""
    return Fixed(
        dp=args.dp, tp=args.tp, pp=args.pp, vpp=args.vpp, micro_batch=args.micro_batch,
        recompute=args.recompute, zero=args.zero, sequence_parallel=args.sequence_parallel,
        schedules=schedules() if args.schedule == "all" else (args.schedule,),
        offload=True if args.offload else None, optimizer_bits=args.optimizer_bits,
        split=split_from_args(args), allow=tuple(a for a in args.allow.split(",") if a),
    )  # fmt: skip


def _evaluate(args: argparse.Namespace) -> int:
    model, cluster = model_from_args(args), cluster_from_args(args)
    train = train_from_args(args, cluster.gpus)
    fixed = fixed_from_args(args)
    if fixed.tp is None or fixed.pp is None or fixed.micro_batch is None:
        raise PlanError("'plan evaluate' needs --tp, --pp and --micro-batch")
    if cluster.gpus % (fixed.tp * fixed.pp):
        raise PlanError(
            f"{cluster.gpus} GPUs are not divisible by tp x pp = {fixed.tp} x {fixed.pp}"
        )
    lay = Layout(
        dp=fixed.dp or cluster.gpus // (fixed.tp * fixed.pp),
        tp=fixed.tp,
        pp=fixed.pp,
        micro_batch=fixed.micro_batch,
        vpp=fixed.vpp or 1,
        recompute=fixed.recompute or "none",
        sequence_parallel=bool(fixed.sequence_parallel),
        zero=fixed.zero or 0,
        schedule=fixed.schedules[0],
        offload=bool(fixed.offload),
        optimizer_bits=fixed.optimizer_bits or 32,
    )
    lay = dataclasses.replace(lay, stage_layers=request_split(model, lay, fixed.split))
    ev = evaluate(model, cluster, train, lay, _calibration(args))
    print(dumps(ev.to_json()) if args.json else render_evaluation(ev, cluster))
    return 0


def _search(args: argparse.Namespace) -> int:
    model, cluster = model_from_args(args), cluster_from_args(args)
    train = train_from_args(args, cluster.gpus)
    fixed = fixed_from_args(args)
    result = plan(model, cluster, train, fixed, top=args.top, cal=_calibration(args))
    if args.json:
        print(dumps([ev.to_json() for ev in result.ranked]))
    else:
        print(render_plan(result, model, cluster, train, fixed))
    return 0 if result.ranked else 2


def dumps(data: object) -> str:
    """Returns ``data`` as indented JSON with lists of numbers kept on one line (a deep
    pipeline's ``stage_layers`` would otherwise take a line per stage)."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)


def check_counts(args: argparse.Namespace) -> None:
    """Raises PlanError for a count flag below 1 that no spec holds (the specs check their
    own fields when they are built)."""
    for flag, value in (("--gpus", args.gpus), ("--top", args.top), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise PlanError(f"{flag} must be at least 1, got {value}")


def run_plan(args: argparse.Namespace) -> int:
    """Runs ``layerwise plan``; returns the exit code (1 on bad input, 2 if nothing fits)."""
    try:
        check_counts(args)
        if args.local:
            if args.schedule == "all":
                raise PlanError(f"--local simulates one schedule at a time, not {args.schedule!r}")
            return run_local(args)
        return _evaluate(args) if args.mode == "evaluate" else _search(args)
    except PlanError as err:
        print(f"layerwise plan: error: {err}", file=sys.stderr)
        return 1


def run_local(args: argparse.Namespace) -> int:
    """Runs ``layerwise plan --local`` with small defaults; returns the exit code."""
    from layerwise.planner.local import predict_local  # torch is imported only here

    def size(name: str) -> int:
        value = getattr(args, name)
        return LOCAL_MODEL[name] if value is None else int(value)

    # building the spec checks the sizes before anything is measured
    model = ModelSpec("local", size("layers"), size("hidden"), size("heads"), size("seq"), 256)
    train = TrainSpec(16 if args.global_batch is None else args.global_batch)
    micro_batch = fixed_from_args(args).micro_batch or 2
    rows = predict_local(
        layers=model.layers, hidden=model.hidden, heads=model.heads, seq=model.seq,
        micro_batch=micro_batch, global_batch=train.global_batch, workers=args.workers,
        schedule=args.schedule or schedules()[0],
        say=lambda line: print(line, file=sys.stderr, flush=True),  # stdout may be --json
    )  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    first = rows[0]
    print(f"measured one block: forward {float(first['layer_forward_s']) * 1e3:.2f} ms, "
          f"backward {float(first['layer_backward_s']) * 1e3:.2f} ms per micro-batch")  # fmt: skip
    for r in rows:
        print(f"  {r['layout']:16s} {float(r['step_time_s']) * 1e3:8.1f} ms/step, "
              f"bubble {float(r['bubble_fraction']):.1%}")  # fmt: skip
    return 0
