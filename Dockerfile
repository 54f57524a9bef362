# GPU image of the dropwise prediction service: CUDA torch + onnxruntime-gpu, serving a mounted repository.
#
#   docker build -t dropwise:gpu .
#   docker run --gpus all -p 8000:8000 -v "$PWD/model_repository:/models:ro" dropwise:gpu
#
# Needs the NVIDIA driver and the NVIDIA Container Toolkit on the host. The base image brings the CUDA 12
# runtime and cuDNN 9 that onnxruntime-gpu loads; torch brings its own CUDA libraries from its wheel
# index. Change CUDA_IMAGE / TORCH_INDEX together for another CUDA version.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# CUDA torch first (its own index), so the project's `torch>=2.5` requirement is already met by it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY surgery ./surgery
COPY service ./service
# `gpu` extra = onnxruntime-gpu (never together with the `cpu` extra's onnxruntime).
RUN pip install ".[gpu]"

RUN useradd --create-home --uid 1000 dropwise
USER dropwise

# Settings come from DROPWISE_* variables (service/settings.py); the repository is mounted at /models.
ENV DROPWISE_HOST=0.0.0.0 \
    DROPWISE_PORT=8000 \
    DROPWISE_REPOSITORY=/models \
    DROPWISE_DEVICE=auto \
    DROPWISE_BACKEND=torch
EXPOSE 8000

# Healthy only when every model is loaded (/readyz answers 200; 503 and connection errors fail).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["dropwise", "serve"]
