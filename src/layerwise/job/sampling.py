"""``layerwise generate``: sample text from a trained run; the stages stay on their workers.

Every worker rebuilds its own stages from the run's config and checkpoint (or from a model
directory's weights); the prompt, in the run's tokenizer's ids (bytes for our GPT), enters
on the first worker, logits come out of the last one, which samples the next token and
broadcasts it so the first worker can feed it back in; the text is decoded by the same
tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from layerwise.job import checkpoints as ckpt
from layerwise.job.checks import parse_balance
from layerwise.job.config import TrainConfig, load_config
from layerwise.job.data import encode
from layerwise.job.model_source import resolve
from layerwise.job.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from layerwise.runtime.pipeline import Pipeline


def prompt_bytes(prompt: str) -> bytes:
    """Return the bytes the model reads for ``prompt``; raise ValueError if there are none.
    The model is byte-level, so a command-line prompt that is not valid UTF-8 (its bad bytes
    arrive in argv as surrogate escapes) is taken byte for byte, as the shell gave it."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one character with --prompt")
    try:
        return prompt.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"the prompt holds {prompt[err.start]!r} at position {err.start}, which is neither "
            f"a character nor a raw byte; give text or bytes"
        ) from None


def prompt_tokens(prompt: str) -> torch.Tensor:
    """Return the byte tokens of ``prompt`` (see :func:`prompt_bytes`) as a (1, n) tensor."""
    return encode(prompt_bytes(prompt)).unsqueeze(0)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """Return one token drawn from the last position's ``logits`` (greedy if temperature <= 0)."""
    last = logits[0, -1].float()
    if temperature <= 0:
        return int(last.argmax())
    last = last / temperature
    if 0 < top_k < last.numel():
        cutoff = torch.topk(last, top_k).values[-1]
        last = last.masked_fill(last < cutoff, float("-inf"))
    return int(torch.multinomial(torch.softmax(last, dim=-1), 1, generator=gen))


def sampling_config(path: str | Path, workers: int | None = None) -> tuple[TrainConfig, bool]:
    """(the configuration to sample with, whether weights come from the run's checkpoint)
    for a run directory, or for a model directory (``save_pretrained`` or ``layerwise
    export``), whose weights each worker reads for its own stages."""
    root = Path(path)
    if (root / "checkpoints").exists() or (root / "metrics.jsonl").exists():
        cfg = load_config(root)
        if workers is not None:
            cfg.workers = workers
        return cfg, True
    cfg = TrainConfig(**resolve({"model": str(root)}))
    cfg.workers = workers or 1
    if cfg.hf_config is not None:  # the context the model has positions for
        data = json.loads(Path(cfg.hf_config).read_text())
        limit = data.get("max_position_embeddings") or data.get("n_positions") or cfg.seq_len
        cfg.seq_len = min(cfg.seq_len, int(limit))
    return cfg, False


def sampling_worker(args: argparse.Namespace) -> int:
    """Entry point on one rank: rebuild this worker's stages from the run, then sample."""
    cfg, from_run = sampling_config(args.run_dir, getattr(args, "workers", None))
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.timeout))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    try:
        family = cfg.family()
        pipe = Pipeline(
            family.layers(),
            schedule="gpipe",
            microbatches=1,
            loss_fn=family.loss_fn,
            balance=parse_balance(cfg.balance) if from_run else "params",
            chunks=None,
            tied=family.tied_parameters(),
            timeout=cfg.timeout,
            seed=cfg.seed,
        )
        if from_run:
            run_dir = Path(args.run_dir)
            choice = ckpt.agreed_checkpoint(run_dir / "checkpoints")
            for line in choice.rejected if dist.get_rank() == 0 else []:
                print(f"layerwise: {line}", file=sys.stderr, flush=True)
            if choice.path is None:
                raise FileNotFoundError(f"{run_dir} has no whole checkpoint")
            ckpt.load(choice.path, pipe.module(), None)
        pipe.eval()
        tokenizer = load_tokenizer(cfg.tokenizer)
        tokens = prompt_ids(args.prompt, tokenizer)
        gen = torch.Generator().manual_seed(args.seed)
        last_rank = dist.get_world_size() - 1
        for _ in range(args.tokens):
            context = tokens[:, -cfg.seq_len :]
            logits = pipe.forward(context if pipe.is_first else None)
            nxt = torch.zeros(1, dtype=torch.long)
            if pipe.is_last:  # only ids the tokenizer can decode (the embedding may be larger)
                allowed = logits[..., : tokenizer.size]
                nxt[0] = sample_next(allowed, args.temperature, args.top_k, gen)
            dist.broadcast(nxt, src=last_rank)
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
            if tokenizer.eos_id is not None and int(nxt) == tokenizer.eos_id:
                break
        if dist.get_rank() == 0:
            print(tokenizer.decode(tokens[0].tolist()), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def prompt_ids(prompt: str, tokenizer: Tokenizer) -> torch.Tensor:
    """The prompt's token ids as a (1, n) tensor: bytes as the shell gave them
    (:func:`prompt_bytes`), or the tokenizer's ids."""
    if isinstance(tokenizer, ByteTokenizer):
        return prompt_tokens(prompt)
    ids = tokenizer.encode_many([prompt_bytes(prompt).decode("utf-8", "replace")], first=True)[0]
    if not ids:
        raise ValueError(f"the tokenizer gives no tokens for the prompt {prompt!r}")
    return torch.tensor([ids], dtype=torch.long)
