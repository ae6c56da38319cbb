"""Hugging Face decoders in two pipeline stages: ``layerwise.Pipeline.from_hf`` against
``torch.distributed.pipelining``'s tracer front end (``pipeline()`` + ``build_stage`` +
``ScheduleGPipe``), on 2 processes (gloo, CPU).

For each family (GPT-2 with tied embedding and head, Llama, Mistral, Qwen2, Gemma2, Phi-3;
tiny configurations from ``layerwise.models.hf.builtin_config``, random weights, seed 0)
both sides get a copy of the same model and the same batches, cut before the first decoder
block of the second half ([embeddings, blocks 0-1 | blocks 2-3, head]), GPipe with the same
micro-batches, AdamW. Measured per side:

- works: the pipeline builds and trains ``--steps`` steps at ``--length`` tokens (else the
  first line of the error);
- user lines: lines of code between the ``# >>> user code`` markers of this file (imports,
  comments and blank lines not counted; the optimizer line, alike on both sides, neither);
- loss: the largest difference over the steps between the side's step loss and the loss of
  the unsplit model trained alongside with the same optimizer, and the largest gradient
  error of step 1 (max |g - g_ref| / max |g_ref| over the parameters a worker holds);
- ties: whether the tied embedding and head are still equal across the two stages after
  the steps (GPT-2 only);
- second length: one more step at ``--second-length`` tokens (loss against the model's);
- tokens/s: where both sides work, after the steps above, one step of each in turn (median
  of ``--timed-steps`` after ``--warmup``; forward and backward, no optimizer step, so that
  the weights stay those the second length is checked with); and ours / theirs.

Torch's side runs in its own process group whose waits end after ``--torch-timeout``
seconds, so that a torch step that hangs becomes an error; a new one replaces it after one.

    .venv/bin/python benchmarks/bench_hf_tracer.py --json runs/hf_tracer.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.pipelining import ScheduleGPipe, SplitPoint, build_stage, pipeline
from transformers.loss.loss_utils import ForCausalLMLoss

import layerwise as lw
from _common import median, table, timed_steps, write_json
from layerwise.job.launcher import run_workers
from layerwise.models.hf import builtin_config, hf_family

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma2", "phi3")
ERROR_CHARS = 400

# >>> user code: layerwise


def ours_build(model: nn.Module, m: int) -> lw.Pipeline:
    return lw.Pipeline.from_hf(model, schedule="gpipe", microbatches=m)


def ours_step(pipe: lw.Pipeline, ids: torch.Tensor, labels: torch.Tensor) -> float:
    return pipe.train_step(ids if pipe.is_first else None, labels if pipe.is_last else None)


# <<< user code
# >>> user code: torch


class LogitsOnly(nn.Module):
    # stages pass tensors: keep the logits of the model's output, and no KV cache
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, use_cache=False).logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def theirs_build(
    model: nn.Module, ids_mb: torch.Tensor, cut: str, m: int, group: dist.ProcessGroup
) -> tuple[Any, Any]:
    split = {cut: SplitPoint.BEGINNING}
    pipe = pipeline(LogitsOnly(model), mb_args=(ids_mb,), split_spec=split)
    rank = dist.get_rank(group)
    stage = build_stage(pipe.get_stage_module(rank), rank, pipe.info(), torch.device("cpu"), group)
    return ScheduleGPipe(stage, m, loss_fn=causal_lm_loss), stage


def theirs_step(schedule: Any, stage: Any, ids: torch.Tensor, labels: torch.Tensor) -> Any:
    losses: list[torch.Tensor] = []
    if stage.is_first:
        schedule.step(ids)
    else:
        schedule.step(target=labels, losses=losses)
    return float(torch.stack(losses).mean()) if losses else None


# <<< user code


def user_lines() -> dict[str, int]:
    """Count the code lines of each ``# >>> user code: NAME`` region of this file."""
    counts: dict[str, int] = {}
    name = None
    for line in Path(__file__).read_text().splitlines():
        if m := re.match(r"# >>> user code: (\w+)", line):
            name, counts[m.group(1)] = m.group(1), 0
        elif line.startswith("# <<< user code"):
            name = None
        elif name and line.strip() and not line.strip().startswith("#"):
            counts[name] += 1
    return counts


