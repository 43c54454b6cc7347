# Switchyard image: switchyard-controller, switchyard-dataplane and the mock
# engine the samples use. `docker build -t switchyard .`
#
# Build stage: the toolchain rust-toolchain.toml pins; protobuf is compiled by
# protox (pure Rust), so no protoc is needed.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin switchyard-controller --bin switchyard-dataplane --bin switchyard-mock-engine \
 && mkdir -p /out \
 && cp target/release/switchyard-controller target/release/switchyard-dataplane \
       target/release/switchyard-mock-engine /out/

# Runtime stage: glibc + CA certificates only, no shell, non-root (uid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9090 15010
ENTRYPOINT ["/usr/local/bin/switchyard-dataplane"]
