# memlens in a container: `docker build -t memlens .` then
# `docker run --rm -v "$PWD:/work" memlens run pipelines/demo.yaml --out runs/demo`
FROM python:3.11-slim-bookworm

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
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/memlens
# CPU-only PyTorch wheels keep the image small; memlens never needs a GPU.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.9.1 torchvision==0.24.1
COPY pyproject.toml README.md ./
COPY memlens ./memlens
COPY policies ./policies
COPY pipelines ./pipelines
RUN pip install . \
    && useradd --create-home --uid 10001 memlens

USER 10001
WORKDIR /work
ENV MEMLENS_CACHE_DIR=/work/.memlens-cache
ENTRYPOINT ["memlens"]
CMD ["--help"]
