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
    """The module torch's tracer cuts before (as LogitsOnly names it): block 2 of 4."""
    return "model.transformer.h.2" if kind == "gpt2" else "model.model.layers.2"


def batch(step: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(step))
    return ids, ids.clone()  # the model shifts its labels itself


def describe(e: BaseException) -> str:
    """The error's first line and that of its innermost cause (torch wraps a stage's error
    in one that says only which stage failed)."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    first = [f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0]}" for x in (e, root)]
    text = first[0] if root is e else f"{first[0]} (cause: {first[1]})"
    return text[:ERROR_CHARS].replace("|", "/")


def agreed(mine: Any) -> list[Any]:
    """Every rank's value (collective on the default group)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def attempt(fn: Any) -> tuple[Any, str | None]:
    """Run ``fn()`` on every rank; return (its value, every rank's error or None)."""
    value, mine = None, None
    try:
        value = fn()
    except Exception as e:
        mine = describe(e)
    found = [f"rank {r}: {e}" for r, e in enumerate(agreed(mine)) if e]
    return value, "; ".join(found) or None


def reference(model: nn.Module, a: argparse.Namespace) -> dict[str, Any]:
    """The unsplit model (a copy) trained on the same batches: its step losses, its step-1
    gradients by parameter name, and its loss on the batch of the second length."""
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=a.lr)
    losses, grads = [], {}
    for step in range(a.steps):
        loss = ref(*batch(step, a.rows, a.length)[:1], labels=batch(step, a.rows, a.length)[1])
        loss = loss.loss
        loss.backward()
        if step == 0:  # by every name: a tied head by its own too
            named = ref.named_parameters(remove_duplicate=False)
            grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    ids, labels = batch(a.steps, a.rows, a.second_length)
    with torch.no_grad():
        second = float(ref(ids, labels=labels).loss)
    return {"losses": losses, "grads": grads, "second": second}


class Ours:
    """layerwise's side of one family on this rank."""

    name = "layerwise"

    def __init__(self, model: nn.Module, kind: str, a: argparse.Namespace, group: Any) -> None:
        self.pipe = ours_build(copy.deepcopy(model), a.microbatches)
        self.model_name = hf_family(model).model_name  # pipeline name -> the model's
        self.opt = torch.optim.AdamW(self.pipe.parameters(), lr=a.lr)
        self.layers = [list(r) for r in self.pipe.partition.ranges]

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float | None:
        return ours_step(self.pipe, ids, labels)

    def named(self) -> Any:
        return self.pipe.named_parameters()

    def zero_grad(self) -> None:
        self.pipe.zero_grad()

    def tied(self) -> torch.Tensor | None:  # GPT-2: the embedding, or the head
        held = dict(self.named())
        return held.get(
            "0.tokens.weight", held.get(f"{len(self.pipe.partition.layers) - 1}.head.weight")
        )


