#!/usr/bin/env bash
# Write hpc/constraints.txt: the exact version of every package in the tested environment (the
# .venv that `bash .ci/run` builds and the suite passes in), so that an install next month gets
# what the tests saw: pip install -c hpc/constraints.txt ... (README, .ci/run, Dockerfile and
# apptainer.def all do). torch, triton and the nvidia-* wheels are left out: which torch build fits
# is the machine's choice (CPU here, the CUDA image's own on GPUs); install torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
{
  echo "# Versions of the tested environment (hpc/pin.sh, $("$PY" --version 2>&1)); torch not pinned here."
  "$PY" -m pip freeze --exclude-editable --disable-pip-version-check | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+)==' \
    | grep -v '^#' | LC_ALL=C sort -f
} > hpc/constraints.txt
echo "hpc/constraints.txt: $(grep -vc '^#' hpc/constraints.txt) packages pinned"
