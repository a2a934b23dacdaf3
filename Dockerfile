# syntax=docker/dockerfile:1.7
# RecServe images, one Dockerfile with two targets:
#   docker build --target operator -t ghcr.io/recserve/operator:0.1.0 .
#   docker build --target builder  -t ghcr.io/recserve/model-repo-builder:0.1.0 .
#   GPU engine builds (TensorRT comes from NVIDIA's image, matched to the Triton release):
#   docker build --target builder --build-arg BUILDER_BASE=nvcr.io/nvidia/tensorrt:25.10-py3 \
#     -t ghcr.io/recserve/model-repo-builder:0.1.0-trt25.10 .
# Dependencies are the exact, complete sets in requirements/*.txt (generated from constraints.txt by
# hack/gen_requirements.py); they are installed with --no-deps so nothing unpinned slips in, then checked.

# checkov:skip=CKV_DOCKER_7: BUILDER_BASE defaults to a versioned tag; the build argument exists to choose another versioned tag (TensorRT)
ARG BUILDER_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# Operator: Kopf + Kubernetes client + statistics; no TensorFlow, no compilers (wheels only).
FROM python:3.11-slim-bookworm AS operator-deps
COPY requirements/operator.txt /tmp/requirements.txt
# Packages' own test suites (pandas alone ships 40 MB) and pip itself are dead weight at runtime.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && /opt/venv/bin/pip check \
    && find /opt/venv -depth -type d -name tests -prune -exec rm -rf {} + \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools
# The operator imports model_repo_builder.config (Triton's config.pbtxt model); the package's heavy
# imports (TensorFlow, ONNX Runtime) are lazy, so the source alone is enough here.
COPY operator/recserve_operator /opt/app/recserve_operator
COPY model_repo_builder /opt/app/model_repo_builder
# Bytecode is compiled now because the root filesystem is read-only at runtime.
RUN /opt/venv/bin/python -m compileall -q /opt/app

FROM python:3.11-slim-bookworm AS operator
LABEL org.opencontainers.image.title="recserve-operator" \
      org.opencontainers.image.description="RecServe Kubernetes operator (Kopf)" \
      org.opencontainers.image.source="https://github.com/recserve/recserve" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID/GID so Kubernetes can verify runAsNonRoot; the chart uses the same IDs.
RUN groupadd --system --gid 10001 recserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin recserve
COPY --from=operator-deps /opt/venv /opt/venv
COPY --from=operator-deps /opt/app /opt/app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 8080: Kopf /healthz (probes), 9090: Prometheus /metrics.
EXPOSE 8080 9090
# Kubernetes probes /healthz; a Docker HEALTHCHECK would only duplicate them.
HEALTHCHECK NONE
ENTRYPOINT ["kopf"]
# The chart replaces these arguments (peering, namespaces); this default suits a single local run.
CMD ["run", "--module=recserve_operator.handlers", "--standalone", "--all-namespaces", \
     "--liveness=http://0.0.0.0:8080/healthz"]

# ---------------------------------------------------------------------------------------------------------
# Builder: TensorFlow/Keras -> ONNX -> ONNX Runtime (and TensorRT when BUILDER_BASE is NVIDIA's image).
FROM ${BUILDER_BASE} AS builder-deps
COPY requirements/builder.txt /tmp/requirements.txt
# --system-site-packages keeps the TensorRT Python bindings of the NVIDIA base visible in the venv; on
# the slim base there are none, so it changes nothing there.
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && /opt/venv/bin/pip check \
    && find /opt/venv -depth -type d -name tests -prune -exec rm -rf {} +
COPY model_repo_builder /opt/app/model_repo_builder
RUN /opt/venv/bin/python -m compileall -q /opt/app

FROM ${BUILDER_BASE} AS builder
LABEL org.opencontainers.image.title="recserve-model-repo-builder" \
      org.opencontainers.image.description="Builds verified Triton model repositories (TF -> ONNX -> ORT/TensorRT)" \
      org.opencontainers.image.source="https://github.com/recserve/recserve" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 recserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin recserve
COPY --from=builder-deps /opt/venv /opt/venv
COPY --from=builder-deps /opt/app /opt/app
# TensorFlow and Keras write caches under HOME; /tmp is the writable emptyDir in the init container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TF_CPP_MIN_LOG_LEVEL=2
USER 10001:10001
WORKDIR /tmp
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "model_repo_builder"]
CMD ["--help"]
