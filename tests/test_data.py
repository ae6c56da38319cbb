"""Tests of corpus loading, byte tokens, splitting and deterministic batching."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest
import torch

from layerwise.job.data import (
    VOCAB_SIZE,
    Batcher,
    decode,
    encode,
    load_corpus,
    load_splits,
    split,
    stdlib_files,
)


def _batcher(seed: int = 0, batch_size: int = 4, seq_len: int = 8) -> Batcher:
    tokens = torch.arange(1000) % VOCAB_SIZE  # position k holds k mod 256: easy to check
    return Batcher(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed)


def test_encode_decode_round_trip() -> None:
    text = "héllo, wörld\n"
    tokens = encode(text)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == list(text.encode("utf-8"))
    assert decode(tokens) == text
    assert decode(encode(b"\x00\xff")) == "\x00\ufffd"  # invalid UTF-8 is replaced
    assert encode("").numel() == 0
    with pytest.raises(ValueError, match=r"0\.\.255"):
        decode([300])


def test_same_seed_and_step_give_same_batch() -> None:
    a, b = _batcher(seed=3), _batcher(seed=3)
    for step in [0, 1, 57]:
        xa, ya = a.get_batch(step)
        xb, yb = b.get_batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Order of requests does not matter: batch k is a pure function of (seed, k).
    later = a.get_batch(57)[0]
    a.get_batch(2)
    assert torch.equal(a.get_batch(57)[0], later)


def test_different_steps_and_seeds_differ() -> None:
    batcher = _batcher(seed=0)
    assert not torch.equal(batcher.get_batch(0)[0], batcher.get_batch(1)[0])
    assert not torch.equal(batcher.get_batch(0)[0], _batcher(seed=1).get_batch(0)[0])


def test_targets_are_inputs_shifted_by_one() -> None:
    x, y = _batcher(batch_size=5, seq_len=12).get_batch(4)
    assert x.shape == y.shape == (5, 12)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, (x + 1) % VOCAB_SIZE)  # consecutive corpus positions


def test_shards_partition_the_global_batch() -> None:
    batcher = _batcher(batch_size=6)
    x, y = batcher.get_batch(9)
    parts = [batcher.get_batch(9, shard=r, num_shards=3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="shard"):
        batcher.get_batch(9, shard=0, num_shards=4)


def test_eval_batches_are_fixed_and_cover_the_split() -> None:
    batches = _batcher(seed=0).eval_batches(3)
    again = _batcher(seed=99).eval_batches(3)
    assert len(batches) == 3
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(batches[0][0][0, 0]) == 0  # first window starts at the beginning
    assert int(batches[-1][1][-1, -1]) == 999 % VOCAB_SIZE  # last window reaches the end


def test_split_is_deterministic_and_disjoint() -> None:
    tokens = torch.arange(100)
    train, val = split(tokens, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train2, val2 = split(tokens, 0.1)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert split(tokens, 0.0)[1].numel() == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split(tokens, 1.0)


def test_load_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_text("hidden")
    assert load_corpus(tmp_path / "a.txt") == b"first\n"
    assert load_corpus(str(tmp_path)) == b"first\nsecond\n"  # sorted, binary and hidden skipped
    assert load_corpus(tmp_path, max_bytes=8) == b"first\nse"


def test_default_corpus_is_stdlib_source() -> None:
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert all(p.suffix == ".py" for p in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [set(p.relative_to(root).parts) for p in files]
    assert not any({"site-packages", "test", "tests"} & part for part in parts)
    corpus = load_corpus(max_bytes=100_000)
    assert len(corpus) == 100_000
    assert corpus == load_corpus(max_bytes=100_000)
    assert b"def " in corpus


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match="seq_len"):
        Batcher(encode("short"), batch_size=2, seq_len=5)
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(tmp_path, max_bytes=0)


def test_validation_holds_out_whole_files_across_the_corpus(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"<file {i:02d}>" * 20)
    train, val = load_splits(tmp_path, max_bytes=10_000, val_fraction=0.25)
    assert (train, val) == load_splits(tmp_path, max_bytes=10_000, val_fraction=0.25)
    names = {n: set(re.findall(rb"<file (\d\d)>", part)) for n, part in (("t", train), ("v", val))}
    assert names["t"] and names["v"] and not names["t"] & names["v"]  # whole files, disjoint
    assert len(names["v"]) < len(names["t"])
    # a draw by hash, not the first files in path order
    assert names["t"] != {b"%02d" % i for i in range(len(names["t"]))}
    single = tmp_path / "f00.txt"
    head, tail = load_splits(single, val_fraction=0.1)  # one file: split by position
    assert head + tail == single.read_bytes() + b"\n" and len(tail) == len(head + tail) // 10


def test_default_splits_draw_validation_files_from_the_whole_library() -> None:
    train, val = load_splits(max_bytes=400_000)
    assert 35_000 <= len(val) <= 40_000 and len(train) >= 300_000
    assert b"def " in train and b"def " in val
    # not the codec tables that end the library in path order
    assert val.count(b"0x") < len(val) // 200


def test_binary_data_file_is_refused(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01binary")
    for load in (load_corpus, load_splits):
        with pytest.raises(ValueError, match="is not text"):
            load(blob)