def family_config(kind: str) -> Any:
    """4 blocks, width 64, 4 heads, vocabulary 256, 128 positions; GPT-2's head tied."""
    return builtin_config(kind, 128, 64, 4, 4, tie_embeddings=kind == "gpt2")


def cut_name(kind: str) -> str:
    """The module torch's tracer cuts before (LogitsOnly's view): block 2 of 4."""
    return "model.transformer.h.2" if kind == "gpt2" else "model.model.layers.2"


def batch(step: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(step))
    return ids, ids.clone()  # the model shifts its labels itself


def describe(e: BaseException) -> str:
    """The error's first line, and that of its innermost cause (torch wraps a stage's error
    in one whose first line says only which stage failed)."""

    def first(x: BaseException) -> str:
        lines = [ln.strip() for ln in str(x).strip().splitlines() if ln.strip()]
        return f"{type(x).__name__}: {lines[0] if lines else ''}"

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    text = first(e) if root is e else f"{first(e)} (cause: {first(root)})"
    return text[:ERROR_CHARS].replace("|", "/")


def agreed(mine: Any) -> list[Any]:
    """Every rank's value (collective on the default group)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def first_error(mine: str | None) -> str | None:
    found = [f"rank {r}: {e}" for r, e in enumerate(agreed(mine)) if e]
    return "; ".join(found) if found else None


def reference(model: nn.Module, a: argparse.Namespace) -> dict[str, Any]:
    """The unsplit model (a copy) trained on the same batches: its step losses, its step-1
    gradients by parameter name, and its loss on the batch of the second length."""
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=a.lr)
    losses, grads = [], {}
    for step in range(a.steps):
        ids, labels = batch(step, a.rows, a.length)
        loss = ref(ids, labels=labels).loss
        loss.backward()
        if step == 0:
            named = ref.named_parameters(remove_duplicate=False)  # a tied head by name too
            grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    ids, labels = batch(a.steps, a.rows, a.second_length)
    with torch.no_grad():
        second = float(ref(ids, labels=labels).loss)
    return {"losses": losses, "grads": grads, "second": second}


def grad_error(named: Any, grads: dict[str, torch.Tensor], rename: Any) -> float:
    worst = 0.0
    for name, p in named:
        if p.grad is None:
            continue  # e.g. the copy of GPT-2's head that torch leaves unused on stage 0
        want = grads[rename(name)]
        err = float((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-30))
        worst = max(worst, err)
    return worst


def tie_gap(mine: torch.Tensor | None) -> float | None:
    """Largest difference between the tied copies the two ranks hold (collective)."""
    held = [t for t in agreed(mine) if t is not None]
    return float((held[0] - held[-1]).abs().max()) if len(held) == 2 else None


def bare_trace(model: nn.Module, kind: str, a: argparse.Namespace) -> str:
    """Whether torch's tracer takes the Hugging Face model itself, with no wrapper."""
    ids_mb = batch(0, a.rows // a.microbatches, a.length)[0]
    cut = cut_name(kind).removeprefix("model.")
    try:
        pipeline(copy.deepcopy(model), mb_args=(ids_mb,), split_spec={cut: SplitPoint.BEGINNING})
    except Exception as e:
        return f"no: {describe(e)}"
    return "yes"


class Side:
    """One library's pipeline of one family on this rank, and what was seen of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: str | None = None
        self.losses: list[float] = []
        self.grad_err: float | None = None
        self.opt: Any = None

    def record(self, build: Any) -> None:
        """Run ``build()`` (or a step) on every rank; keep the first error seen anywhere."""
        mine = None
        if self.error is None:
            try:
                build()
            except Exception as e:
                mine = describe(e)
        self.error = self.error or first_error(mine)


def run_family(
    kind: str, a: argparse.Namespace, tgroup: dist.ProcessGroup, rank: int
) -> tuple[dict[str, Any], bool]:
    """Both sides on one family; returns (result, whether torch's group needs replacing)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config(kind))
    ref = reference(model, a)
    ours, theirs = Side("layerwise"), Side("torch")
    bare = bare_trace(model, kind, a) if rank == 0 else None
    st: dict[str, Any] = {}

    def build_ours() -> None:
        st["pipe"] = ours_build(copy.deepcopy(model), a.microbatches)
        st["family"] = hf_family(model)  # names only: maps pipeline names to the model's
        ours.opt = torch.optim.AdamW(st["pipe"].parameters(), lr=a.lr)
        st["ranges"] = [list(r) for r in st["pipe"].partition.ranges]

    def build_theirs() -> None:
        ids_mb = batch(0, a.rows // a.microbatches, a.length)[0]
        cut = cut_name(kind)
        st["sched"], st["stage"] = theirs_build(
            copy.deepcopy(model), ids_mb, cut, a.microbatches, tgroup
        )
        theirs.opt = torch.optim.AdamW(st["stage"].submod.parameters(), lr=a.lr)

    def step_ours(step: int, length: int) -> float:
        pipe = st["pipe"]
        loss = ours_step(pipe, *batch(step, a.rows, length))
        if step == 0:
            rename = st["family"].model_name
            ours.grad_err = grad_error(pipe.named_parameters(), ref["grads"], rename)
        ours.opt.step()
        pipe.zero_grad()
        return loss

    def step_theirs(step: int, length: int) -> float | None:
        stage = st["stage"]
        loss = theirs_step(st["sched"], stage, *batch(step, a.rows, length))
        if step == 0:
            rename = lambda n: n.removeprefix("model.")  # noqa: E731
            theirs.grad_err = grad_error(stage.submod.named_parameters(), ref["grads"], rename)
        theirs.opt.step()
        theirs.opt.zero_grad()
        return loss

    ours.record(build_ours)
    theirs.record(build_theirs)
    steppers = {"layerwise": step_ours, "torch": step_theirs}
    for side in (ours, theirs):
        for step in range(a.steps):
            box: list[Any] = []
            side.record(lambda s=side, k=step, b=box: b.append(steppers[s.name](k, a.length)))
            loss = [v for v in agreed(box[0] if box else None) if v is not None]
            if side.error is None:
                side.losses.append(loss[-1])
    result: dict[str, Any] = {"family": kind, "cut": cut_name(kind), "ref_losses": ref["losses"]}
    result["layerwise_layers"] = st.get("ranges")  # pipeline layers per stage
    result["torch_bare_model"] = bare
    for side in (ours, theirs):
        gaps = [abs(x - y) for x, y in zip(side.losses, ref["losses"], strict=False)]
        result[side.name] = {
            "error": side.error,
            "losses": side.losses,
            "max_loss_diff": max(gaps) if side.error is None else None,
            "step1_grad_err": max(v for v in agreed(side.grad_err) if v is not None)
            if side.error is None
            else None,
        }
    # tied copies, after the steps (GPT-2): the embedding on stage 0, the head on stage 1
    if kind == "gpt2":
        held = dict(st["pipe"].named_parameters()) if ours.error is None else {}
        t = held.get("0.tokens.weight", held.get("5.head.weight"))
        result["layerwise"]["tie_gap"] = tie_gap(None if t is None else t.detach())
        held = dict(st["stage"].submod.named_parameters()) if theirs.error is None else {}
        name = "model.transformer.wte.weight" if rank == 0 else "model.lm_head.weight"
        t = held.get(name)
        result["torch"]["tie_gap"] = tie_gap(None if t is None else t.detach())
    # tokens/s, alternating one step of each, where both work; forward and backward only
    # (no optimizer step: the weights stay those the second length is checked against)
    tokens = a.rows * a.length
    if ours.error is None and theirs.error is None:
        t_ours: list[float] = []
        t_theirs: list[float] = []
        ids, labels = batch(a.steps, a.rows, a.length)
        pipe, sched, stage = st["pipe"], st["sched"], st["stage"]
        for i in range(a.warmup + a.timed_steps):
            one = timed_steps(functools.partial(ours_step, pipe, ids, labels), 0, 1)
            pipe.zero_grad()
            two = timed_steps(functools.partial(theirs_step, sched, stage, ids, labels), 0, 1)
            theirs.opt.zero_grad()
            if i >= a.warmup:
                t_ours += one
                t_theirs += two
        result["layerwise"]["tokens_per_s"] = tokens / median(t_ours)
        result["torch"]["tokens_per_s"] = tokens / median(t_theirs)
        result["step_s"] = {"layerwise": t_ours, "torch": t_theirs}
    # one step at another length, last: a failure may leave torch's group unusable
    ref2 = ref["second"]
    for side in (ours, theirs):
        out: dict[str, Any] = {"error": side.error and "(did not build or train)"}
        if side.error is None:
            box = []
            t0 = time.perf_counter()
            side.record(lambda s=side, b=box: b.append(steppers[s.name](a.steps, a.second_length)))
            out["seconds"] = time.perf_counter() - t0
            got = [v for v in agreed(box[0] if box else None) if v is not None]
            out["error"] = side.error
            if side.error is None:
                out["loss_diff"] = abs(got[-1] - ref2)
        result[side.name]["second_length"] = out
    return result, theirs.error is not None


def worker(rank: int, world: int, families: list[str], a: argparse.Namespace) -> Any:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    timeout = timedelta(seconds=a.torch_timeout)
    tgroup = dist.new_group(list(range(world)), timeout=timeout)
    results = []
    for kind in families:
        t0 = time.perf_counter()
        result, broken = run_family(kind, a, tgroup, rank)
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        if broken:  # messages of the failed step may be left in it
            tgroup = dist.new_group(list(range(world)), timeout=timeout)
        dist.barrier()
    return results


def cause(error: str) -> str:
    """Of every rank's error, those that are not timeouts (a rank waiting on the one that
    failed only times out), for the table; the JSON keeps all."""
    found = [f for f in re.split(r"(?:^|; )rank \d+: ", error) if f]
    real = [f for f in found if "timed out" not in f.lower()]
    return "; ".join(real or found)


def cells(r: dict[str, Any], side: str, lines: int) -> list[Any]:
    s = r[side]
    if s["error"]:
        return [r["family"], side, f"no: {cause(s['error'])}", lines, *["-"] * 6]
    tie = s.get("tie_gap")
    ties = (
        "n/a (untied)" if "tie_gap" not in s else "yes" if tie == 0 else f"no (max gap {tie:.1e})"
    )
    second = s["second_length"]
    two = (
        f"yes (loss diff {second['loss_diff']:.1e})"
        if second["error"] is None
        else f"no: {cause(second['error'])}"
    )
    speed = s.get("tokens_per_s")
    ratio = "-"
    if speed is not None and side == "layerwise":
        ratio = f"{speed / r['torch']['tokens_per_s']:.2f}"
    return [
        r["family"],
        side,
        "yes",
        lines,
        f"{s['max_loss_diff']:.1e}",
        f"{s['step1_grad_err']:.1e}",
        ties,
        two,
        "-" if speed is None else f"{speed:.0f}",
        ratio,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--rows", type=int, default=8, help="rows per batch")
    ap.add_argument("--microbatches", "-m", type=int, default=4)
    ap.add_argument("--length", type=int, default=32, help="tokens per row")
    ap.add_argument("--second-length", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5, help="training steps checked for loss")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timed-steps", type=int, default=7)
    ap.add_argument("--torch-timeout", type=float, default=30.0)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = run_workers(worker, 2, args.families, args, timeout_s=900)[0]
    total = time.perf_counter() - t0
    lines = user_lines()
    print(
        f"2 processes (gloo, CPU), GPipe, {args.rows} rows x {args.length} tokens, "
        f"m = {args.microbatches}, AdamW lr {args.lr}, {args.steps} steps; tokens/s: median "
        f"of {args.timed_steps} steps after {args.warmup}, alternating; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; total {total:.0f} s\n"
    )
    headers = [
        "family", "side", "works", "user lines", "max loss diff", "step-1 grad err",
        "ties in sync", f"step at T={args.second_length}", "tokens/s", "ours/theirs",
    ]  # fmt: skip
    rows = [cells(r, s, lines[s]) for r in results for s in ("layerwise", "torch")]
    print(table(headers, rows))
    print("\ntorch's tracer on the model itself, no wrapper (rank 0):\n")
    print(table(["family", "traces"], [[r["family"], r["torch_bare_model"]] for r in results]))
    payload = {"benchmark": "hf_tracer", "config": vars(args), "user_lines": lines}
    write_json(args.json, {**payload, "total_s": total, "results": results})


if __name__ == "__main__":
    main()
