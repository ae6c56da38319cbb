"""The documents of a corpus, in whatever form the user keeps them.

``--data`` may be a text file, a folder of text files, JSON lines (``.jsonl``), Parquet
(``.parquet``, needs ``pyarrow``) or a directory written by ``datasets.save_to_disk`` (needs
``datasets``). Each document comes with a key, from which a hash decides whether it is held
out for validation: a file's path relative to the corpus, or a record's own content, so the
split does not depend on the order or the number of documents.

A record is one of three kinds, told apart by its fields: text (``--text-field``, default
``text``), a ``prompt`` with its ``response`` (supervised fine-tuning: the loss counts the
response), or chat ``messages`` (rendered by the tokenizer's chat template; the loss counts
the assistant's turns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerwise.job.data import _corpus_files, _is_text, stdlib_files

Record = dict[str, Any]
KINDS = ("text", "prompt/response", "messages")
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Corpus:
    """Where the documents are and how to read them."""

    path: Path
    form: str  # "stdlib" | "files" | "jsonl" | "parquet" | "datasets"
    text_field: str = "text"

    def describe(self) -> str:
        return f"{self.form} {str(self.path)!r}"


def open_corpus(path: str | Path | None, text_field: str = "text") -> Corpus:
    """Return the corpus at ``path`` (None: the standard library's source), its form told by
    its suffix or its files; ValueError says what is wrong with a path that is none."""
    if path is None:
        return Corpus(_corpus_files(None)[0], "stdlib", text_field)
    p = Path(path).resolve()
    if not p.exists():
        raise ValueError(f"--data {str(path)!r} does not exist; give a file or a folder")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return Corpus(p, "jsonl", text_field)
        if suffix == ".parquet":
            return Corpus(p, "parquet", text_field)
        if not _is_text(p):
            raise ValueError(
                f"--data {str(path)!r} is neither text (it holds NUL bytes) nor .jsonl or "
                f".parquet; give text, JSON lines, Parquet or a datasets directory"
            )
        return Corpus(p, "files", text_field)
    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
        return Corpus(p, "datasets", text_field)
    return Corpus(p, "files", text_field)


def source_bytes(corpus: Corpus) -> int:
    """The size on disk of what the corpus reads (for progress)."""
    if corpus.path.is_file():
        return corpus.path.stat().st_size
    return sum(f.stat().st_size for f in _files_of(corpus))


def fingerprint(corpus: Corpus) -> str:
    """A digest of the corpus's files (names, sizes and modification times), so that an
    edited corpus is tokenized again."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{corpus.form}\0{corpus.path}\0{corpus.text_field}".encode())
    files = [corpus.path] if corpus.path.is_file() else _files_of(corpus)
    for f in files:
        st = f.stat()
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _files_of(corpus: Corpus) -> list[Path]:
    if corpus.form in ("files", "stdlib"):
        return _text_file_list(corpus)[1]
    return sorted(p for p in corpus.path.rglob("*") if p.is_file())


def _text_file_list(corpus: Corpus) -> tuple[Path, list[Path]]:
    """(root, its text files in order); the standard library gives its ``*.py`` files."""
    if corpus.form == "stdlib":
        return corpus.path, stdlib_files()
    root, files, _ = _corpus_files(corpus.path)
    return root, files


def record_key(record: Record) -> str:
    """The key a record is held out by: its content."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def iter_documents(corpus: Corpus, max_bytes: int | None = None) -> Iterator[tuple[str, Record]]:
    """Yield (key, record) for each document in order; text files give ``{"text": ...}``.
    ``max_bytes``: stop after about this much text (the default corpus only)."""
    if corpus.form in ("files", "stdlib"):
        yield from _text_files(corpus, max_bytes)
    elif corpus.form == "jsonl":
        yield from _jsonl(corpus.path)
    else:
        rows = _parquet(corpus.path) if corpus.form == "parquet" else _datasets(corpus.path)
        for record in rows:
            yield record_key(record), record


def _text_files(corpus: Corpus, max_bytes: int | None) -> Iterator[tuple[str, Record]]:
    root, files = _text_file_list(corpus)
    total = 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            return
        text = f.read_bytes().decode("utf-8", errors="replace")
        total += len(text)
        yield f.relative_to(root).as_posix(), {corpus.text_field: text}


def _jsonl(path: Path) -> Iterator[tuple[str, Record]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"--data {str(path)!r} line {number} is not JSON ({err.msg}); write one "
                    f"JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"--data {str(path)!r} line {number} is a JSON {type(record).__name__}, "
                    f'not an object; write one object per line, such as {{"text": "..."}}'
                )
            yield record_key(record), record


def _parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(
            "--data *.parquet needs pyarrow: pip install 'layerwise[data]' (or pip install pyarrow)"
        ) from err
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=_BATCH_ROWS):
        yield from batch.to_pylist()


def _datasets(path: Path) -> Iterator[Record]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            "--data on a datasets.save_to_disk directory needs Hugging Face datasets: "
            "pip install 'layerwise[data]' (or pip install datasets)"
        ) from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(
                f"--data {str(path)!r} holds the splits {sorted(ds)} but no 'train'; give "
                f"one split's directory ({path}/<split>)"
            )
        ds = ds["train"]
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


def record_kind(record: Record, text_field: str) -> str:
    """Which of :data:`KINDS` a record is; ValueError names its fields otherwise."""
    if isinstance(record.get(text_field), str):
        return "text"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return "prompt/response"
    if isinstance(record.get("messages"), list):
        return "messages"
    raise ValueError(
        f"a record has no text field {text_field!r} (its fields: {sorted(record)}); name the "
        f"field with --text-field, or give 'prompt' and 'response', or chat 'messages'"
    )


def check_corpus(corpus: Corpus, probe: int = 64) -> str:
    """Read the first records and raise ValueError, before any worker starts, if the corpus
    is empty or they lack the fields; return their kind."""
    kinds = set()
    for n, (_, record) in enumerate(iter_documents(corpus, max_bytes=1 << 20)):
        kinds.add(record_kind(record, corpus.text_field))
        if n + 1 >= probe:
            break
    if not kinds:
        raise ValueError(f"--data {corpus.describe()} holds no documents; give a corpus")
    if len(kinds) > 1:
        raise ValueError(
            f"--data {corpus.describe()} mixes records of kinds {sorted(kinds)}; keep one kind "
            f"per corpus"
        )
    return kinds.pop()
