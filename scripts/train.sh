#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job: `layerwise train` (defaults unless you pass flags).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/layerwise train "$@"
