# syntax=docker/dockerfile:1
# The Salamander operator image: `salamander operator` (the kopf operator, the rendezvous store it
# hosts, the agents' control plane and its metrics), and `salamander rendezvous` for a store of
# its own. Build it from the repository root (the context .dockerignore lets in only the package):
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/salamander-dev/salamander-operator:0.1.0 .
#
# torch is in it because the rendezvous store is torch.distributed's TCPStore
# (salamander_operator/rendezvous.py); nothing else needs it, so the CPU wheel is enough. With
# it the image is about 1.3 GB unpacked (torch ~750 MB, its and Salamander's other dependencies
# ~450 MB, python:slim ~125 MB).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/salamander
ENV PATH=/opt/salamander/bin:$PATH
# torch alone from the PyTorch index, so the CPU build is the only candidate; then the package
# and the rest of its dependencies from PyPI (torch is already satisfied).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md /src/
COPY src /src/src
COPY operator/src /src/operator/src
COPY worker/src /src/worker/src
RUN pip install /src \
    && salamander --version \
    && python -c "import salamander_operator.kube.main"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="salamander-operator" \
      org.opencontainers.image.description="Elastic, self-healing PyTorch training on Kubernetes: the operator" \
      org.opencontainers.image.source="https://github.com/salamander-dev/salamander" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric, non-root user (Kubernetes checks runAsNonRoot only against a numeric UID), the one
# the chart's podSecurityContext names. Nothing in the image needs to be writable: the chart
# mounts /tmp and points HOME there, with a read-only root filesystem.
RUN groupadd --gid 65532 salamander \
    && useradd --uid 65532 --gid 65532 --create-home --shell /usr/sbin/nologin salamander
COPY --from=build /opt/salamander /opt/salamander
ENV PATH=/opt/salamander/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
WORKDIR /home/salamander
# 29400 rendezvous store, 29401 control plane (gRPC), 9400 metrics, 8080 kopf's liveness probe
EXPOSE 29400 29401 9400 8080
ENTRYPOINT ["salamander"]
CMD ["operator"]
