# infergate: build with the Rust toolchain, run on a distroless base as a non-root user.
#   docker build -t infergate:0.1.0 .
# The binary needs only glibc and libgcc (no TLS or system libraries are linked), which
# distroless/cc provides; no shell or package manager in the runtime image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src/bin \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/infergate-load.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin infergate --bin infergate-load

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/infergate /usr/local/bin/infergate
COPY --from=build /src/target/release/infergate-load /usr/local/bin/infergate-load
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/infergate"]
CMD ["serve", "--grpc-addr", "0.0.0.0:8081", "--http-addr", "0.0.0.0:8080"]
