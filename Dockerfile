# The otel-evaluator daemon image. See docs/deployment.md.
#
#   docker build -t otel-evaluator:local .
#   docker run --rm -p 4317:4317 -p 4318:4318 -p 13133:13133 -v evaluator-data:/var/lib/otel-evaluator \
#       otel-evaluator:local
#
# Two stages: the builder has a C compiler and builds the wheel (with the optional C decoder,
# evaluator/receiver/_fastdecode.c) and every dependency into a virtual environment; the runtime stage copies only
# that environment. Both stages use the same base image, so the environment's interpreter path is valid in both.
# For production, pin the base image by digest as well (python:3.11-slim-bookworm@sha256:...).

FROM python:3.11-slim-bookworm AS builder

# gcc and the C library headers for the C decoder (Python.h is part of the python image).
# Versions are not pinned: they come from the pinned Debian release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/otel-evaluator
WORKDIR /src
COPY pyproject.toml README.md ./
COPY evaluator ./evaluator
# The C decoder is optional in pyproject.toml (an install without a compiler falls back to the protobuf decoder);
# the image must have it, so the build fails here if it did not compile.
RUN /opt/otel-evaluator/bin/pip install . \
    && /opt/otel-evaluator/bin/python -c "import evaluator.receiver._fastdecode" \
    && /opt/otel-evaluator/bin/otel-evaluator --version


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="otel-evaluator" \
      org.opencontainers.image.description="OTLP evaluator daemon: payload signals in DuckDB, population-level rules" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, non-root uid/gid (10001), so volume ownership and Kubernetes securityContext (runAsUser, fsGroup)
# can name it. The data folder is created here, owned by that user, before it becomes a VOLUME: a new named
# volume is initialised with this ownership. secrets/ and tls/ are mount points for the token and certificates.
RUN groupadd --system --gid 10001 evaluator \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/otel-evaluator --no-create-home \
       --shell /usr/sbin/nologin evaluator \
    && mkdir -p /var/lib/otel-evaluator /etc/otel-evaluator/secrets /etc/otel-evaluator/tls \
    && chown 10001:10001 /var/lib/otel-evaluator

COPY --from=builder /opt/otel-evaluator /opt/otel-evaluator
# The default configuration (the image's contract: what is in the file and what the CMD flags set is described
# in docs/deployment.md) and the example rules it loads. Mount your own over /etc/otel-evaluator/config.yaml
# and /etc/otel-evaluator/rules.
COPY deploy/docker/config.yaml /etc/otel-evaluator/config.yaml
COPY rules/ /etc/otel-evaluator/rules/

# PYTHONDONTWRITEBYTECODE: nothing is written outside the data volume (the image runs with a read-only root
# file system in deploy/k8s). The OTEL_EXPORTER_OTLP_* variables (alert export) are read from the environment
# at start; set them with `docker run -e` or in the orchestrator, none is set here.
ENV PATH=/opt/otel-evaluator/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/otel-evaluator

USER 10001:10001
WORKDIR /var/lib/otel-evaluator
VOLUME ["/var/lib/otel-evaluator"]

# 4317 OTLP/gRPC, 4318 OTLP/HTTP, 13133 admin (/healthz /readyz /metrics).
EXPOSE 4317 4318 13133

# Ready when /readyz answers 200 (the store is open and every server is up). No curl in the image: Python's
# urllib with a short timeout. EVALUATOR_HEALTHCHECK_URL overrides the URL (e.g. https://127.0.0.1:13133/readyz
# when admin.tls is set; the certificate is not verified for this loopback check).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; url = os.environ.get('EVALUATOR_HEALTHCHECK_URL', 'http://127.0.0.1:13133/readyz'); urllib.request.urlopen(url, timeout=3, context=ssl._create_unverified_context()); sys.exit(0)"]

# Exec form: otel-evaluator is PID 1 and receives SIGTERM itself (graceful stop: in-flight exports finish,
# everything is committed and checkpointed, exit 0) and SIGHUP (reload the rules).
ENTRYPOINT ["otel-evaluator", "serve"]
# Listen on every interface (the default is loopback only) and keep the database on the volume. Flags override
# the config file, so these four always hold in the image; override CMD to change them.
CMD ["--config", "/etc/otel-evaluator/config.yaml", \
     "--db", "/var/lib/otel-evaluator/evaluator.duckdb", \
     "--grpc-listen", "0.0.0.0:4317", \
     "--http-listen", "0.0.0.0:4318", \
     "--admin-listen", "0.0.0.0:13133"]
