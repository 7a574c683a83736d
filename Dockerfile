# Builds warren-relay, warren-agent and warrenctl into one small image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins \
 && install -m 0755 target/release/warren-relay target/release/warren-agent target/release/warrenctl /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates mosquitto-clients \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/warren-* /usr/local/bin/warrenctl /usr/local/bin/
COPY config/ /etc/warren/
# Named volumes start as copies of these, owned by the unprivileged user.
RUN mkdir -p /data /agent && chown nobody:nogroup /data /agent
ENV RUST_LOG=info
USER nobody
