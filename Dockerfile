# syntax=docker/dockerfile:1
# One image with the four msghash binaries: ingest, query, projector and msghash (the
# standalone server, also `msghash cert` for certificates). docker-compose.yml runs the
# distributed services from it by name (command: ingest | query | projector).
#
#   docker build -t msghash .
#   docker run --rm -p 5000:5000 msghash        # the standalone server on https://localhost:5000
#
# Stages: chef (toolchain + cargo-chef) -> planner (dependency recipe) -> builder
# (dependencies in their own layer, then the workspace) -> runtime (Debian slim, non-root).

# The toolchain CI builds and tests with; it must be at least the workspace rust-version
# (scripts/check-deploy checks that).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
# librdkafka is compiled from source by rdkafka-sys: C/C++ compiler, make, perl, zlib
# headers (no cmake). Package versions are not pinned: Debian's archive drops superseded
# versions, so pins break rebuilds; the pinned base image (Debian release) fixes them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential perl pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/* \
    && cargo install cargo-chef --version 0.1.78 --locked \
    && rm -rf "$CARGO_HOME/registry"
WORKDIR /src

# The recipe is a pure function of the manifests and Cargo.lock: as long as they do not
# change, the `cargo chef cook` layer below (all third-party crates) stays cached.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json \
        -p ingest -p query -p projector -p msghash
COPY . .
RUN cargo build --release --locked -p ingest -p query -p projector -p msghash \
    && mkdir -p /out \
    && cp target/release/ingest target/release/query target/release/projector \
          target/release/msghash /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS clients; curl only for the container healthchecks (GET
# /health/ready over HTTPS, see docker-compose.yml); zlib1g is linked by librdkafka (it is
# in the base image already, named here so it cannot silently go). Not pinned: see above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 msghash \
    && useradd --system --uid 10001 --gid msghash --home-dir /var/lib/msghash \
        --create-home --shell /usr/sbin/nologin msghash
COPY --from=builder /out/ /usr/local/bin/
# The standalone server keeps ./data and ./certs here (MSGHASH_DATA_DIR, MSGHASH_CERT_DIR).
WORKDIR /var/lib/msghash
USER 10001:10001
# 5000 msghash (standalone), 8081 ingest, 8082 query, 8083 projector (health + metrics).
EXPOSE 5000 8081 8082 8083
CMD ["msghash"]
