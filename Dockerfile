# syntax=docker/dockerfile:1
# docker build -t carousel .   (or podman build): a release binary on debian-slim.
# The cache mounts keep the crate registry and cargo's target directory between builds
# of this machine, so a source change rebuilds only carousel itself.
FROM rust:1-slim-bookworm AS build
# make(1) builds jemalloc, carousel's allocator (tikv-jemalloc-sys).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Line tables are for profiling on a developer's machine; the image keeps symbols only.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin carousel \
    && cp target/release/carousel /usr/local/bin/carousel

FROM debian:bookworm-slim
# nft(8) and ip(8) are what --proxy-mode nftables drives (its table, its policy route);
# the rest of carousel needs only libc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iproute2 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/carousel /usr/local/bin/carousel
# No file capabilities: a binary whose file capabilities a container cannot grant is not
# executed at all, and carousel demo, bench, status and bind mode need none. nftables
# mode needs root with CAP_NET_ADMIN, which the DaemonSet (and docker run --user 0
# --cap-add NET_ADMIN) gives.
USER 65532:65532
EXPOSE 10249 10256
ENTRYPOINT ["/usr/local/bin/carousel"]
CMD ["run"]
