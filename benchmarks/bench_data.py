"""Tokenization throughput and a feeding worker's memory against corpus size.

Throughput: the token cache (`token_cache.prepare`: reading JSON lines, batched encoding,
writing the memory-mapped files) against plain `tokenizers` batch encoding of the same texts,
one run each. Memory: the resident set of a process that opens the feed of a corpus and draws
50 batches, for a corpus and one 10x larger. Run: .venv/bin/python benchmarks/bench_data.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _pretrained as pre

CHILD = """
import resource, sys
from layerwise.job.config import TrainConfig
from layerwise.job.feed import TokenFeed
cfg = TrainConfig(tokens=sys.argv[1], seq_len=128, batch_size=32, model="gpt", vocab_size=320)
feed = TokenFeed(cfg, cfg.family())
for step in range(50):
    feed.batch(step, 0, 1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    import os

    from layerwise.job.documents import open_corpus
    from layerwise.job.token_cache import prepare
    from layerwise.job.tokenizer import HFTokenizer

    root = Path(tempfile.mkdtemp())
    pre.train_tokenizer(root / "tok", pre.local_text(100_000))
    tok = HFTokenizer(root / "tok")
    records = pre.text_records(600)
    rows = {}
    for scale in (1, 10):
        path = pre.write_jsonl(root / f"d{scale}.jsonl", records * scale)
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        mb = sum(len(t) for t in texts) / 1e6
        t0 = time.perf_counter()
        folder = prepare(open_corpus(path), tok, root=root / "cache")
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        tok.hf.backend_tokenizer.encode_batch(texts)
        plain = time.perf_counter() - t0
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True,
                             text=True, check=True)  # fmt: skip
        rows[scale] = (mb, ours, plain, int(out.stdout.split()[-1]) / 1024)
    print(f"load average {os.getloadavg()[0]:.2f}; rusage self {resource.getrusage(0).ru_maxrss}")
    print("corpus  MB    ours s  plain s  ours/plain  feeding worker peak RSS MB")
    for scale, (mb, ours, plain, rss) in rows.items():
        print(
            f"{scale:>3}x  {mb:6.2f}  {ours:6.2f}  {plain:7.2f}  {ours / plain:10.2f}  {rss:8.1f}"
        )


if __name__ == "__main__":
    main()
