"""Layer-wise stages combined with data and tensor parallelism on one (dp, pp, tp) mesh."""

from __future__ import annotations

import pytest

import _hybrid_workers as hw
from layerwise.job.launcher import run_workers
from layerwise.models.gpt import GPTConfig, GPTFamily
from layerwise.parallel.mesh import Grid, describe_mesh


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "layouts", [[(2, 1, 2), (1, 2, 2)], [(2, 2, 2)]], ids=["4 workers", "8 workers"]
)
def test_hybrid_matches_single_process(layouts: list[tuple[int, int, int]]) -> None:
    """Each (dp, tp, pp) in turn; layouts of one size share a process group."""
    dp, tp, pp = layouts[0]
    results = run_workers(hw.hybrid_layouts, dp * tp * pp, layouts, timeout_s=300)
    for rank, by_layout in enumerate(results):
        for (dp, tp, _), res in zip(layouts, by_layout, strict=True):
            for case in hw.TIED_GPT_CASES:
                assert res[case] == [], f"rank {rank} {case}: {res[case]}"
                if tp > 1:  # the blocks' linears really are split
                    assert res[f"{case} sharded"] > 0
            if dp > 1:
                assert res["zero-1"] == [], f"rank {rank} zero-1: {res['zero-1']}"


def test_layout_grid_is_tensor_parallel_innermost() -> None:
    layout = Grid(dp=2, pp=2, tp=2)
    assert [layout.coords(r) for r in range(8)] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (0, 1, 1),
        (1, 0, 0),
        (1, 0, 1),
        (1, 1, 0),
        (1, 1, 1),
    ]
    text = describe_mesh(layout)
    assert "replica 0: stage group 0 [0 1] -> stage group 1 [2 3]" in text
    assert "replica 1: stage group 0 [4 5] -> stage group 1 [6 7]" in text


@pytest.mark.parametrize(
    ("layout", "world", "message"),
    [
        (Grid(2, 2, 2), 6, r"world size 6 is not dp\*pp\*tp"),
        (Grid(1, 2, 3), None, r"--tp 3 does not divide the attention heads \(4\)"),
        (
            Grid(1, 9, 1),
            None,
            r"--pp 9 is larger than the number of layers \(6: 4 blocks plus the embedding "
            r"and the head\)",
        ),
        (Grid(0, 1, 1), None, r"--dp must be >= 1"),
    ],
)
def test_bad_layouts_fail_before_any_process_group(
    layout: Grid, world: int | None, message: str
) -> None:
    # 4 heads, width 64, MLP 256 and 6 layers: the family checks the model, check_grid the grid
    family = GPTFamily(GPTConfig(n_heads=4, d_model=64, d_ff=256, n_layers=4))
    with pytest.raises(ValueError, match=message):
        family.check(layout, world)


@pytest.mark.timeout(300)
def test_two_nodes_hybrid_then_resume_on_another_layout(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    from _nodes import tiny_model, train_on_two_nodes

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"x{i} = {i} * {i}\n" for i in range(500)))
    run_dir = tmp_path / "hybrid"
    train_on_two_nodes(2, ["--dp", "2", "--pp", "2", "--zero", "1", "--steps", "2",
                           "--run-dir", str(run_dir), *tiny_model(str(corpus))])  # fmt: skip
    # ZeRO-1 shards of a pipeline over two replicas, resumed as one tensor-parallel stage
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerwise",
            "train",
            "--resume",
            str(run_dir),
            "--steps",
            "4",
            "--dp",
            "1",
            "--zero",
            "0",
            "--pp",
            "1",
            "--tp",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "saved as dp2 pp2 tp1 zero1 1f1b m=2, on dp1 pp1 tp2 1f1b m=2" in resumed.stdout
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2, 3]
    # refused before any worker starts (in this process: no interpreter to start)
    from layerwise.cli import main

    assert main(["train", "--resume", str(run_dir), "--d-model", "64"]) == 2
    said = capsys.readouterr().err
    assert "cannot resume" in said and "d_model 32 saved, 64 given" in said
    assert main(["train", "--run-dir", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # sampling reads the tensor-parallel checkpoint on one plain worker
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerwise",
            "generate",
            str(run_dir),
            "--prompt",
            "x1",
            "--tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.splitlines()[-1].startswith("x1") and len(gen.stdout.strip()) >= 12


@pytest.mark.timeout(200)
def test_tensor_parallel_block_all_reduces_once_per_sub_layer() -> None:
    counts = run_workers(hw.tp_collectives, 2, timeout_s=120)
    # attention and MLP: one all-reduce each in forward (row-wise outputs) and in backward
    # (the replicated inputs' gradients)
    assert counts[0] == {"forward": 2, "backward": 2}