class Theirs(Ours):
    """torch's side of one family on this rank (its own process group)."""

    name = "torch"

    def __init__(self, model: nn.Module, kind: str, a: argparse.Namespace, group: Any) -> None:
        ids_mb = batch(0, a.rows // a.microbatches, a.length)[0]
        built = theirs_build(copy.deepcopy(model), ids_mb, cut_name(kind), a.microbatches, group)
        self.sched, self.stage = built
        self.opt = torch.optim.AdamW(self.stage.submod.parameters(), lr=a.lr)

    def model_name(self, name: str) -> str:
        return name.removeprefix("model.")

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float | None:
        return theirs_step(self.sched, self.stage, ids, labels)

    def named(self) -> Any:
        return self.stage.submod.named_parameters()

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def tied(self) -> torch.Tensor | None:  # its copies of GPT-2's one matrix
        name = "model.transformer.wte.weight" if self.stage.is_first else "model.lm_head.weight"
        return dict(self.named()).get(name)


def train(side: Ours, ids: torch.Tensor, labels: torch.Tensor, grads: Any = None) -> Any:
    """One step and the optimizer's; with ``grads`` (the model's), also the largest gradient
    error: max |g - g_ref| / max |g_ref| over this rank's parameters that have a gradient."""
    loss, worst = side.step(ids, labels), 0.0
    for name, p in side.named() if grads else ():
        if p.grad is not None:  # torch leaves its copy of GPT-2's head unused on stage 0
            want = grads[side.model_name(name)]
            worst = max(worst, float((p.grad - want).abs().max() / want.abs().max()))
    side.opt.step()
    side.zero_grad()
    return loss, worst


def last_value(values: list[Any]) -> Any:
    return [v for v in values if v is not None][-1]


def run_family(kind: str, a: argparse.Namespace, group: Any) -> dict[str, Any]:
    """Both sides on one family (collective)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config(kind))
    ref = reference(model, a)
    result: dict[str, Any] = {"family": kind, "cut": cut_name(kind), "ref_losses": ref["losses"]}
    bare = {cut_name(kind).removeprefix("model."): SplitPoint.BEGINNING}
    _, result["torch_bare_model"] = attempt(  # does torch's tracer take the model itself?
        functools.partial(pipeline, copy.deepcopy(model), (batch(0, 2, a.length)[0],), None, bare)
    )
    sides: dict[str, Ours] = {}
    for cls in (Ours, Theirs):
        side, error = attempt(functools.partial(cls, model, kind, a, group))
        rec = result[cls.name] = {"error": error, "losses": []}
        for step in range(a.steps if error is None else 0):
            grads = ref["grads"] if step == 0 else None
            got, error = attempt(
                functools.partial(train, side, *batch(step, a.rows, a.length), grads)
            )
            if error is not None:
                rec["error"] = error
                break
            everyone = agreed(got)
            rec["losses"].append(last_value([loss for loss, _ in everyone]))
            if step == 0:
                rec["step1_grad_err"] = max(err for _, err in everyone)
        if rec["error"] is None:
            sides[cls.name] = side
            rec["max_loss_diff"] = max(abs(x - y) for x, y in zip(rec["losses"], ref["losses"]))
            if kind == "gpt2":  # the tied copies after the steps, stage 0 against stage 1
                held = [t.detach() for t in agreed(side.tied()) if t is not None]
                rec["tie_gap"] = float((held[0] - held[1]).abs().max())
    if len(sides) == 2:  # tokens/s: one step of each in turn, forward and backward only
        ids, labels = batch(a.steps, a.rows, a.length)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(a.warmup + a.timed_steps):
            for name, side in sides.items():
                took = timed_steps(functools.partial(side.step, ids, labels), 0, 1)
                side.zero_grad()
                times[name] += took if i >= a.warmup else []
        for name in sides:
            result[name]["tokens_per_s"] = a.rows * a.length / median(times[name])
        result["step_s"] = times
    for name, side in sides.items():  # last: a failure may leave torch's group unusable
        got, error = attempt(
            functools.partial(train, side, *batch(a.steps, a.rows, a.second_length))
        )
        loss_diff = None if error else abs(last_value([v[0] for v in agreed(got)]) - ref["second"])
        result[name]["second_length"] = {"error": error, "loss_diff": loss_diff}
    if "layerwise" in sides:
        result["layerwise_layers"] = sides["layerwise"].layers  # type: ignore[attr-defined]
    return result


def worker(rank: int, world: int, families: list[str], a: argparse.Namespace) -> Any:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    timeout = timedelta(seconds=a.torch_timeout)
    results: list[dict[str, Any]] = []
    for kind in families:
        if not results or results[-1]["torch"].get("second_length", {}).get("error"):
            # torch's own group, replaced after a failure (messages may be left in it)
            group = dist.new_group(list(range(world)), timeout=timeout)
        t0 = time.perf_counter()
        results.append(run_family(kind, a, group))
        results[-1]["seconds"] = time.perf_counter() - t0
    return results


def cause(error: str, chars: int = 110) -> str:
    """For the table: of every rank's error, those that are not timeouts (a rank waiting on
    the one that failed only times out), each as its innermost cause, shortened."""
    found = [f for f in re.split(r"(?:^|; )rank \d+: ", error) if f]
    real = [f for f in found if "timed out" not in f.lower()] or found
    short = [f.split("(cause: ", 1)[-1].removesuffix(")") for f in real]
    return "; ".join(f if len(f) <= chars else f[: chars - 3] + "..." for f in short)


def cells(r: dict[str, Any], side: str, lines: int) -> list[Any]:
    s = r[side]
    if s["error"]:
        return [r["family"], side, f"no: {cause(s['error'])}", lines, *["-"] * 6]
    tie = s.get("tie_gap")
    ties = "n/a" if tie is None else "yes" if tie == 0 else f"no (max gap {tie:.1e})"
    second = s["second_length"]
    two = f"yes (loss diff {second['loss_diff']:.1e})" if second["error"] is None else None
    speed, ratio = s.get("tokens_per_s"), "-"
    if speed is not None and side == "layerwise":
        ratio = f"{speed / r['torch']['tokens_per_s']:.2f}"
    return [
        r["family"], side, "yes", lines, f"{s['max_loss_diff']:.1e}",
        f"{s['step1_grad_err']:.1e}", ties, two or f"no: {cause(second['error'])}",
        "-" if speed is None else f"{speed:.0f}", ratio,
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--rows", type=int, default=8, help="rows per batch")
    ap.add_argument("--microbatches", "-m", type=int, default=4)
    ap.add_argument("--length", type=int, default=32, help="tokens per row")
    ap.add_argument("--second-length", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5, help="training steps checked for loss")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed-steps", type=int, default=11)
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
    print(table(headers, [cells(r, s, lines[s]) for r in results for s in ("layerwise", "torch")]))
    bare = [(r["family"], r["torch_bare_model"]) for r in results]
    print("\ntorch's tracer given the model itself, without LogitsOnly:\n")
    print(table(["family", "traces"], [[k, f"no: {cause(b)}" if b else "yes"] for k, b in bare]))
    payload = {"benchmark": "hf_tracer", "config": vars(args), "user_lines": lines}
    write_json(args.json, {**payload, "total_s": total, "results": results})


if __name__ == "__main__":
    main()
