# dpo-hpc on CUDA: docker build -t dpo-hpc . ; on a cluster, build the Apptainer image from
# apptainer.def instead (or: apptainer build dpo-hpc.sif docker-daemon://dpo-hpc:latest).
# The devel image carries nvcc, which DeepSpeed needs to JIT-build its fused ops on first use.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel

# DL3064 flags TOKENIZERS_PARALLELISM for containing "TOKEN"; it is a switch, not a secret.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
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
