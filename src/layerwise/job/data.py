"""Byte-level corpora and deterministic batching; nothing is downloaded.

The default corpus is the Python standard library's own source, drawn from the whole
library, with whole files held out for validation (chosen by a hash of their path), so that
training and validation text come from the same distribution. Tokens are bytes
(vocabulary 256). Batch k is a pure function of (seed, k), so a resumed run sees exactly
the batches an uninterrupted one would, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_MAX_BYTES = 8_000_000
VOCAB_SIZE = 256

# Directories that hold tests, third-party packages or caches rather than library source.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_SNIFF_BYTES = 8192


def stdlib_files() -> list[Path]:
    """Return the standard library's ``*.py`` files, sorted, without tests or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in _sorted_files(root) if p.suffix == ".py"]


def _sorted_files(root: Path) -> list[Path]:
    """Return regular files under ``root`` sorted by relative POSIX path (platform-stable)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages, which can be huge.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(files)]


def _is_text(path: Path) -> bool:
    """A file is text-like when its first bytes contain no NUL (the usual binary marker)."""
    with path.open("rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def require_text(path: Path) -> None:
    """Raise ValueError if the file ``path`` is not text: the job reads bytes, so a binary
    file would train without complaint."""
    if not _is_text(path):
        raise ValueError(
            f"--data {str(path)!r} is not text (it holds NUL bytes); give a text file or a "
            f"folder of text files"
        )


def _concatenate(files: Sequence[Path], max_bytes: int) -> bytes:
    """Join the files with newlines, in order, truncating to ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    for path in files:
        if total >= max_bytes:
            break
        chunk = path.read_bytes() + b"\n"
        chunks.append(chunk[: max_bytes - total])
        total += len(chunks[-1])
    return b"".join(chunks)


def _path_hash(name: str) -> int:
    """A stable 64-bit hash of a file's relative path (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _corpus_files(path: str | Path | None) -> tuple[Path, list[Path], str]:
    """(root, its text files in sorted order, a description for messages)."""
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, stdlib_files(), f"the standard library at {root}"
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"corpus path {str(root)!r} does not exist")
    if root.is_file():
        require_text(root)
        return root.parent, [root], repr(str(root))
    return root, [p for p in _sorted_files(root) if _is_text(p)], repr(str(root))


def load_splits(
    path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.1
) -> tuple[bytes, bytes]:
    """Return (training text, validation text), about ``max_bytes`` in all.

    Whole files are held out for validation: a file is in it when the hash of its relative
    path falls in the lowest ``val_fraction`` of the range. Each side then takes its files in
    hash order (a deterministic draw from the whole corpus, not its first directories) up to
    its share of ``max_bytes``. A single file, or a folder whose files all land on one side,
    is split by position instead: the last ``val_fraction`` of the text is validation.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root, files, source = _corpus_files(path)
    keyed = sorted((_path_hash(f.relative_to(root).as_posix()), f) for f in files)
    cut = int(val_fraction * 2**64)
    val_files = [f for h, f in keyed if h < cut]
    train_files = [f for h, f in keyed if h >= cut]
    if not val_files or not train_files:
        text = _concatenate(files, max_bytes)
        if not text.strip():
            raise ValueError(f"corpus from {source} is empty ({len(files)} text files found)")
        n_val = int(len(text) * val_fraction)
        return text[: len(text) - n_val], text[len(text) - n_val :]
    n_val = int(max_bytes * val_fraction)
    train = _concatenate(train_files, max_bytes - n_val)
    val = _concatenate(val_files, n_val)
    if not train.strip() or not val.strip():
        raise ValueError(f"corpus from {source} is empty ({len(files)} text files found)")
    return train, val


def load_corpus(path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Return at most ``max_bytes`` bytes of training text.

    ``path`` is a text file, a folder (its text-like files, recursively, in sorted order), or
    None for the Python standard library's source. Raises FileNotFoundError for a missing
    path and ValueError for an empty corpus.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    _, files, source = _corpus_files(path)
    corpus = _concatenate(files, max_bytes)
    if not corpus.strip():
        raise ValueError(f"corpus from {source} is empty ({len(files)} text files found)")
    return corpus


def encode(text: str | bytes) -> Tensor:
    """Return the byte tokens of ``text`` (UTF-8 for str) as a 1-D int64 tensor."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(tokens: Tensor | Sequence[int]) -> str:
    """Return the text of byte tokens; invalid UTF-8 becomes U+FFFD instead of failing."""
    values = tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else list(tokens)
    bad = [v for v in values if not 0 <= v < VOCAB_SIZE]
    if bad:
        raise ValueError(f"byte tokens must be in 0..255, got {bad[:5]}")
    return bytes(values).decode("utf-8", errors="replace")


def split(tokens: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Return (train, validation): the last ``val_fraction`` of ``tokens`` is validation.

    The two parts are contiguous, disjoint views; the split depends on nothing but the length.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    if n_train == 0:
        raise ValueError(f"no training tokens left: {len(tokens)} tokens in all")
    return tokens[:n_train], tokens[n_train:]


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from (seed, step), stable across processes and runs."""
    digest = hashlib.blake2b(f"layerwise.data:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Batcher:
    """Samples (inputs, targets) windows of ``seq_len`` tokens; targets are shifted by one."""

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive: {batch_size}, {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a larger corpus or a shorter seq_len"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self._window = torch.arange(seq_len + 1)  # offsets inside one window

    @property
    def num_starts(self) -> int:
        """Number of distinct windows the corpus holds."""
        return len(self.tokens) - self.seq_len

    def _windows(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.tokens[starts[:, None] + self._window].to(torch.int64)  # (B, T + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T), (B, T)

    def get_batch(self, step: int, shard: int = 0, num_shards: int = 1) -> tuple[Tensor, Tensor]:
        """Return (inputs, targets) of batch ``step``, each (batch_size / num_shards, seq_len).

        The global batch depends only on (seed, step); data-parallel replica ``shard`` of
        ``num_shards`` gets its contiguous slice of rows, so the union is independent of the
        number of replicas.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if num_shards <= 0 or self.batch_size % num_shards != 0 or not 0 <= shard < num_shards:
            raise ValueError(
                f"cannot take shard {shard} of {num_shards} from a batch of {self.batch_size}"
            )
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        starts = torch.randint(0, self.num_starts, (self.batch_size,), generator=gen)
        rows = self.batch_size // num_shards
        return self._windows(starts[shard * rows : (shard + 1) * rows])

    def eval_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """Return ``n`` fixed batches whose windows are spread evenly over the tokens.

        They do not depend on the seed, so every run is evaluated on the same text.
        """
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        count = n * self.batch_size
        starts = torch.linspace(0, self.num_starts - 1, count).round().to(torch.int64)
        return [self._windows(chunk) for chunk in starts.split(self.batch_size)]
