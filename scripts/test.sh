#!/usr/bin/env bash
# Sets up .venv if needed, then runs lint, type checks on the pure modules, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src/layerwise/partition.py src/layerwise/schedules src/layerwise/simulate.py src/layerwise/simulate_shared.py src/layerwise/timeline.py src/layerwise/job/guard.py src/layerwise/job/ckpt_files.py src/layerwise/job/supervisor.py src/layerwise/planner src/layerwise/skips.py src/layerwise/job/tokenizer.py src/layerwise/job/documents.py src/layerwise/job/token_cache.py src/layerwise/job/rows.py src/layerwise/job/feed.py src/layerwise/job/export.py src/layerwise/job/model_source.py src/layerwise/models/safetensors_io.py src/layerwise/models/pretrained.py
exec .venv/bin/python -m pytest -q "$@"
