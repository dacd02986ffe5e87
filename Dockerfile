# syntax=docker/dockerfile:1
# One image with the four msghash binaries: ingest, query, projector and msghash (the
# standalone server, also `msghash cert` for certificates). docker-compose.yml runs the
# distributed services from it by name (command: ingest | query | projector).
#
#   DOCKER_BUILDKIT=1 docker build -t msghash .     # BuildKit: the cache mounts below
#   docker run --rm -p 5000:5000 msghash            # the standalone server on https://localhost:5000
#
# Stages: builder (toolchain, then two cargo builds with the registry and target/ in
# BuildKit cache mounts) -> runtime (Debian slim, non-root, stripped binaries only).

# The toolchain CI builds and tests with; it must be at least the workspace rust-version
# (scripts/check-deploy checks that).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
# librdkafka is compiled from source by rdkafka-sys: C/C++ compiler, make, perl, zlib
# headers (no cmake). Package versions are not pinned: Debian's archive drops superseded
# versions, so pins break rebuilds; the pinned base image (Debian release) fixes them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential perl pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Two cargo calls, not one: in one call cargo unifies features, and `msghash` would link
# librdkafka and the ScyllaDB driver that ingest/query/projector enable in msghash-common.
# Alone, `-p msghash` builds only the embedded adapters (scripts/check-deploy verifies that
# with `cargo tree` on the same package lists, and the grep below on the binary itself).
# Symbols are stripped by cargo (CARGO_PROFILE_RELEASE_STRIP; the workspace's release
# profile stays as it is for benchmarks and profiling). The registry and target/ live in
# cache mounts, kept by BuildKit between builds: a source change recompiles only the
# workspace crates. target/ is not in the image, so the binaries are copied out here.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    export CARGO_PROFILE_RELEASE_STRIP=symbols \
    && cargo build --release --locked -p msghash \
    && cargo build --release --locked -p ingest -p query -p projector \
    && if grep -q librdkafka target/release/msghash; then \
         echo "msghash links librdkafka: feature unification" >&2; exit 1; \
       fi \
    && mkdir -p /out \
    && cp target/release/ingest target/release/query target/release/projector \
          target/release/msghash /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS clients; curl only for the healthchecks (GET /health/ready over
# HTTPS, below and in docker-compose.yml); zlib1g is linked by librdkafka (it is in the
# base image already, named here so it cannot silently go). Not pinned: see above.
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
# Readiness of whichever binary runs: on the port of its MSGHASH_LISTEN, or when that is
# unset on each binary's default port in turn (5000 msghash, 8081 ingest, 8082 query,
# 8083 projector; a container runs one, the others refuse at once). Over loopback, so the
# certificate is not verified (-k): it may be one only the clients know the CA of.
# docker-compose.yml and Kubernetes use their own checks.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "if [ -n \"${MSGHASH_LISTEN:-}\" ]; then set -- \"${MSGHASH_LISTEN##*:}\"; else set -- 5000 8081 8082 8083; fi; for p in \"$@\"; do curl -fsSk -o /dev/null --max-time 1 \"https://localhost:$p/health/ready\" && exit 0; done; exit 1"]
CMD ["msghash"]
