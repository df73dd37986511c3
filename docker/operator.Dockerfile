# syntax=docker/dockerfile:1.7
#
# streamops-operator image. Build from the repository root:
#   docker buildx build -f docker/operator.Dockerfile --build-arg VERSION=0.1.0 \
#     -t ghcr.io/streamops/streamops-operator:0.1.0 --load .
# (`make images` does this for both images.)
#
# RUST_VERSION is the workspace's rust-version (Cargo.toml); scripts/validate_manifests.py checks
# that it is at least that and at least every locked dependency's rust-version.
# The builder is Debian bookworm because the runtime is distroless debian12 (same glibc).
ARG RUST_VERSION=1.89
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# `static-deps` links OpenSSL and zlib statically into librdkafka (built by rdkafka-sys with its
# own configure script; gcc, make and perl come with the rust:bookworm image).
ENV CARGO_TERM_COLOR=never \
    SQLX_OFFLINE=true
COPY . .
# The registry, git checkouts and target/ live in BuildKit cache mounts, so a rebuild after a
# source change is incremental. The binary is copied out of the cache mount within the same step.
RUN --mount=type=cache,id=streamops-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=streamops-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=streamops-target-bookworm,target=/src/target,sharing=locked \
    cargo build --locked --release -p streamops-operator --bin streamops-operator --features static-deps \
 && mkdir -p /out \
 && cp target/release/streamops-operator /out/ \
 && if ldd /out/streamops-operator | grep -E 'lib(ssl|crypto|z)\.so'; then \
      echo 'error: streamops-operator links OpenSSL or zlib dynamically; the distroless runtime lacks them (is the static-deps feature wired?)' >&2; exit 1; \
    fi

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/streamops/streamops
LABEL org.opencontainers.image.title="streamops-operator" \
      org.opencontainers.image.description="The streamops operator: reconciles StreamConsumer resources into Kafka consumer worker Deployments" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="streamops"
COPY --from=build --chown=0:0 --chmod=0755 /out/streamops-operator /usr/local/bin/streamops-operator
# 65532 is the distroless `nonroot` user; the chart also sets runAsUser 65532 and a read-only root.
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/streamops-operator"]
CMD ["run"]
