#!/usr/bin/env bash
# Validates and compiles every example configuration with the given meshroute binary.
set -euo pipefail
bin=${1:?usage: check-examples.sh MESHROUTE_BINARY}
fail=0
total=0
run() {
  total=$((total + 1))
  if ! out=$("$bin" "$@" 2>&1 >/dev/null); then
    echo "FAILED: meshroute $*"; echo "$out"; fail=$((fail + 1))
  fi
}
reg=examples/bookinfo/registry.yaml
drs=examples/bookinfo/destination-rules.yaml
for f in reviews-jason ratings-timeout reviews-circuit-breaker; do
  run compile -f "$reg" -f "$drs" -f "examples/bookinfo/$f.yaml"
done
# Alternatives to the VirtualServices above, one at a time.
for f in reviews-75-25 reviews-cookie-v2 ratings-retries ratings-fault-delay; do
  run compile -f "$reg" -f "$drs" -f "examples/bookinfo-variants/$f.yaml"
done
# The whole directory is one consistent configuration.
run validate -f examples/bookinfo
run compile -f examples/bookinfo --for gateway --labels istio=ingressgateway
run compile -f "$reg" -f "$drs" -f examples/bookinfo/gateway.yaml --for gateway
run compile -f "$reg" -f examples/bookinfo/sidecar.yaml --namespace bookinfo
run compile -f "$reg" -f examples/external/ext-host-gateway.yaml --for gateway --labels app=my-gateway-controller
run compile -f examples/external/ext-svc.yaml
run compile -f examples/external/foo-ext.yaml
for f in case3-uri-prefix case4-weights case5-subsets; do
  run compile -f examples/hello/registry.yaml -f "examples/hello/$f.yaml"
done
run compile -f examples/tcp/registry.yaml -f examples/tcp/gateway.yaml --for gateway
run compile -f examples/tcp/egress-tls-origination.yaml
echo "$((total - fail)) passed, $fail failed"
[ "$fail" -eq 0 ]
