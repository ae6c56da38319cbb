"""Hugging Face decoders in 2 pipeline stages on 2 processes (gloo, CPU): layerwise's
``Pipeline.from_hf`` against torch.distributed.pipelining's tracer front end (``pipeline()``,
``build_stage``, ``ScheduleGPipe``).

Per family (GPT-2 with its head tied to the embedding, Llama, Mistral, Qwen2, Gemma2, Phi-3;
tiny ``builtin_config`` models, random weights, seed 0) both sides get a copy of one model,
the same batches and cut ([embeddings, blocks 0-1 | blocks 2-3, head]), GPipe with the same
micro-batches, AdamW; an unsplit copy trains alongside as the reference. Per side: does it
build and train ``--steps`` steps (else every rank's error); user code (lines between the
``# >>> user code`` markers below, without imports, comments, blank lines); the largest
step-loss gap to the reference and step-1 gradient error (max |g - g_ref| / max |g_ref| per
parameter); are GPT-2's tied copies on the two stages equal after the steps; where both work,
tokens/s (a step of each in turn, forward and backward only, median of ``--timed-steps``);
last, a step at ``--second-length`` tokens. torch's side has its own process group, whose
waits end after ``--torch-timeout`` s, so that a hang becomes an error.

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
# the module torch's tracer cuts before (as LogitsOnly names it): block 2 of 4
CUT = {"gpt2": "model.transformer.h.2", **{k: "model.model.layers.2" for k in FAMILIES[1:]}}
LR, WARMUP, ERROR_CHARS = 1e-3, 3, 250  # error: chars per line

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


def theirs_build(model: nn.Module, mb: torch.Tensor, cut: str, m: int, group: Any) -> Any:
    pipe = pipeline(LogitsOnly(model), mb_args=(mb,), split_spec={cut: SplitPoint.BEGINNING})
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


def batch(step: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(step))
    return ids, ids.clone()  # the model shifts its labels itself


def describe(e: BaseException) -> str:
    """The error's first line and that of its innermost cause (torch wraps a stage's error
    in one that says only which stage failed)."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0]}" for x in (e, root)]
    first = [line[:ERROR_CHARS] for line in lines]
    return first[0] if root is e else f"{first[0]} (cause: {first[1]})"


