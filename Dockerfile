# `meshroute run` and the filter module in one image.
#   docker build -t meshroute .
#   docker run --rm --network host meshroute run -f /etc/meshroute/examples/hello \
#     --listen 127.0.0.1:15011 --admin 127.0.0.1:15010
FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-unknown-unknown
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p meshroute-harness \
 && cargo build --locked -p meshroute-filter --target wasm32-unknown-unknown --profile wasm-release

FROM debian:bookworm-slim
# ca-certificates: the trust store for TLS origination without caCertificates; curl: the
# healthcheck against the admin port.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshroute /usr/local/bin/meshroute
COPY --from=build /src/target/wasm32-unknown-unknown/wasm-release/meshroute_filter.wasm /usr/local/share/meshroute/meshroute_filter.wasm
COPY examples /etc/meshroute/examples
ENV MESHROUTE_WASM=/usr/local/share/meshroute/meshroute_filter.wasm
# Istio's proxy user: the capture rules (`meshroute iptables`) exempt UID 1337.
RUN useradd --uid 1337 --no-create-home --shell /usr/sbin/nologin istio-proxy
USER 1337
ENTRYPOINT ["meshroute"]
CMD ["--help"]
