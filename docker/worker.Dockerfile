# syntax=docker/dockerfile:1
# The Salamander worker base image: torch, Salamander and the `salamander-worker` agent that every
# worker pod runs (the operator sets the container's command to `salamander-worker ... -- <your
# command>`). Build it from the repository root:
#
#   docker build -f docker/worker.Dockerfile -t ghcr.io/salamander-dev/salamander-worker:0.1.0 .
#   docker build -f docker/worker.Dockerfile -t ghcr.io/salamander-dev/salamander-worker:0.1.0-cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# The default is torch's CUDA 13.0 build (cu130, one of torch 2.13's two stable CUDA builds; it
# needs an NVIDIA driver >= 580 on the nodes; use TORCH_INDEX=https://download.pytorch.org/whl/cu126
# for older drivers). The CUDA wheels bring their own CUDA runtime, cuDNN and NCCL as pip
# packages, so the base is a plain python:slim image: the driver itself comes from the node,
# mounted by the NVIDIA container toolkit when the device plugin gives the pod a GPU
# (resources.limits: {nvidia.com/gpu: N}). Expect roughly 7 GB unpacked for the CUDA variant and
# about 1.3 GB for the CPU one.
#
# Your training script goes on top, in /workspace (the working directory):
#
#   FROM ghcr.io/salamander-dev/salamander-worker:0.1.0
#   COPY train.py /workspace/
#
# and the TrainingJob runs it with `command: [python, train.py]`. examples/gpt/Dockerfile is a
# complete example. The image runs as UID 1000, which owns /workspace and the virtual
# environment, so `RUN pip install ...` in your Dockerfile works without switching users.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/salamander
ENV PATH=/opt/salamander/bin:$PATH
# torch alone from the PyTorch index the build argument names (CUDA or CPU), then the package
# and the rest of its dependencies from PyPI (torch is already satisfied).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md /src/
COPY src /src/src
COPY operator/src /src/operator/src
COPY worker/src /src/worker/src
RUN pip install /src \
    && command -v salamander-worker \
    && python -c "import salamander_worker.agent"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="salamander-worker" \
      org.opencontainers.image.description="Elastic, self-healing PyTorch training on Kubernetes: the worker base image" \
      org.opencontainers.image.source="https://github.com/salamander-dev/salamander" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 salamander \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash salamander \
    && mkdir /workspace \
    && chown 1000:1000 /workspace
# --chown in the COPY itself: a chown in a later layer would store the whole tree twice.
COPY --from=build --chown=1000:1000 /opt/salamander /opt/salamander
ENV PATH=/opt/salamander/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /workspace
# 29500 the process group's master port, 9401 the pod's metrics (both named in the pod spec)
EXPOSE 29500 9401
CMD ["salamander-worker", "--help"]
