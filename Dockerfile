# optgate container image. Docker cannot run on the machines this was written on, so this
# file has not been built there; it is kept deliberately plain.
#
#   docker build -t optgate .
#   docker run --rm -p 2587:2587 -p 2465:2465 -p 8443:8443 \
#     -v $PWD/deploy/optgate.toml:/etc/optgate/optgate.toml:ro \
#     -v $PWD/deploy/keys.json:/run/secrets/optgate-keys.json:ro \
#     -v $PWD/deploy/certs:/etc/optgate/certs:ro \
#     -v optgate-data:/var/lib/optgate \
#     -e OPTGATE_SENDER_REMINDERS=... optgate
#
# Config, keys and certificates are mounted, never baked in. In the config: listen on 0.0.0.0,
# point [keys] file at the mounted secret and [redis] url at a Redis/Valkey beside the
# container (the embedded store also works, persisted in the data volume).

# ---- build stage: compilers allowed here only ----------------------------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/optgate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/optgate/bin/pip install --upgrade pip \
 && /opt/optgate/bin/pip install .

# ---- runtime stage: no compilers, no package manager caches, non-root --------------------
FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/optgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPTGATE_CONFIG=/etc/optgate/optgate.toml
RUN groupadd --system --gid 10001 optgate \
 && useradd --system --uid 10001 --gid optgate --home-dir /var/lib/optgate --shell /usr/sbin/nologin optgate \
 && install -d -o optgate -g optgate -m 0700 /var/lib/optgate \
 && install -d -m 0755 /etc/optgate
COPY --from=build /opt/optgate /opt/optgate
USER optgate:optgate
WORKDIR /var/lib/optgate
VOLUME ["/var/lib/optgate"]
EXPOSE 2587 2465 8443
# Loopback probe of /healthz over TLS 1.3; the certificate is not verified because the probe
# never leaves the container and must not depend on which CA the operator mounted.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import ssl,urllib.request as u;c=ssl.create_default_context();c.check_hostname=False;c.verify_mode=ssl.CERT_NONE;c.minimum_version=ssl.TLSVersion.TLSv1_3;u.urlopen('https://127.0.0.1:8443/healthz',context=c,timeout=2)"]
ENTRYPOINT ["optgate"]
CMD ["serve"]
