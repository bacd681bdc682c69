# memlens in a container. Build: `docker build -t memlens .` (CPU wheels; for CUDA add
# `--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130`). Run with the data mounted
# read-only and an output folder writable by the user you run as:
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD/data:/data:ro" -v "$PWD/out:/out" memlens \
#       audit --f /data/runs/f --g /data/runs/g --splits /data/splits.json --out /out/audit
FROM python:3.11-slim-bookworm

# The same torch/torchvision pins as the Makefile (make demo / make test).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Pango (with HarfBuzz and fontconfig) is what WeasyPrint renders PDFs with; DejaVu is the report font.
# Versions come from the pinned Debian release; pinning each package would break on security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp

WORKDIR /opt/memlens
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md ./
COPY memlens ./memlens
COPY policies ./policies
COPY pipelines ./pipelines
RUN pip install . \
    && useradd --create-home --uid 10001 memlens \
    && mkdir -p /data /out \
    && chown 10001 /out

# A non-root user by default; `docker run -u UID:GID` runs as the owner of the mounted folders.
USER 10001
WORKDIR /out
# Decoded images are cached beside the outputs, never in the image or a home directory.
ENV MEMLENS_CACHE_DIR=/out/cache
ENTRYPOINT ["memlens"]
CMD ["--help"]
