# syntax=docker/dockerfile:1
# The dpc-operator image: a static binary (rustls, no OpenSSL; DNS resolved in Rust) on a
# distroless base that has CA certificates and no shell, run as a non-root user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY .ci/build-static ./.ci/build-static
# The same build CI runs and checks (.ci/build-static).
RUN bash .ci/build-static && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/dpc-operator /out/dpc-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/dpc-operator /dpc-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/dpc-operator"]
CMD ["run"]
