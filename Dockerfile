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
    && apt-get install -y --no-install-recommends nftables libcap2-bin \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/carousel /usr/local/bin/carousel
# File capabilities let a non-root user change nftables rules and mark sockets, given a
# container that grants NET_ADMIN (docker run --cap-add NET_ADMIN). Kubernetes sets
# no_new_privs with allowPrivilegeEscalation: false, which ignores file capabilities, so
# deploy/daemonset.yaml runs as uid 0 with NET_ADMIN as its only capability instead.
RUN setcap cap_net_admin+ep /usr/local/bin/carousel \
    && setcap cap_net_admin+ep /usr/sbin/nft \
    && apt-get purge -y libcap2-bin && apt-get autoremove -y
USER 65532:65532
EXPOSE 10249 10256
ENTRYPOINT ["/usr/local/bin/carousel"]
CMD ["run"]
