#!/bin/sh
# Throughput and latency of the same filter and rules on Envoy and on `meshroute run`,
# side by side: the demo gateway (hello v1/v2 upstreams in-process) and Envoy generated from
# the same files, one worker each, driven by wrk over loopback.
# usage: bench.sh MESHROUTE(release) WASM ENVOY [DURATION_S] [CONNECTIONS]
set -eu
mr=$1; wasm=$2; envoy=$3; dur=${4:-10}; conns=${5:-16}
work=$(mktemp -d)
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT INT TERM
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1; }

files="-f examples/hello/registry.yaml -f examples/hello/case5-subsets.yaml -f examples/hello/demo-gateway.yaml"
# shellcheck disable=SC2086
MESHROUTE_WASM=$wasm setsid "$mr" demo --workers 1 --port-offset 18000 --admin 127.0.0.1:18990 --access-log off \
  </dev/null >"$work/harness.log" 2>&1 &
pids="$pids $!"
# shellcheck disable=SC2086
"$mr" envoy-config $files --for gateway --namespace istio-system --wasm "$wasm" \
  --listen 80=127.0.0.1:18180 --admin 127.0.0.1:18991 -o "$work/envoy.yaml" 2>/dev/null
# Envoy's access log goes to stdout; send it nowhere, as the harness's is off.
setsid "$envoy" -c "$work/envoy.yaml" --concurrency 1 --disable-hot-restart --log-level warn \
  </dev/null >/dev/null 2>"$work/envoy.log" &
pids="$pids $!"
for i in $(seq 1 600); do
  if curl -fs -o /dev/null http://127.0.0.1:18080/v1 && curl -fs -o /dev/null http://127.0.0.1:18180/v1; then break; fi
  sleep 0.1
done
curl -fs http://127.0.0.1:18080/v1 >/dev/null || { cat "$work/harness.log"; exit 1; }
curl -fs http://127.0.0.1:18180/v1 >/dev/null || { cat "$work/envoy.log"; exit 1; }
for target in "meshroute-run 18080" "envoy 18180"; do
  set -- $target
  wrk -t1 -c1 -d2s "http://127.0.0.1:$2/v1" >/dev/null  # warm-up
  echo "== $1 (wrk -t1 -c$conns -d${dur}s --latency http://127.0.0.1:$2/v1)"
  wrk -t1 -c"$conns" -d"${dur}s" --latency "http://127.0.0.1:$2/v1" | grep -E "Requests/sec|Latency  |50%|99%|Non-2xx|errors"
done
