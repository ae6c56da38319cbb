"""Tokenize a corpus once and keep the ids on disk for every worker to memory-map.

The cache lives in ``$LAYERWISE_CACHE`` (default ``~/.cache/layerwise``) under
``tokens/<key>``, where the key digests the corpus (its files' names, sizes and times), the
tokenizer (its files) and the settings that change the ids. A resumed or restarted run, or a
new run on the same corpus, finds it and tokenizes nothing; a worker maps the files, so its
memory does not grow with the corpus. Each split (``train``, ``val``) is three files:

- ``<split>.ids``: the documents' token ids one after another (int32), each document
  ending with the separator (the tokenizer's end-of-sequence token; a newline for bytes),
- ``<split>.counted``: one byte per id, 1 where the loss counts it (0 on prompts),
- ``<split>.starts.npy``: where each document starts, and the end.

Documents go to validation by a hash of their key (:mod:`layerwise.job.documents`), as
whole documents; a corpus whose documents all land on one side is cut by position instead.
The folder is written under a temporary name and renamed when complete, so a crash leaves
nothing half-written behind and concurrent builders cannot collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerwise.job.documents import (
    Corpus,
    Record,
    check_corpus,
    fingerprint,
    iter_documents,
    record_kind,
    source_bytes,
)
from layerwise.job.tokenizer import Segments, Tokenizer

FORMAT = 1
SPLITS = ("train", "val")
META = "meta.json"
_BATCH = 512


def cache_root() -> Path:
    """Where token caches are kept: ``$LAYERWISE_CACHE/tokens`` or ``~/.cache/layerwise``."""
    base = os.environ.get("LAYERWISE_CACHE") or Path.home() / ".cache" / "layerwise"
    return Path(base) / "tokens"


def cache_key(corpus: Corpus, tokenizer: Tokenizer, max_bytes: int | None, val: float) -> str:
    """The digest that names a corpus's cache."""
    parts = [FORMAT, fingerprint(corpus), tokenizer.fingerprint(), max_bytes, val]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=12).hexdigest()


@dataclass
class Split:
    """One split of a cached corpus, memory-mapped."""

    ids: np.ndarray  # (N,) int32
    counted: np.ndarray  # (N,) uint8
    starts: np.ndarray  # (D + 1,) int64: document d is ids[starts[d]:starts[d + 1]]

    @property
    def num_docs(self) -> int:
        return len(self.starts) - 1


def open_split(cache: str | Path, name: str) -> Split:
    """Map split ``name`` of the cache at ``cache`` (no copy is read into memory)."""
    root = Path(cache)
    meta = read_meta(root)
    n = int(meta["splits"][name]["tokens"])
    ids = np.memmap(root / f"{name}.ids", dtype=np.int32, mode="r", shape=(n,))
    counted = np.memmap(root / f"{name}.counted", dtype=np.uint8, mode="r", shape=(n,))
    starts = np.load(root / f"{name}.starts.npy", mmap_mode="r")
    return Split(ids, counted, starts)


def read_meta(cache: str | Path) -> dict[str, Any]:
    path = Path(cache) / META
    if not path.exists():
        raise FileNotFoundError(
            f"the token cache {cache} is missing or incomplete; start the run with "
            f"'layerwise train' (it tokenizes the corpus again)"
        )
    return dict(json.loads(path.read_text()))


def record_segments(record: Record, text_field: str, tokenizer: Tokenizer) -> Segments:
    """A record's text pieces, each with whether the loss counts it."""
    kind = record_kind(record, text_field)
    if kind == "text":
        return [(record[text_field], True)]
    if kind == "prompt/response":
        return [(record["prompt"], False), (record["response"], True)]
    return tokenizer.chat(record["messages"])


