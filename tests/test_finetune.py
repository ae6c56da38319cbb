"""Your model, your tokenizer, your data, end to end: small "pretrained" Llama, GPT-2 (tied)
and Qwen2 models are made here (a tokenizer trained with ``tokenizers``, a few hundred steps
of plain PyTorch, ``save_pretrained``), fine-tuned by ``layerwise train --model DIR`` on two
workers, exported, and loaded back by ``from_pretrained``: the first step's loss is the
model's own loss on the same batch, the exported model's loss on the held-out documents is
the run's last validation loss, prompts are masked as the model's -100 labels, and a run
resumed on another layout reads the same token cache."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch
import transformers

import _pretrained as pre
from layerwise.cli import build_parser
from layerwise.cli.train import config_from_args
from layerwise.job import checkpoints as ckpt
from layerwise.job.ckpt_files import newest_good
from layerwise.job.config import load_config
from layerwise.job.feed import TokenFeed
from layerwise.runtime.pipeline import Pipeline

pytestmark = pytest.mark.slow
SIZES = ["--seq-len", "32", "--batch-size", "8", "--microbatches", "4", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    for kind in ("llama", "gpt2", "qwen2"):
        pre.make_pretrained(root / kind, kind, steps=150)
    pre.write_jsonl(root / "text.jsonl", pre.text_records(60))
    pre.write_jsonl(root / "sft.jsonl", pre.sft_records(40))
    pre.write_jsonl(root / "chat.jsonl", pre.chat_records(30))
    return root


def cli(home: Path, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "LAYERWISE_CACHE": str(home / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "layerwise", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def own_loss(model: Any, batch: tuple[Any, Any]) -> float:
    inputs, labels = batch
    with torch.no_grad():
        return float(model(**inputs, labels=labels, use_cache=False).loss)


def check_run(home: Path, run: Path, model_dir: Path, export_flags: tuple[str, ...] = ()) -> Path:
    """First step = the pretrained model's own loss; exported model = last validation loss."""
    cfg = load_config(run)
    feed = TokenFeed(cfg, cfg.family())
    start = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    logged = records(run)
    assert logged[0]["loss"] == pytest.approx(own_loss(start, feed.batch(0, 0, 1)), abs=1e-5)
    out = home / f"{run.name}-export"
    cli(home, "export", str(run), str(out), *export_flags)
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    val = [own_loss(trained, b) for b in feed.validation(cfg.eval_batches)]
    last_val = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    assert sum(val) / len(val) == pytest.approx(last_val, abs=1e-5)
    assert last_val != pytest.approx(logged[0]["loss"], abs=1e-3)  # it trained
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == cfg.family().embedding_rows()
    assert (out / "generation_config.json").exists()
    return out


