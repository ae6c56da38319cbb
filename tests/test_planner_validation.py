"""The planner against published runs: Narayanan et al. 2021 and Korthikanti et al. 2022."""

from __future__ import annotations

import pytest

from layerwise.planner.evaluate import evaluate
from layerwise.planner.search import plan
from layerwise.planner.specs import Layout
from layerwise.planner.validation import (
    korthikanti_checks,
    megatron_train,
    narayanan_checks,
    read_rows,
    row_cluster,
    row_model,
)
from planner_helpers import KORTHIKANTI, NARAYANAN


def test_reference_csvs_keep_their_source_lines() -> None:
    for path in (NARAYANAN, KORTHIKANTI):
        assert "# source:" in path.read_text()
    assert len(read_rows(NARAYANAN)) == 10
    assert len(read_rows(KORTHIKANTI)) == 4


@pytest.mark.timeout(120)
def test_hardware_tflops_within_10_percent_of_narayanan_table_1() -> None:
    checks = narayanan_checks(NARAYANAN)
    assert len(checks) == 10
    bad = [f"{c.label}: {c.predicted:.0f} vs {c.published:.0f}" for c in checks
           if abs(c.error) > 0.10]  # fmt: skip
    assert not bad, bad


@pytest.mark.timeout(60)
def test_memory_and_iteration_times_within_10_percent_of_korthikanti() -> None:
    checks = korthikanti_checks(KORTHIKANTI)
    assert len(checks) == 20
    bad = [f"{c.label}: {c.predicted:.2f} vs {c.published:.2f}" for c in checks
           if abs(c.error) > 0.10]  # fmt: skip
    assert not bad, bad


@pytest.mark.timeout(60)
@pytest.mark.parametrize("index", range(10))
def test_planner_matches_or_beats_each_published_layout(index: int) -> None:
    row = read_rows(NARAYANAN)[index]
    model, cluster = row_model(row), row_cluster(row)
    train = megatron_train(int(row["global_batch"]))
    tp, pp = int(row["tp"]), int(row["pp"])
    published = Layout(int(row["gpus"]) // (tp * pp), tp, pp, micro_batch=1, recompute="full")
    ev = evaluate(model, cluster, train, published)
    assert ev.fits, f"published layout predicted over memory: {ev.memory.as_dict()}"
    best = plan(model, cluster, train, top=1).ranked[0]
    assert best.step_time_s <= ev.step_time_s * (1 + 1e-9)