def agreed(mine: Any) -> list[Any]:
    """Every rank's value (collective on the default group)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def attempt(fn: Any) -> tuple[Any, str | None]:
    """Run ``fn()`` on every rank; return (its value here, every rank's error or None)."""
    value, mine = None, None
    try:
        value = fn()
    except Exception as e:
        mine = describe(e).replace("|", "/")
    return value, "; ".join(f"rank {r}: {e}" for r, e in enumerate(agreed(mine)) if e) or None


def reference(model: nn.Module, a: argparse.Namespace) -> dict[str, Any]:
    """The unsplit model (a copy) trained on the same batches: its step losses, its step-1
    gradients under every name (a tied head under its own too), its loss at length 2."""
    ref, losses, grads = copy.deepcopy(model), [], dict[str, torch.Tensor]()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    for step in range(a.steps):
        ids, labels = batch(step, a.rows, a.length)
        loss = ref(ids, labels=labels).loss
        loss.backward()
        named = ref.named_parameters(remove_duplicate=False)
        grads = grads or {n: p.grad.clone() for n, p in named if p.grad is not None}
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    ids, labels = batch(a.steps, a.rows, a.second_length)
    with torch.no_grad():
        return {"losses": losses, "grads": grads, "second": float(ref(ids, labels=labels).loss)}


class Side:
    """One library's pipeline of one family on this rank: its step, a module holding its
    parameters, their names in the model, and the names of its copy of GPT-2's tied matrix
    (the embedding's first: torch's stage 0 also keeps an unused copy of the head)."""

    def __init__(self, name: str, model: nn.Module, kind: str, a: Any, group: Any) -> None:
        self.name, family = name, hf_family(model)
        if name == "layerwise":
            pipe = ours_build(copy.deepcopy(model), a.microbatches)
            self.step: Any = functools.partial(ours_step, pipe)
            self.module, self.rename = pipe.module(), family.model_name
            self.ties = ("0.tokens.weight", f"{family.num_layers - 1}.head.weight")
            self.layers = [list(r) for r in pipe.partition.ranges]
        else:
            mb = batch(0, a.rows // a.microbatches, a.length)[0]
            sched, stage = theirs_build(copy.deepcopy(model), mb, CUT[kind], a.microbatches, group)
            self.step = functools.partial(theirs_step, sched, stage)
            self.module, self.rename = stage.submod, lambda n: n.removeprefix("model.")
            self.ties = ("model.transformer.wte.weight", "model.lm_head.weight")
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=LR)

    def tied(self) -> torch.Tensor | None:
        held = dict(self.module.named_parameters())
        return next((held[n].detach() for n in self.ties if n in held), None)

    def train(self, ids: torch.Tensor, labels: torch.Tensor, grads: Any = None) -> Any:
        """A step and the optimizer's; with the model's ``grads``, also the largest error of
        the gradients this rank holds (torch's unused copy of GPT-2's head has none)."""
        loss, worst = self.step(ids, labels), 0.0
        for name, p in self.module.named_parameters() if grads else ():
            if p.grad is not None:
                want = grads[self.rename(name)]
                worst = max(worst, float((p.grad - want).abs().max() / want.abs().max()))
        self.opt.step()
        self.module.zero_grad(set_to_none=True)
        return loss, worst


def run_family(kind: str, a: argparse.Namespace, group: Any) -> dict[str, Any]:
    """Both sides on one family (collective)."""
    torch.manual_seed(0)
    config = builtin_config(kind, 128, 64, 4, 4, tie_embeddings=kind == "gpt2")
    model = transformers.AutoModelForCausalLM.from_config(config)
    ref = reference(model, a)
    result: dict[str, Any] = {"family": kind, "cut": CUT[kind], "ref_losses": ref["losses"]}
    split = {CUT[kind].removeprefix("model."): SplitPoint.BEGINNING}  # the model itself
    mb = (batch(0, a.rows // a.microbatches, a.length)[0],)
    _, result["torch_bare_model"] = attempt(lambda: pipeline(copy.deepcopy(model), mb, None, split))
    sides: dict[str, Side] = {}
    for name in ("layerwise", "torch"):
        side, error = attempt(functools.partial(Side, name, model, kind, a, group))
        rec = result[name] = {"error": error, "losses": []}
        for step in range(a.steps if error is None else 0):
            grads = ref["grads"] if step == 0 else None
            one = functools.partial(side.train, *batch(step, a.rows, a.length), grads)
            got, rec["error"] = attempt(one)
            if rec["error"] is not None:
                break
            everyone = agreed(got)  # torch's loss is on the last stage only
            rec["losses"].append([loss for loss, _ in everyone if loss is not None][-1])
            rec["step1_grad_err"] = rec.get("step1_grad_err", max(e for _, e in everyone))
        if rec["error"] is None:
            sides[name] = side
            gaps = [abs(x - y) for x, y in zip(rec["losses"], ref["losses"], strict=True)]
            rec["max_loss_diff"] = max(gaps)
            if kind == "gpt2":  # the tied copies after the steps: stage 0's against stage 1's
                held = agreed(side.tied())
                rec["tie_gap"] = float((held[0] - held[1]).abs().max())
    if len(sides) == 2:  # tokens/s: one step of each in turn, forward and backward only
        ids, labels = batch(a.steps, a.rows, a.length)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(WARMUP + a.timed_steps):
            for name, side in sides.items():
                took = timed_steps(functools.partial(side.step, ids, labels), 0, 1)
                side.module.zero_grad(set_to_none=True)
                times[name] += took if i >= WARMUP else []
        for name in sides:
            result[name]["tokens_per_s"] = a.rows * a.length / median(times[name])
        result["step_s"] = times
    for name, side in sides.items():  # last: a failure may leave torch's group unusable
        second = functools.partial(side.train, *batch(a.steps, a.rows, a.second_length))
        got, error = attempt(second)
        loss = None if error else [v[0] for v in agreed(got) if v[0] is not None][-1]
        diff = None if loss is None else abs(loss - ref["second"])
        result[name]["second_length"] = {"error": error, "loss_diff": diff}
    result["layerwise_layers"] = getattr(sides.get("layerwise"), "layers", None)
    return result


def worker(rank: int, world: int, families: list[str], a: argparse.Namespace) -> Any:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    results: list[dict[str, Any]] = []
    for kind in families:
        torch_side: dict[str, Any] = results[-1]["torch"] if results else {"error": "none yet"}
        if torch_side["error"] or torch_side["second_length"]["error"]:  # (re)new its group
            group = dist.new_group(list(range(world)), timeout=timedelta(seconds=a.torch_timeout))
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
    return "; ".join(dict.fromkeys(f if len(f) <= chars else f[: chars - 3] + "..." for f in short))


def cells(r: dict[str, Any], side: str, lines: int) -> list[Any]:
    s = r[side]
    if s["error"]:
        return [r["family"], side, f"no: {cause(s['error'])}", lines, *["-"] * 6]
    tie, second, speed = s.get("tie_gap"), s["second_length"], s.get("tokens_per_s")
    ties = "n/a" if tie is None else "yes" if tie == 0 else f"no (max gap {tie:.1e})"
    two = f"yes (loss diff {second['loss_diff']:.1e})" if second["error"] is None else None
    ratio = f"{speed / r['torch']['tokens_per_s']:.2f}" if speed and side == "layerwise" else "-"
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
    ap.add_argument("--timed-steps", type=int, default=11)
    ap.add_argument("--torch-timeout", type=float, default=30.0)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = run_workers(worker, 2, args.families, args, timeout_s=900)[0]
    total, lines = time.perf_counter() - t0, user_lines()
    print(
        f"2 processes (gloo, CPU), GPipe, {args.rows} rows x {args.length} tokens, "
        f"m = {args.microbatches}, AdamW lr {LR}, {args.steps} steps; tokens/s: median of "
        f"{args.timed_steps} steps after {WARMUP}, alternating; torch {torch.__version__}, "
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
