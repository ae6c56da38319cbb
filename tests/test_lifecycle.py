"""A pipeline's life: dropped or closed pipelines lose no message; ranks must agree."""

from __future__ import annotations

import pytest
import torch

import _lifecycle as lc
import layerwise as lw
from layerwise.job.launcher import run_workers


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_dropped_and_closed_pipelines_lose_no_message(world: int) -> None:
    results = run_workers(lc.dropped_and_closed, world, timeout_s=60)
    expected = {k: v for k, v in results[-1].items() if k != "seconds"}
    for rank, res in enumerate(results):
        assert res["seconds"] < 30, (rank, res)  # a lost message would wait 20 s per step
        for case, losses in expected.items():
            assert len(losses) == 2 and losses[0] == losses[1], (case, losses)
            assert res[case] == losses, (rank, case)  # every rank got the last stage's loss


@pytest.mark.timeout(240)
def test_ranks_that_built_different_pipelines_fail_at_once() -> None:
    results = run_workers(lc.disagreeing_ranks, 2, timeout_s=60)
    words = {"schedule": "gpipe", "micro-batches": "micro-batches",
             "partition": "balance [1, 3]", "interleaved": "interleaved-1f1b"}  # fmt: skip
    for rank, res in enumerate(results):
        for case, word in words.items():
            seconds, message = res[case].split("s ", 1)
            assert float(seconds) < 10, (rank, case, res[case])
            assert "workers built different pipelines" in message, message
            assert word in message, (case, message)
        float(res["after"])  # the group still works
    seconds, message = results[0]["absent"].split("s ", 1)
    assert float(seconds) < 3.5, results[0]["absent"]  # the pipeline's 1 s, not the group's 60
    assert "not every worker of the pipeline group started building it" in message, message
    assert "Ranks 1 failed" in message, message  # names the rank that is missing


def test_close_and_context_manager_on_one_worker() -> None:
    pipe = lw.Pipeline([torch.nn.Linear(2, 2)], microbatches=2, loss_fn=lc.mse)
    with pipe as same:
        assert same is pipe
        same.train_step(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="closed"):
        pipe.train_step(torch.randn(4, 2), torch.randn(4, 2))
    pipe.close()  # closing twice is harmless
