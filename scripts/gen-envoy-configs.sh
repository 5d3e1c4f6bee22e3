#!/bin/sh
# Writes the generated files of envoy-configs/ into DIR (default: envoy-configs).
# usage: gen-envoy-configs.sh MESHROUTE [DIR]
set -eu
mr=$1
out=${2:-envoy-configs}
mkdir -p "$out"
# Envoy with the filter as a sidecar-style outbound proxy for the hello example (used by
# docker-compose.yml; the module is mounted at /etc/meshroute). Loopback only: an outbound
# proxy under ALLOW_ANY forwards anywhere. Admin on 19000, clear of meshroute run's 15000.
"$mr" envoy-config -f examples/hello/registry.yaml -f examples/hello/case5-subsets.yaml \
  --wasm /etc/meshroute/meshroute_filter.wasm \
  --listen 127.0.0.1:15001 --admin 127.0.0.1:19000 -o "$out/hello-sidecar.envoy.yaml"
# Istio: the Bookinfo reviews routing loaded into the productpage sidecar by EnvoyFilter.
"$mr" istio-manifest --kind envoy-filter \
  -f examples/bookinfo/registry.yaml -f examples/bookinfo/destination-rules.yaml \
  -f examples/bookinfo/reviews-jason.yaml \
  --for sidecar --namespace default --selector app=productpage \
  --module /var/local/lib/wasm/meshroute_filter.wasm -o "$out/bookinfo-sidecar.envoyfilter.yaml"
# Istio: the same rules delivered by WasmPlugin (istiod passes pluginConfig as JSON text).
"$mr" istio-manifest --kind wasm-plugin \
  -f examples/bookinfo/registry.yaml -f examples/bookinfo/destination-rules.yaml \
  -f examples/bookinfo/reviews-jason.yaml \
  --for sidecar --namespace default --selector app=productpage \
  --module file:///var/local/lib/wasm/meshroute_filter.wasm -o "$out/bookinfo-sidecar.wasmplugin.yaml"
# Istio ingress gateway: the Bookinfo gateway routes.
"$mr" istio-manifest --kind wasm-plugin \
  -f examples/bookinfo/registry.yaml -f examples/bookinfo/destination-rules.yaml \
  -f examples/bookinfo/gateway.yaml \
  --for gateway --namespace istio-system \
  --module file:///var/local/lib/wasm/meshroute_filter.wasm -o "$out/bookinfo-gateway.wasmplugin.yaml"
# Connection-level routes: TCP split and SNI passthrough on a gateway, as an Envoy bootstrap
# (TCP proxies behind the filter as network filter) and as WasmPlugins (one NETWORK plugin per
# TCP/TLS port).
"$mr" envoy-config -f examples/tcp/registry.yaml -f examples/tcp/gateway.yaml --for gateway \
  --wasm /etc/meshroute/meshroute_filter.wasm --admin 127.0.0.1:19000 \
  --listen 31400=127.0.0.1:31400 --listen 443=127.0.0.1:8443 -o "$out/tcp-gateway.envoy.yaml"
"$mr" istio-manifest --kind wasm-plugin \
  -f examples/tcp/registry.yaml -f examples/tcp/gateway.yaml \
  --for gateway --namespace istio-system \
  --module file:///var/local/lib/wasm/meshroute_filter.wasm -o "$out/tcp-gateway.wasmplugin.yaml"
