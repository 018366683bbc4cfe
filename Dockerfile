# syntax=docker/dockerfile:1
#
# drmerge images. Two final targets, one build file:
#
#   docker build --target api    -t drmerge-api:0.1.0    .   # FastAPI; no torch, no CUDA
#   docker build --target worker -t drmerge-worker:0.1.0 .   # Celery + CUDA torch; CPU fallback
#
# Both run as uid/gid 10001 from a venv at /opt/venv that is built in a throw-away
# stage, so no pip caches or build back-ends end up in the shipped layers.
# The python slim base has no compilers; every dependency here ships wheels.

# Exact patch release of the interpreter and the Debian release it sits on: a rebuild
# months later gets the same Python. Bump deliberately (and re-run deploy/validate.sh).
ARG PYTHON_VERSION=3.11.14
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------- build stages
FROM python-base AS build-base
RUN python -m venv /opt/venv
WORKDIR /src

FROM build-base AS api-build
COPY . .
# The API enqueues by task name and never imports the engine, so it must not pull in
# torch: the second command fails the build if some dependency drags it in.
# DL3013 (pin pip versions): this installs the project itself from the build context;
# its dependency ranges are declared once, in pyproject.toml, not repeated here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[service]" \
 && python -c "import importlib.util, sys; sys.exit('torch leaked into the api image' if importlib.util.find_spec('torch') else 0)"

FROM build-base AS worker-build
# torch first, in its own layer: it is gigabytes and changes far less often than our code.
# PyPI's Linux x86_64 wheel of torch 2.13.0 is a CUDA 13.0 build (needs NVIDIA driver >= 580).
# For older drivers pick a PyTorch wheel index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# The wheel bundles the CUDA user-space libraries, so no nvidia/cuda base image is needed:
# the NVIDIA container runtime injects only the driver. Without a GPU torch runs on the CPU.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY . .
# Re-stating the pin keeps the resolver from swapping the CUDA build installed above.
# DL3013: the project itself, as in api-build; torch is pinned by TORCH_VERSION.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[worker]" "torch==${TORCH_VERSION}"

# ---------------------------------------------------------------- runtime stages
FROM python-base AS runtime
RUN groupadd --system --gid 10001 drmerge \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/drmerge --create-home \
            --shell /usr/sbin/nologin drmerge
# Caches go to /tmp so the images also run with a read-only root filesystem
# (compose: read_only + tmpfs; Kubernetes: readOnlyRootFilesystem + emptyDir).
ENV XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/drmerge
ENTRYPOINT ["drmerge"]

FROM runtime AS worker
COPY --from=worker-build /opt/venv /opt/venv
COPY deploy/docker/worker_healthcheck.py /usr/local/lib/drmerge/worker_healthcheck.py
# NVIDIA_* tell the NVIDIA container runtime to expose the GPU and driver libraries;
# they are inert on hosts without it. DRMERGE_WORKER_DEVICE=auto uses CUDA when torch
# sees a GPU and the CPU otherwise; set it to cuda to fail fast on a GPU-less node.
ENV DRMERGE_WORKER_DEVICE=auto \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    TRITON_CACHE_DIR=/tmp/.triton
USER 10001:10001
# Liveness = this container's Celery node answers a broadcast ping through the broker
# (its main process replies even while a merge runs in the pool). Slow and tolerant:
# a failed check only flags the container, it never interrupts a merge by itself.
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/drmerge/worker_healthcheck.py"]
CMD ["worker"]

# The api target is last so that a plain `docker build .` yields the small image.
FROM runtime AS api
COPY --from=api-build /opt/venv /opt/venv
ENV DRMERGE_API_HOST=0.0.0.0 \
    DRMERGE_API_PORT=8000
USER 10001:10001
EXPOSE 8000
# /livez only: readiness (Redis, S3) belongs to the orchestrator, and a container that
# restarts because S3 blinked helps nobody. No curl in the image: the stdlib does it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('DRMERGE_API_PORT', '8000'), timeout=4)"]
CMD ["api"]