def tokenize_records(
    records: Iterable[Record], text_field: str, tokenizer: Tokenizer
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (ids, counted flags) of each record, the separator appended, tokenized in
    batches (the tokenizer's batch encoding is much faster than one call per text)."""
    sep = tokenizer.separator
    batch: list[Segments] = []

    def flush() -> Iterator[tuple[list[int], list[int]]]:
        firsts = tokenizer.encode_many([segs[0][0] for segs in batch], first=True)
        rests = [s for segs in batch for s in segs[1:]]
        rest_ids = iter(tokenizer.encode_many([t for t, _ in rests], first=False))
        for segs, head in zip(batch, firsts, strict=True):
            ids, counted = list(head), [int(segs[0][1])] * len(head)
            for _, flag in segs[1:]:
                more = next(rest_ids)
                ids += more
                counted += [int(flag)] * len(more)
            ids += sep
            counted += [int(segs[-1][1])] * len(sep)
            yield ids, counted
        batch.clear()

    for record in records:
        batch.append(record_segments(record, text_field, tokenizer))
        if len(batch) >= _BATCH:
            yield from flush()
    if batch:
        yield from flush()


def prepare(
    corpus: Corpus,
    tokenizer: Tokenizer,
    max_bytes: int | None = None,
    val_fraction: float = 0.1,
    root: Path | None = None,
    wait_s: float | None = None,
) -> Path:
    """Return the cache of ``corpus`` tokenized by ``tokenizer``, building it if there is none.
    ``wait_s``: instead of building, wait up to this long for another process to finish it
    (the other ranks of a job under torchrun)."""
    folder = (root or cache_root()) / cache_key(corpus, tokenizer, max_bytes, val_fraction)
    if (folder / META).exists():
        return folder
    if wait_s is not None:
        deadline = time.monotonic() + wait_s
        while not (folder / META).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no token cache appeared at {folder} within {wait_s:.0f}s")
            time.sleep(0.5)
        return folder
    kind = check_corpus(corpus)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        counts = _write(tmp, corpus, tokenizer, max_bytes, val_fraction)
        if counts["train"]["tokens"] == 0:
            raise ValueError(f"--data {corpus.describe()} gave no tokens; give a corpus with text")
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        meta = {"format": FORMAT, "corpus": corpus.describe(), "kind": kind,
                "tokenizer": tokenizer.fingerprint(), "pad_id": pad, "splits": counts,
                "made_s": round(time.time(), 1)}  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first
            if not (folder / META).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class _SplitWriter:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.ids = (folder / f"{name}.ids").open("wb")
        self.counted = (folder / f"{name}.counted").open("wb")
        self.starts = [0]

    def add(self, ids: list[int], counted: list[int]) -> None:
        self.ids.write(np.asarray(ids, dtype=np.int32).tobytes())
        self.counted.write(np.asarray(counted, dtype=np.uint8).tobytes())
        self.starts.append(self.starts[-1] + len(ids))

    def close(self) -> dict[str, int]:
        self.ids.close()
        self.counted.close()
        np.save(self.folder / f"{self.name}.starts.npy", np.asarray(self.starts, np.int64))
        return {"tokens": self.starts[-1], "docs": len(self.starts) - 1}


def _write(
    folder: Path, corpus: Corpus, tokenizer: Tokenizer, max_bytes: int | None, val: float
) -> dict[str, dict[str, int]]:
    writers = {name: _SplitWriter(folder, name) for name in SPLITS}
    cut = int(val * 2**64)
    sides: list[str] = []
    progress = Progress(source_bytes(corpus) if max_bytes is None else max_bytes)

    def records() -> Iterator[Record]:
        for key, record in iter_documents(corpus, max_bytes):
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            sides.append("val" if int.from_bytes(digest, "little") < cut else "train")
            progress.add(sum(len(v) for v in record.values() if isinstance(v, str)))
            yield record

    for n, (ids, counted) in enumerate(tokenize_records(records(), corpus.text_field, tokenizer)):
        writers[sides[n]].add(ids, counted)
    progress.close()
    counts = {name: w.close() for name, w in writers.items()}
    if counts["val"]["docs"] == 0 or counts["train"]["docs"] == 0:
        counts = _cut_by_position(folder, "train" if counts["train"]["docs"] else "val", val)
    return counts


def _cut_by_position(folder: Path, side: str, val: float) -> dict[str, dict[str, int]]:
    """All documents landed on ``side``: hold out the last documents holding about ``val``
    of the tokens (or, when they are too few or too uneven for that, the tail by position)."""
    starts = np.load(folder / f"{side}.starts.npy")
    ids = np.fromfile(folder / f"{side}.ids", dtype=np.int32)
    counted = np.fromfile(folder / f"{side}.counted", dtype=np.uint8)
    total = int(starts[-1])
    target = total - int(total * val)
    inner = starts[1:-1]
    at = int(inner[np.argmin(np.abs(inner - target))]) if len(inner) else target
    if len(inner) == 0 or min(at, total - at) < 0.5 * min(target, total - target):
        at = target  # documents too uneven to cut between them: cut inside one
    pieces = {"train": (0, at), "val": (at, total)}
    counts = {}
    for name, (a, b) in pieces.items():
        ids[a:b].tofile(folder / f"{name}.ids")
        counted[a:b].tofile(folder / f"{name}.counted")
        kept = starts[(starts > a) & (starts < b)] - a
        bounds = np.concatenate([[0], kept, [b - a]]).astype(np.int64)
        np.save(folder / f"{name}.starts.npy", bounds)
        counts[name] = {"tokens": b - a, "docs": len(bounds) - 1}
    return counts


class Progress:
    """Progress of a long tokenization on stderr: a bar on a terminal, a line every 15 s in
    a log; silent for the first 2 s (a small corpus says nothing)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = max(1, total), 0, time.monotonic()
        self.last = self.start
        self.bar: Any = None

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start < 2.0:
            return
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="B", unit_scale=True,
                                desc="tokenizing", file=sys.stderr)  # fmt: skip
                self.bar.update(self.done - n)
            self.bar.update(n)
        elif now - self.last >= 15.0:
            self.last = now
            rate = self.done / (now - self.start) / 1e6
            print(f"layerwise: tokenizing, {self.done / 1e6:.0f} of {self.total / 1e6:.0f} MB "
                  f"({rate:.1f} MB/s)", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.start
        if elapsed >= 2.0:
            print(f"layerwise: tokenized {self.done / 1e6:.1f} MB in {elapsed:.0f}s",
                  file=sys.stderr, flush=True)  # fmt: skip
