"""What the first and last pipeline workers feed the model: batches of the run's corpus.

Two feeds behind one interface. Our GPT on text files with byte tokens keeps the original
byte corpus (:mod:`layerwise.job.data`), read whole by each feeding worker. Everything else
(a tokenizer, JSON lines, Parquet, a datasets directory, prompts and responses) is tokenized
once before the workers start (:func:`prepare_data`, :mod:`layerwise.job.token_cache`) and
memory-mapped, cut into rows (:mod:`layerwise.job.rows`), and shaped for the model by its
family (:meth:`ModelFamily.lm_batch`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol

import torch

from layerwise.job.data import Batcher, load_splits
from layerwise.job.documents import open_corpus
from layerwise.job.rows import RowBatcher, TokenRows
from layerwise.job.token_cache import open_split, prepare, read_meta
from layerwise.job.tokenizer import load_tokenizer
from layerwise.models.family import ModelFamily

Batch = tuple[Any, Any]  # (inputs, targets) as the pipeline takes them


class Feed(Protocol):
    def batch(self, step: int, shard: int, shards: int) -> Batch: ...

    def validation(self, n: int) -> list[Batch]: ...


def uses_token_cache(cfg: Any) -> bool:
    """Whether the run reads a token cache (anything but byte tokens over text files)."""
    return cfg.tokenizer is not None or open_corpus(cfg.data).form not in ("files", "stdlib")


def settle_vocabulary(cfg: Any) -> None:
    """Our GPT, built fresh, gets an embedding as large as its tokenizer."""
    if cfg.tokenizer is not None and not cfg.model.startswith("hf") and cfg.vocab_size is None:
        cfg.vocab_size = load_tokenizer(cfg.tokenizer).size


def prepare_data(cfg: Any, family: ModelFamily) -> None:
    """Before any worker starts: the tokenizer fits the model's embedding, the corpus is
    readable, and (for a token cache) tokenized once, its folder recorded in ``cfg.tokens``.
    Under torchrun only each node's first process tokenizes; the others wait for it."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    rows = family.embedding_rows()
    if rows is not None and tokenizer.size > rows:
        what = "byte tokens (no --tokenizer)" if cfg.tokenizer is None else cfg.tokenizer
        raise ValueError(
            f"the tokenizer ({what}) gives {tokenizer.size} token ids but the model's "
            f"embedding has {rows} rows; give --tokenizer the model's own tokenizer"
        )
    if not uses_token_cache(cfg):
        return
    corpus = open_corpus(cfg.data, cfg.text_field)
    max_bytes = cfg.data_bytes if corpus.form == "stdlib" else None
    local_rank = os.environ.get("LOCAL_RANK")
    wait = None if local_rank in (None, "0") else 10.0 * cfg.timeout
    cfg.tokens = str(prepare(corpus, tokenizer, max_bytes, 0.1, wait_s=wait))
    meta = read_meta(cfg.tokens)
    train = int(meta["splits"]["train"]["tokens"])
    if local_rank in (None, "0"):
        print(f"layerwise train: {meta['kind']} corpus {corpus.describe()}: {train:,} "
              f"training tokens, {meta['splits']['val']['tokens']:,} held out "
              f"({meta['splits']['val']['docs']} documents); token cache {cfg.tokens}",
              flush=True)  # fmt: skip
    TokenFeed(cfg, family, check_only=True)


class ByteFeed:
    """Byte tokens of text files, as the job has always read them."""

    def __init__(self, cfg: Any, family: ModelFamily) -> None:
        self.family = family
        # validation holds out whole files, drawn from the same corpus (job.data)
        train_text, val_text = load_splits(cfg.data, cfg.data_bytes, 0.1)
        train_tokens, val_tokens = (torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
                                    for b in (train_text, val_text))  # fmt: skip
        self.train = Batcher(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
        self.val = Batcher(val_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)

    def batch(self, step: int, shard: int, shards: int) -> Batch:
        x, y = self.train.get_batch(step, shard, shards)
        return x, self.family.lm_targets(x, y)

    def validation(self, n: int) -> list[Batch]:
        return [(x, self.family.lm_targets(x, y)) for x, y in self.val.eval_batches(n)]


class TokenFeed:
    """Rows of the run's token cache, shaped by the model's family."""

    def __init__(self, cfg: Any, family: ModelFamily, check_only: bool = False) -> None:
        self.family = family
        meta = read_meta(cfg.tokens)
        kind, pad = str(meta["kind"]), int(meta["pad_id"])
        splits = {}
        for name in ("train", "val"):
            try:
                rows = TokenRows(open_split(cfg.tokens, name), cfg.seq_len, kind, cfg.pack, pad)
            except ValueError as err:
                raise ValueError(f"the {name} split: {err}") from None
            splits[name] = RowBatcher(rows, cfg.batch_size, cfg.seed)
        self.train, self.val = splits["train"], splits["val"]
        cut = self.train.rows.cut + self.val.rows.cut
        if check_only and cut and os.environ.get("LOCAL_RANK") in (None, "0"):
            print(f"layerwise train: {cut} examples are longer than --seq-len + 1 "
                  f"({cfg.seq_len + 1}) tokens; their ends are cut", file=sys.stderr,
                  flush=True)  # fmt: skip

    def batch(self, step: int, shard: int, shards: int) -> Batch:
        return self.family.lm_batch(self.train.get_batch(step, shard, shards))

    def validation(self, n: int) -> list[Batch]:
        return [self.family.lm_batch(rows) for rows in self.val.eval_batches(n)]


def make_feed(cfg: Any, family: ModelFamily) -> Feed:
    """The run's feed (on a worker that feeds the pipeline)."""
    return TokenFeed(cfg, family) if cfg.tokens is not None else ByteFeed(cfg, family)
