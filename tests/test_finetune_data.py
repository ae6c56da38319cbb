"""Fine-tuning data without workers: corpora in every form, the token cache (built once,
whole documents held out), rows (packed with restarting positions, padded, whole examples),
prompt/response and chat masks, streamed safetensors, and every bad input refused with one
line before any worker starts."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import _pretrained as pre
from layerwise.cli import main
from layerwise.job import token_cache
from layerwise.job.config import TrainConfig
from layerwise.job.documents import iter_documents, open_corpus
from layerwise.job.rows import IGNORE, RowBatcher, TokenRows
from layerwise.job.token_cache import open_split, prepare, read_meta
from layerwise.job.tokenizer import ByteTokenizer, HFTokenizer
from layerwise.models.safetensors_io import StreamWriter


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    pre.train_tokenizer(out, pre.local_text(60_000))
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_form_of_corpus_gives_the_same_documents(tmp_path: Path) -> None:
    records = pre.text_records(12)
    jsonl = pre.write_jsonl(tmp_path / "d.jsonl", records)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    folder = tmp_path / "files"
    folder.mkdir()
    for i, r in enumerate(records):
        (folder / f"{i:02d}.txt").write_text(r["text"])
    texts = [r["text"] for r in records]
    for path in (jsonl, tmp_path / "d.parquet", tmp_path / "ds", folder):
        corpus = open_corpus(path)
        got = [rec["text"] for _, rec in iter_documents(corpus)]
        assert got == texts, corpus.form
    assert [open_corpus(p).form for p in (jsonl, tmp_path / "d.parquet", tmp_path / "ds")] == [
        "jsonl",
        "parquet",
        "datasets",
    ]


def test_the_cache_is_built_once_and_holds_out_whole_documents(
    tmp_path: Path, tok_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = pre.text_records(80)
    corpus = open_corpus(pre.write_jsonl(tmp_path / "d.jsonl", records))
    tok = HFTokenizer(tok_dir)
    folder = prepare(corpus, tok)
    made = read_meta(folder)["made_s"]
    calls = []
    monkeypatch.setattr(token_cache, "_write", lambda *a: calls.append(a))
    assert prepare(corpus, HFTokenizer(tok_dir)) == folder and not calls  # found, not rebuilt
    assert read_meta(folder)["made_s"] == made
    monkeypatch.undo()
    docs = {}
    for name in ("train", "val"):
        split = open_split(folder, name)
        assert isinstance(split.ids, np.memmap)
        starts = np.asarray(split.starts)
        docs[name] = [tok.decode(split.ids[a:b].tolist()) for a, b in itertools.pairwise(starts)]
        assert all(np.asarray(split.ids)[b - 1] == tok.eos_id for b in starts[1:])
    assert 0 < len(docs["val"]) < len(docs["train"])
    assert len(docs["val"]) + len(docs["train"]) == len(records)
    assert sorted(docs["val"] + docs["train"]) == sorted(r["text"] for r in records)
    # another tokenizer is another cache
    assert prepare(corpus, ByteTokenizer()) != folder


def test_a_single_document_is_cut_by_position(tmp_path: Path) -> None:
    corpus = open_corpus(pre.write_jsonl(tmp_path / "one.jsonl", [{"text": "abc" * 200}]))
    folder = prepare(corpus, ByteTokenizer())
    splits = read_meta(folder)["splits"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == 601
    assert splits["val"]["tokens"] == 60


def _split(ids: list[list[int]], counted: list[list[int]] | None = None) -> token_cache.Split:
    flat = np.asarray([t for d in ids for t in d], dtype=np.int32)
    flags = np.asarray([c for d in (counted or [[1] * len(d) for d in ids]) for c in d], np.uint8)
    starts = np.cumsum([0] + [len(d) for d in ids]).astype(np.int64)
    return token_cache.Split(flat, flags, starts)


def test_packed_windows_restart_positions_and_skip_document_starts() -> None:
    docs = [list(range(10, 15)), list(range(20, 23)), list(range(30, 40))]
    rows = TokenRows(_split(docs), seq_len=7, kind="text", pack=True, pad_id=0)
    assert rows.num_rows == 18 - 8 + 1
    b = rows.rows(torch.tensor([2]))
    assert b.ids[0].tolist() == [12, 13, 14, 20, 21, 22, 30, 31]
    assert b.positions[0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert b.labels[0].tolist() == [12, 13, 14, IGNORE, 21, 22, IGNORE, 31]
    assert b.mask is None


def test_examples_pack_whole_and_pad_apart() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    counted = [[0, 1, 1], [0, 1], [0, 0, 1, 1, 1, 1, 1], [1]]
    packed = TokenRows(_split(docs, counted), seq_len=5, kind="prompt/response", pack=True,
                       pad_id=99)  # fmt: skip
    assert packed.ranges is not None
    assert packed.ranges.tolist() == [[0, 5], [5, 11], [12, 13]]
    assert packed.cut == 1
    b = packed.rows(torch.tensor([0, 2]))
    assert b.ids[0].tolist() == [1, 2, 3, 4, 5, 99]
    assert b.labels[0].tolist() == [IGNORE, 2, 3, IGNORE, 5, IGNORE]
    assert b.positions[0].tolist() == [0, 1, 2, 0, 1, 0]
    assert b.labels[1].tolist() == [IGNORE] * 6  # a one-token example has nothing to predict
    padded = TokenRows(_split(docs, counted), seq_len=5, kind="prompt/response", pack=False,
                       pad_id=99)  # fmt: skip
    assert padded.num_rows == 4
    b = padded.rows(torch.tensor([1]))
    assert b.ids[0].tolist() == [4, 5, 99, 99, 99, 99]
    assert b.mask is not None and b.mask[0].tolist() == [1, 1, 0, 0, 0, 0]


def test_unpacked_text_rows_cover_every_token_once() -> None:
    docs = [list(range(100, 117))]
    rows = TokenRows(_split(docs), seq_len=5, kind="text", pack=False, pad_id=0)
    b = rows.rows(torch.arange(rows.num_rows))
    targets = [t for row in b.labels[:, 1:].tolist() for t in row if t != IGNORE]
    assert targets == list(range(101, 117))


def test_batches_are_a_function_of_the_seed_and_step() -> None:
    rows = TokenRows(_split([list(range(50))]), seq_len=4, kind="text", pack=True, pad_id=0)
    a, b = RowBatcher(rows, 4, seed=1), RowBatcher(rows, 4, seed=1)
    assert torch.equal(a.get_batch(3).ids, b.get_batch(3).ids)
    assert not torch.equal(a.get_batch(3).ids, a.get_batch(4).ids)
    halves = torch.cat([a.get_batch(3, 0, 2).ids, a.get_batch(3, 1, 2).ids])
    assert torch.equal(halves, a.get_batch(3).ids)


def test_prompts_and_chat_turns_are_masked(tmp_path: Path, tok_dir: Path) -> None:
    tok = HFTokenizer(tok_dir)
    for records in (pre.sft_records(6), pre.chat_records(6)):
        corpus = open_corpus(pre.write_jsonl(tmp_path / "s.jsonl", records))
        for ids, counted in token_cache.tokenize_records(
            (r for _, r in iter_documents(corpus)), "text", tok
        ):
            kept = [i for i, c in zip(ids, counted, strict=True) if c]
            assert kept[-1] == tok.eos_id
            answer = tok.decode(kept)
            full = tok.decode(ids)
            assert answer and answer in full and len(answer) < len(full)
        first = records[0]
        response = first.get("response") or first["messages"][1]["content"]
        segs = token_cache.record_segments(first, "text", tok)
        assert response in "".join(t for t, c in segs if c)
        assert response not in "".join(t for t, c in segs if not c)


def test_streamed_safetensors_read_back(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).bfloat16()}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = StreamWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    bad = StreamWriter(tmp_path / "y.safetensors", specs, {})
    with pytest.raises(ValueError, match="expected a"):
        bad.write("b", tensors["b"])


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for word in words:
        assert word in err, err


def test_bad_input_is_one_line_before_any_worker(
    tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["train", "--run-dir", str(tmp_path / "run"), "--steps", "1"]
    data = pre.write_jsonl(tmp_path / "d.jsonl", pre.text_records(10))
    # a tokenizer larger than the embedding (the built-in configuration takes bytes)
    _fails([*run, "--model", "hf:llama", "--tokenizer", str(tok_dir), "--data", str(data)],
           capsys, "320 token ids", "256 rows")  # fmt: skip
    # a configuration whose vocabulary is smaller than the byte tokens
    small = tmp_path / "small"
    small.mkdir()
    cfg: dict[str, Any] = pre.small_config("llama", 100, 0).to_dict()
    (small / "config.json").write_text(json.dumps(cfg))
    _fails([*run, "--model", "hf:llama", "--hf-config", str(small)], capsys, "256", "100 rows")
    _fails([*run, "--model", str(small)], capsys, "100 rows")
    # records without the text field
    other = pre.write_jsonl(tmp_path / "o.jsonl", [{"body": "x"}])
    _fails([*run, "--data", str(other)], capsys, "'text'", "--text-field", "body")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    _fails([*run, "--data", str(empty)], capsys, "no documents")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\0\1\2" * 100)
    _fails([*run, "--data", str(binary)], capsys, "NUL")
    _fails([*run, "--model", str(tmp_path)], capsys, "not a save_pretrained directory")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _fails([*run, "--model", str(bert)], capsys, "'bert' is not supported", "llama")
    _fails([*run, "--tokenizer", str(tmp_path / "none"), "--data", str(data)], capsys,
           "does not exist")  # fmt: skip
    _fails([*run, "--tokenizer", str(bert), "--data", str(data)], capsys, "holds no tokenizer")
    plain = tmp_path / "plain"
    pre.train_tokenizer(plain, pre.local_text(20_000))
    (plain / "chat_template.jinja").unlink()
    chat = pre.write_jsonl(tmp_path / "c.jsonl", pre.chat_records(3))
    _fails([*run, "--tokenizer", str(plain), "--data", str(chat)], capsys, "chat template")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{oops\n')
    _fails([*run, "--data", str(bad_json)], capsys, "line 2")
    (tmp_path / "norun").mkdir()
    _fails(["export", str(tmp_path / "norun"), str(tmp_path / "out")], capsys, "holds no run")
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig())))
    _fails(["export", str(unsaved), str(tmp_path / "out")], capsys, "no checkpoint to export")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
