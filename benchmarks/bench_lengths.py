"""What a change of sequence length costs a pipeline step, for a Hugging Face model.

A small Llama (hidden 256 by default, 4 blocks; built from a config, random weights) on two
workers with 1F1B and 4 micro-batches of 2 rows, timed step by step (forward and backward,
no optimizer) in three patterns:

1. **steady**: the same length every step;
2. **in turn**: two lengths alternating, as a bucketing data loader gives them: each is
   remembered (step plan, metadata, receive buffers), so after the first two steps a change
   costs nothing beyond the work at that length;
3. **new every step**: each step a length never seen, then the same length once more; the
   first step at a length pays for the plan broadcast, one metadata message per stream, new
   receive buffers and whatever the kernels themselves pay for a new shape; the second pays
   none of it. Their difference is the cost of the change.

Times are medians over the repeated steps; the new-length cost is the median over lengths
of (first step - second step). Both workers run on this machine's cores.

    .venv/bin/python benchmarks/bench_lengths.py --json runs/lengths.json
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import statistics

import torch

from _common import median, table, write_json
from layerwise.job.launcher import run_workers

ROWS, MICRO = 8, 4


def _timed(pipe: Any, length: int, vocab: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (ROWS, length), generator=gen)
    pipe.zero_grad()
    t0 = time.perf_counter()
    pipe.train_step(ids if pipe.is_first else None, ids if pipe.is_last else None)
    return time.perf_counter() - t0


def worker(
    rank: int, world: int, base: int, other: int, repeats: int, hidden: int
) -> dict[str, Any]:
    import transformers

    import layerwise as lw

    torch.set_num_threads(1)
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    pipe = lw.Pipeline.from_hf(config, schedule="1f1b", microbatches=MICRO)
    vocab = config.vocab_size
    for _ in range(3):  # warm-up at both lengths
        _timed(pipe, base, vocab, 0)
        _timed(pipe, other, vocab, 0)
    steady = [_timed(pipe, base, vocab, i) for i in range(repeats)]
    turns = [_timed(pipe, (base, other)[i % 2], vocab, i) for i in range(2 * repeats)]
    first, second = [], []
    for k in range(repeats):
        length = base + 8 + 4 * k  # never seen before
        first.append(_timed(pipe, length, vocab, k))
        second.append(_timed(pipe, length, vocab, k))
    pool = pipe.transport.pool
    return {
        "steady": steady,
        "in turn base": turns[0::2],
        "in turn other": turns[1::2],
        "new first": first,
        "new second": second,
        "pool allocations": pool.allocations if pool is not None else None,
    }


def quartiles(values: list[float]) -> list[float]:
    return [float(q) for q in statistics.quantiles(values, n=4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--length", type=int, default=128, help="the steady length")
    ap.add_argument("--other", type=int, default=96, help="the length that takes turns with it")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256, help="the model's hidden size")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    res = run_workers(worker, 2, args.length, args.other, args.repeats, args.hidden,
                      timeout_s=900)[0]  # fmt: skip
    steady = median(res["steady"])
    changes = [a - b for a, b in zip(res["new first"], res["new second"], strict=True)]
    rows = [
        [f"steady, length {args.length}", f"{steady * 1e3:.1f}", "1.000"],
        [f"in turn, length {args.length}", f"{median(res['in turn base']) * 1e3:.1f}",
         f"{median(res['in turn base']) / steady:.3f}"],
        [f"in turn, length {args.other}", f"{median(res['in turn other']) * 1e3:.1f}", "-"],
        ["new length, first step", f"{median(res['new first']) * 1e3:.1f}", "-"],
        ["same length, second step", f"{median(res['new second']) * 1e3:.1f}", "-"],
        ["cost of a new length", f"{median(changes) * 1e3:.1f}", "-"],
        ["  its quartiles", " / ".join(f"{q * 1e3:.1f}" for q in quartiles(changes)), "-"],
    ]  # fmt: skip
    print(table(["pattern (worker 0)", "step (ms, median)", "vs steady"], rows))
    write_json(args.json, {"args": vars(args), "worker 0": res, "new length cost s": changes})


if __name__ == "__main__":
    main()
