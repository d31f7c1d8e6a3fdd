FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /app relay \
 && mkdir -p /data && chown relay /data
COPY skins ./skins
COPY deploy/relay.docker.toml ./relay.toml
ENV RELAY_CONFIG=/app/relay.toml

USER relay
# deploy/relay.docker.toml: listens on all interfaces, keeps the queue on the /data volume.
VOLUME ["/data"]
EXPOSE 2525 9101
ENTRYPOINT ["relay", "serve"]
