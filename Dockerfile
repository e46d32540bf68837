# Build: docker build -t carousel .
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/balance.rs \
    && cargo build --release --locked && rm -rf src benches
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin carousel

FROM debian:bookworm-slim
# nftables is what --proxy-mode nftables drives; the rest of carousel needs only libc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/carousel /usr/local/bin/carousel
USER 65532:65532
EXPOSE 10249 10256
ENTRYPOINT ["/usr/local/bin/carousel"]
CMD ["run"]
