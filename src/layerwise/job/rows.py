"""Batches of rows cut from a tokenized corpus (:mod:`layerwise.job.token_cache`).

A row is ``seq_len + 1`` tokens, so that a model whose targets are its inputs shifted by one
(our GPT) and one that shifts labels itself (Hugging Face's) read the same rows
(:meth:`ModelFamily.lm_batch`). How rows are cut:

- **text, packed** (the default): any window of the token stream, as the byte corpus does;
  documents inside it are told apart by position ids that restart at 0 where each begins,
  and the first token of a document is not a target (nothing before it predicts it).
- **prompt/response or messages, packed**: whole examples, one after another, as many as
  fit in a row; the rest of the row is padding that no real token attends to.
- **--no-pack**: one document per row, padded, with an attention mask; a text longer than
  a row continues in the next ones, an example longer than a row is cut.

Batch k is a pure function of (seed, k), so a resumed run sees the batches an uninterrupted
one would, whatever the layout; validation rows are fixed and spread over the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from layerwise.job.data import _step_seed
from layerwise.job.token_cache import Split

IGNORE = -100


@dataclass
class RowBatch:
    """Rows of ``seq_len + 1`` tokens, each (B, seq_len + 1), int64."""

    ids: Tensor
    labels: Tensor  # the ids, -100 where the loss does not count them
    positions: Tensor  # restart at 0 where each document begins
    mask: Tensor | None  # 1 on real tokens, 0 on padding; None for packed rows


class TokenRows:
    """The rows of one split, cut as the module's docstring says."""

    def __init__(self, split: Split, seq_len: int, kind: str, pack: bool, pad_id: int) -> None:
        self.split, self.width, self.pack, self.pad_id = split, seq_len + 1, pack, pad_id
        self.windows = pack and kind == "text"
        lengths = np.diff(np.asarray(split.starts))
        self.cut = 0 if kind == "text" else int((lengths > self.width).sum())
        if self.windows:
            self.ranges = None
            self.num_rows = len(split.ids) - self.width + 1
        else:
            self.ranges = _ranges(np.asarray(split.starts), self.width, kind == "text", pack)
            self.num_rows = len(self.ranges)
        if self.num_rows < 1:
            raise ValueError(
                f"the split holds {len(split.ids)} tokens, fewer than --seq-len + 1 = "
                f"{self.width}; give more data or a shorter --seq-len"
            )

    def rows(self, index: Tensor) -> RowBatch:
        """The rows ``index`` (a 1-D tensor of row numbers)."""
        idx = index.numpy().astype(np.int64)
        w = self.width
        if self.ranges is None:
            begin, end = idx, idx + w
        else:
            begin, end = self.ranges[idx, 0], self.ranges[idx, 1]
        at = begin[:, None] + np.arange(w)[None, :]  # (B, W) absolute positions
        real = at < end[:, None]
        safe = np.where(real, at, 0)
        ids = np.where(real, np.asarray(self.split.ids)[safe], self.pad_id).astype(np.int64)
        counted = np.where(real, np.asarray(self.split.counted)[safe], 0).astype(bool)
        starts = np.asarray(self.split.starts)
        doc = np.searchsorted(starts, safe, side="right") - 1
        first = np.maximum(starts[doc], begin[:, None])
        positions = np.where(real, at - first, 0)
        counted &= ~((at == starts[doc]) & real)  # a document's first token: no target
        if self.pack:  # padding as a document of its own, after the real tokens
            pad_start = np.minimum(end - begin, w)[:, None]
            positions = np.where(real, positions, np.arange(w)[None, :] - pad_start)
        labels = np.where(counted, ids, IGNORE)
        mask = None if self.pack else torch.from_numpy(real.astype(np.int64))
        return RowBatch(torch.from_numpy(ids), torch.from_numpy(labels),
                        torch.from_numpy(positions.astype(np.int64)), mask)  # fmt: skip


def _ranges(starts: np.ndarray, width: int, text: bool, pack: bool) -> np.ndarray:
    """(rows, 2) [begin, end) ranges of the token stream, each at most ``width`` long."""
    out: list[tuple[int, int]] = []
    if pack:  # whole examples, greedily, in order
        row = None
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            if row is not None and b - row <= width:
                out[-1] = (row, b)
                continue
            row = a
            out.append((a, min(b, a + width)))
            if b - a > width:
                row = None  # a cut example fills its row
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        if not text:
            out.append((a, min(b, a + width)))
            continue
        c = a
        while True:  # consecutive rows overlap by one token: every token is a target once
            out.append((c, min(b, c + width)))
            c += width - 1
            if c + 1 >= b:
                break
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


class RowBatcher:
    """Samples training batches of rows and fixes the validation rows."""

    def __init__(self, rows: TokenRows, batch_size: int, seed: int = 0) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    def get_batch(self, step: int, shard: int = 0, num_shards: int = 1) -> RowBatch:
        """Batch ``step`` (a pure function of the seed and the step); replica ``shard`` of
        ``num_shards`` gets its contiguous share of the rows."""
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        index = torch.randint(0, self.rows.num_rows, (self.batch_size,), generator=gen)
        share = self.batch_size // num_shards
        return self.rows.rows(index[shard * share : (shard + 1) * share])

    def eval_batches(self, n: int) -> list[RowBatch]:
        """``n`` fixed batches spread evenly over the split's rows."""
        count = n * self.batch_size
        index = torch.linspace(0, self.rows.num_rows - 1, count).round().to(torch.int64)
        return [self.rows.rows(chunk) for chunk in index.split(self.batch_size)]