@pytest.mark.timeout(900)
def test_llama_text_fine_tuned_exported_and_resumed_on_another_layout(home: Path) -> None:
    run = home / "llama-run"
    said = cli(home, "train", "--model", str(home / "llama"), "--data", str(home / "text.jsonl"),
               "--workers", "2", "--steps", "6", "--eval-interval", "3", "--save-interval", "3",
               "--run-dir", str(run), *SIZES)  # fmt: skip
    assert "text corpus" in said and "nats per token" in said
    cfg = load_config(run)
    assert (cfg.model, cfg.layers, cfg.d_model, cfg.heads) == ("hf:llama", 2, 32, 4)
    assert cfg.weights == str(home / "llama") and cfg.tokenizer == str(home / "llama")
    out = check_run(home, run, home / "llama", ("--max-shard-size", "40KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    # the exported model's logits are the pipeline's on the run's last checkpoint
    family = cfg.family()
    pipe = Pipeline(family.layers(), microbatches=1, loss_fn=family.loss_fn,
                    tied=family.tied_parameters())  # fmt: skip
    newest = newest_good(run / "checkpoints").path
    assert newest is not None
    ckpt.load(newest, pipe.module(), None)
    pipe.eval()
    ids = torch.tensor([[5, 17, 200, 3, 44, 90, 1, 7]])
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.forward(ids), trained(ids).logits, atol=1e-5, rtol=1e-5)
    # resumed on one worker: the same cache, nothing tokenized again
    caches = sorted((home / "cache" / "tokens").iterdir())
    made = json.loads((Path(cfg.tokens) / "meta.json").read_text())["made_s"]
    said = cli(home, "train", "--resume", str(run), "--workers", "1", "--steps", "8")
    assert sorted((home / "cache" / "tokens").iterdir()) == caches
    assert json.loads((Path(cfg.tokens) / "meta.json").read_text())["made_s"] == made
    assert load_config(run).tokens == cfg.tokens and "tokenizing" not in said
    assert records(run)[-1]["step"] == 7
    # sampling decodes through the tokenizer, from the run and from the exported model
    for source in (run, out):
        text = cli(home, "generate", str(source), "--prompt", "def ", "--tokens", "12")
        assert text.strip().splitlines()[-1].startswith("def ")


@pytest.mark.timeout(600)
def test_gpt2_tied_prompts_and_responses_count_the_responses_only(home: Path) -> None:
    run = home / "gpt2-run"
    cli(home, "train", "--model", str(home / "gpt2"), "--data", str(home / "sft.jsonl"),
        "--workers", "2", "--steps", "4", "--eval-interval", "4", "--run-dir", str(run),
        *SIZES, "--seq-len", "64")  # fmt: skip
    cfg = load_config(run)
    assert cfg.tie_embeddings and cfg.model == "hf:gpt2"
    inputs, labels = TokenFeed(cfg, cfg.family()).batch(0, 0, 1)
    tok = transformers.AutoTokenizer.from_pretrained(str(home / "gpt2"))
    responses = {r["response"] for r in pre.sft_records(40)}
    prompts = {r["prompt"] for r in pre.sft_records(40)}
    for row_ids, row_labels in zip(inputs["input_ids"], labels, strict=True):
        counted = tok.decode(row_ids[row_labels != -100].tolist(), skip_special_tokens=True)
        assert counted and not any(p in counted for p in prompts)
        assert any(r in counted for r in responses)
    out = check_run(home, run, home / "gpt2")
    assert (out / "model.safetensors").exists()
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert trained.lm_head.weight.data_ptr() == trained.transformer.wte.weight.data_ptr()


@pytest.mark.timeout(600)
def test_qwen2_chat_messages_unpacked(home: Path) -> None:
    run = home / "qwen2-run"
    cli(home, "train", "--model", str(home / "qwen2"), "--data", str(home / "chat.jsonl"),
        "--no-pack", "--workers", "2", "--steps", "4", "--eval-interval", "4",
        "--run-dir", str(run), *SIZES, "--seq-len", "64")  # fmt: skip
    cfg = load_config(run)
    inputs, labels = TokenFeed(cfg, cfg.family()).batch(0, 0, 1)
    assert "attention_mask" in inputs and int(inputs["attention_mask"].min()) == 0
    assert bool((labels[inputs["attention_mask"] == 0] == -100).all())
    check_run(home, run, home / "qwen2")


@pytest.mark.timeout(600)
def test_a_configuration_only_directory_samples_bytes_within_the_tokenizer(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--hf-config on a directory with weights says so; a larger vocabulary than bytes
    samples only byte ids (it crashed decoding ids above 255)."""
    sizes = home / "sizes-only"
    sizes.mkdir()
    (sizes / "config.json").write_text((home / "llama" / "config.json").read_text())
    run = home / "bytes-run"
    monkeypatch.setenv("LAYERWISE_CACHE", str(home / "cache"))
    args = build_parser().parse_args(["train", "--model", "hf:llama", "--hf-config",
                                      str(home / "llama"), "--data", str(home / "text.jsonl"),
                                      *SIZES])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as said:
        config_from_args(args)  # checks and tokenizes; starts no worker
    assert "also holds weights; to start from them, give --model" in said.getvalue()
    cli(home, "train", "--model", "hf:llama", "--hf-config", str(sizes), "--workers", "2",
        "--steps", "2", "--run-dir", str(run), *SIZES)  # fmt: skip
    cfg = load_config(run)
    assert cfg.tokenizer is None and cfg.tokens is None and cfg.layers == 2
    text = cli(home, "generate", str(run), "--prompt", "def ", "--tokens", "30",
               "--temperature", "2.0", "--top-k", "0")  # fmt: skip
    assert "def " in text
