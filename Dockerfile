# dpo-hpc images. The default (last) stage is for CUDA GPUs: docker build -t dpo-hpc . ; on a
# cluster, build the Apptainer image from apptainer.def instead (or: apptainer build dpo-hpc.sif
# docker-daemon://dpo-hpc:latest). The "cpu" stage is the same package on Debian with PyTorch's
# CPU build: docker build --target cpu -t dpo-hpc:cpu . (CI builds and runs it with buildah).
ARG CUDA_BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel
ARG CPU_BASE=debian:bookworm-slim

FROM ${CPU_BASE} AS cpu
# TOKENIZERS_PARALLELISM is left unset: dpo-hpc tokenizes on every core, then switches it off.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH
# Debian's own python3 (3.11 in bookworm, the version the tests run on); the packages on top of
# it are pinned by hpc/constraints.txt, these by the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/dpo-hpc
COPY pyproject.toml README.md ./
COPY hpc/constraints.txt ./hpc/constraints.txt
COPY dpo_hpc ./dpo_hpc
# torch's CPU build, pinned as in the README (an unpinned torch pulls a CUDA build of several GB).
# Behind a proxy or with a local wheel folder, pass pip's settings as build arguments (unset when
# not given): PIP_INDEX_URL, PIP_CERT (a CA bundle mounted into the build), PIP_FIND_LINKS.
ARG PIP_INDEX_URL
ARG PIP_CERT
ARG PIP_FIND_LINKS
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir -c hpc/constraints.txt "/opt/dpo-hpc[peft]" \
    && python -c "import dpo_hpc, deepspeed, peft, submitit, transformers; print('dpo-hpc', dpo_hpc.__version__)"
WORKDIR /work
ENTRYPOINT ["python", "-m", "dpo_hpc"]
CMD ["--help"]

FROM ${CUDA_BASE} AS cuda
# The devel image carries nvcc, which DeepSpeed needs to JIT-build its fused ops on first use.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

WORKDIR /opt/dpo-hpc
COPY pyproject.toml README.md ./
COPY hpc/constraints.txt ./hpc/constraints.txt
COPY dpo_hpc ./dpo_hpc
# torch comes from the base image; pip keeps it because it satisfies torch>=2.1. Every other
# package gets the version the tests passed with (hpc/constraints.txt). The peft extra makes
# [lora] work inside the image.
RUN pip install --no-cache-dir -c hpc/constraints.txt "/opt/dpo-hpc[peft]" \
    && python -c "import dpo_hpc, deepspeed, peft, submitit, transformers; print('dpo-hpc', dpo_hpc.__version__)"

WORKDIR /work
ENTRYPOINT ["python", "-m", "dpo_hpc"]
CMD ["--help"]
