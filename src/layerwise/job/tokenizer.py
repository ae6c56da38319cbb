"""The run's tokenizer: bytes for our own GPT, or a Hugging Face tokenizer read from local
files (``transformers.AutoTokenizer``, or the ``tokenizers`` library alone).

A :class:`Tokenizer` turns one record of the data (text, a prompt with its response, or chat
messages) into token ids with a flag per token saying whether the loss counts it, so that
supervised fine-tuning trains on the responses only. Nothing is downloaded: a path that
holds no tokenizer is an error that says what to give.
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Segments = list[tuple[str, bool]]
"""A record as text pieces, each with whether the loss counts its tokens."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class Tokenizer(ABC):
    """What the job needs of a tokenizer."""

    eos_id: int | None = None
    pad_id: int | None = None

    @property
    @abstractmethod
    def size(self) -> int:
        """How many ids it can produce: the model's embedding must have at least this many."""

    @abstractmethod
    def encode_many(self, texts: Sequence[str], first: bool) -> list[list[int]]:
        """Token ids of each text; ``first``: the text opens a record (special tokens such as
        BOS are added then, as the tokenizer's own ``add_special_tokens`` does)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest that changes whenever the ids it gives could change."""

    @property
    def separator(self) -> list[int]:
        """The ids that end every document: end-of-sequence, when the tokenizer has one."""
        return [] if self.eos_id is None else [self.eos_id]

    def chat(self, messages: list[dict[str, Any]]) -> Segments:
        """The conversation rendered by the tokenizer's chat template, as segments whose
        assistant turns are counted."""
        raise ValueError(
            "records with 'messages' need a tokenizer with a chat template; give --tokenizer "
            "a Hugging Face tokenizer directory whose tokenizer_config.json (or "
            "chat_template.jinja) holds one, or write the data as 'prompt'/'response'"
        )

    def save(self, out_dir: Path) -> list[str]:
        """Write the tokenizer's files into ``out_dir``; return their names (none for bytes)."""
        return []


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocabulary 256, no special tokens): our GPT's default."""

    @property
    def size(self) -> int:
        return 256

    def encode_many(self, texts: Sequence[str], first: bool) -> list[list[int]]:
        return [list(t.encode("utf-8", "surrogateescape")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes"

    @property
    def separator(self) -> list[int]:
        return [10]  # a newline, as the files of a byte corpus are joined


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer from a local directory (or a ``tokenizer.json``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.hf = _load_hf(self.path)
        self.eos_id = self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id

    @property
    def size(self) -> int:
        return len(self.hf)

    def encode_many(self, texts: Sequence[str], first: bool) -> list[list[int]]:
        if not texts:
            return []
        out = self.hf(list(texts), add_special_tokens=first)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        if self.path.is_file():  # a tokenizer.json by any name: its own bytes
            digest.update(self.path.read_bytes())
            return digest.hexdigest()
        for name in TOKENIZER_FILES:
            f = self.path / name
            if f.is_file():
                digest.update(name.encode() + b"\0" + f.read_bytes())
        return digest.hexdigest()

    def chat(self, messages: list[dict[str, Any]]) -> Segments:
        if not getattr(self.hf, "chat_template", None):
            return super().chat(messages)
        segments: Segments = []
        done = ""
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self._render(messages[:k], generation_prompt=True)
            full = self._render(messages[: k + 1], generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    "the tokenizer's chat template does not render a conversation as its "
                    "turns one after another, so the responses cannot be told from the "
                    "prompts; write the data as 'prompt'/'response' instead"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        if not segments:
            raise ValueError("a record's 'messages' hold no assistant turn to train on")
        return [(text, counted) for text, counted in segments if text]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return str(
            self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def save(self, out_dir: Path) -> list[str]:
        before = set(p.name for p in out_dir.iterdir()) if out_dir.exists() else set()
        if hasattr(self.hf, "save_pretrained"):
            self.hf.save_pretrained(str(out_dir))
        else:
            source = self.path if self.path.is_file() else self.path / "tokenizer.json"
            shutil.copy(source, out_dir / "tokenizer.json")
        return sorted(set(p.name for p in out_dir.iterdir()) - before)


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a Hugging Face tokenizer's files."""
    root = Path(directory)
    return root.is_dir() and any(
        (root / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def _load_hf(path: Path) -> Any:
    if not path.exists():
        raise ValueError(f"--tokenizer {str(path)!r} does not exist; give a tokenizer directory")
    if path.is_dir() and not has_tokenizer(path):
        raise ValueError(
            f"--tokenizer {str(path)!r} holds no tokenizer (no tokenizer.json, tokenizer.model "
            f"or vocab.json); give the directory that save_pretrained wrote it to"
        )
    try:
        import transformers
    except ImportError:
        transformers = None  # type: ignore[assignment]
    if transformers is not None:
        if path.is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        try:
            return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            if (path / "tokenizer.json").is_file():  # a bare tokenizers file, no config
                return transformers.PreTrainedTokenizerFast(
                    tokenizer_file=str(path / "tokenizer.json")
                )
            raise ValueError(f"cannot read the tokenizer in {path}: {err}") from err
    try:
        from tokenizers import Tokenizer as RawTokenizer
    except ImportError as err:
        raise ValueError(
            "--tokenizer needs Hugging Face tokenizers or transformers: pip install 'layerwise[hf]'"
        ) from err
    file = path if path.is_file() else path / "tokenizer.json"
    return _RawAdapter(RawTokenizer.from_file(str(file)))


class _RawAdapter:
    """The few calls of a transformers tokenizer, over a bare ``tokenizers.Tokenizer``."""

    chat_template = None
    pad_token_id = None

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        eos = next(
            (raw.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
             if raw.token_to_id(t) is not None),
            None,
        )  # fmt: skip
        self.eos_token_id = eos

    def __len__(self) -> int:
        return int(self.raw.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, Any]:
        encoded = self.raw.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.raw.decode(ids, skip_special_tokens=skip_special_tokens))


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer at ``path`` (a directory or a tokenizer.json), or bytes for None."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
