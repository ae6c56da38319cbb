"""Small "pretrained" Hugging Face models made here: a BPE tokenizer trained with
``tokenizers`` on local text, a model trained for a few hundred steps in plain PyTorch on that
text, both written by ``save_pretrained``; and the data sets the fine-tuning tests read."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import torch
import transformers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def local_text(limit: int = 200_000) -> str:
    """Some of the standard library's source: a corpus every machine has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py"):
        text += (root / name).read_text()
    return text[:limit]


def train_tokenizer(out: Path, text: str, vocab: int = 320) -> Any:
    """A byte-level BPE tokenizer with end-of-text and padding tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def small_config(kind: str, vocab: int, eos: int) -> Any:
    common: dict[str, Any] = {"vocab_size": vocab, "eos_token_id": eos, "bos_token_id": None,
                              "pad_token_id": None}  # fmt: skip
    if kind == "gpt2":
        return transformers.AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
    return transformers.AutoConfig.for_model(
        kind, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, **common,
    )  # fmt: skip


def make_pretrained(out: Path, kind: str, steps: int = 200, seed: int = 0) -> Path:
    """Write a tokenizer and a model of ``kind`` trained ``steps`` steps on local text into
    ``out``; return ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = local_text()
    tok = train_tokenizer(out, text)
    ids = torch.tensor(tok(text)["input_ids"])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        small_config(kind, len(tok), tok.eos_token_id)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        batch = torch.stack([ids[s : s + 32] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records(n: int = 60) -> list[dict[str, Any]]:
    """Documents of different lengths cut from local text."""
    text = local_text()
    out, at = [], 0
    for i in range(n):
        length = 80 + (i * 37) % 300
        out.append({"text": text[at : at + length]})
        at += length
    return out


def sft_records(n: int = 40) -> list[dict[str, Any]]:
    words = local_text().split()
    return [
        {"prompt": " ".join(words[i : i + 3]) + "?", "response": " ".join(words[i + 3 : i + 7])}
        for i in range(0, 7 * n, 7)
    ]


def chat_records(n: int = 20) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"]}]}
            for r in sft_records(n)]  # fmt: skip
