#!/usr/bin/env bash
# Creates .venv (once) and installs layerwise with its dev tools into it.
# torch is installed only when the venv lacks a usable one; the pinned CPU build is preferred
# because it is small and, on machines that carry it, installs from local disk in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip on some machines warns about every missing local index; keep real errors visible
pip_quiet() { .venv/bin/pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 4) else 1)" 2>/dev/null; then
  echo "installing torch (CPU build)..." >&2
  pip_quiet "torch==2.13.0" || pip_quiet "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
fi
if ! .venv/bin/python -c "import layerwise, pytest, pytest_timeout, hypothesis, tqdm, matplotlib" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.layerwise-installed ]; then
  pip_quiet -e ".[dev]"
  touch .venv/.layerwise-installed
fi
