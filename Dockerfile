# GPU image of the dropwise prediction service: CUDA torch + onnxruntime-gpu, serving a mounted repository.
#
#   docker build -t dropwise:gpu .
#   docker run --gpus all -p 8000:8000 -e DROPWISE_API_TOKEN=... -v "$PWD/model_repository:/models" dropwise:gpu
#
# One CUDA major (13) and one cuDNN in the process:
# - torch 2.13 from its cu130 index (torch 2.13 publishes CUDA 12.6 and 13.0 wheels only; there is no cu128);
#   its wheels bring the CUDA 13 user-space libraries and cuDNN 9 (nvidia-cudnn-cu13) as pip packages;
# - onnxruntime-gpu 1.31.1 from PyPI, built with CUDA 13.0 and cuDNN 9 (its build_and_package_info says
#   cuda_version = '13.0'); dropwise imports torch first, so ONNX Runtime's CUDA provider finds torch's
#   cuDNN and CUDA libraries already loaded instead of a second copy;
# - a CUDA 13.0 *base* image: the CUDA runtime only, no cuDNN of its own (a cudnn-runtime image would put a
#   second cuDNN beside the wheel's). Its NVIDIA_REQUIRE_CUDA makes the NVIDIA Container Toolkit refuse a host
#   whose driver is too old, with a message, instead of a CUDA error later.
# Host: an NVIDIA driver for CUDA 13.0 (Linux driver 580 or newer), a GPU that CUDA 13 supports (compute
# capability 7.5 or newer: Turing and later), and the NVIDIA Container Toolkit. Change CUDA_IMAGE,
# TORCH_INDEX and ORT_GPU_VERSION together for another CUDA major.
# Size: an estimate of about 7 GB uncompressed, mostly torch's CUDA libraries (no docker engine was at hand
# to build it; see README "GPU").
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG ORT_GPU_VERSION=1.31.1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 (3.12 on 24.04); the distribution's package versions are those of the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# CUDA torch first (its own index), so the project's `torch>=2.5` requirement is already met by it; then
# the CUDA 13 build of ONNX Runtime (the `gpu` extra's onnxruntime-gpu is then already satisfied).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir "onnxruntime-gpu==${ORT_GPU_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY dropwise ./dropwise
COPY package ./package
COPY models ./models
COPY surgery ./surgery
COPY service ./service
# `gpu` extra = onnxruntime-gpu (never together with the `cpu` extra's onnxruntime).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]"

# Ubuntu 24.04 images already have user `ubuntu` with UID 1000, so `useradd --uid 1000` fails: rename that
# user instead. UID 1000 is also the usual first user of a Linux host, who can then write the mounted
# repository (first-start training) without a chown.
RUN usermod --login dropwise --home /home/dropwise --move-home ubuntu \
    && groupmod --new-name dropwise ubuntu \
    && mkdir -p /models \
    && chown 1000:1000 /models
USER 1000:1000

# Settings come from DROPWISE_* variables (service/settings.py); the repository is mounted at /models.
# DROPWISE_TRAIN_IF_EMPTY=1: an empty (writable) /models gets the reference networks trained into it on the
# first start, while /healthz already answers and /readyz says so; a read-only empty mount is refused in one
# line saying what to mount. The container must bind 0.0.0.0 to be reachable through its published port:
# pass DROPWISE_API_TOKEN (or, on a trusted network only, DROPWISE_ALLOW_UNAUTHENTICATED=1).
ENV DROPWISE_HOST=0.0.0.0 \
    DROPWISE_PORT=8000 \
    DROPWISE_REPOSITORY=/models \
    DROPWISE_DEVICE=auto \
    DROPWISE_BACKEND=torch \
    DROPWISE_TRAIN_IF_EMPTY=1
EXPOSE 8000

# Healthy once every model is loaded (/readyz 200). The start period covers a first start that trains the
# reference networks; a start on a trained repository is ready in seconds.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["dropwise", "serve"]
