# syntax=docker/dockerfile:1
# notify-bridge container image: `docker compose up --build` (see docker-compose.yml).

# ---- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build
COPY . .
# Cache mounts keep the crate registry and target/ between builds (BuildKit);
# the binary is copied out in the same step since the cache is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked \
    && install -m 0755 target/release/notify-bridge /usr/local/bin/notify-bridge

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system notify-bridge \
    && useradd --system --gid notify-bridge --home-dir /var/lib/notify-bridge \
        --shell /usr/sbin/nologin notify-bridge \
    && install -d -o notify-bridge -g notify-bridge /var/lib/notify-bridge
COPY --from=builder /usr/local/bin/notify-bridge /usr/local/bin/notify-bridge
USER notify-bridge
# Relative paths (inbox.path defaults to data/inbox.db) land in this writable folder.
WORKDIR /var/lib/notify-bridge
# 8080: WebSocket (websocket.listen), 8081: HTTP side port (http.listen).
EXPOSE 8080 8081
ENTRYPOINT ["notify-bridge"]
