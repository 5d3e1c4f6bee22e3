#!/bin/sh
# Runs every fuzz target for SECONDS each: first the regression inputs of fuzz/regressions
# (each once), then libFuzzer on the target's corpus under .build/fuzz, seeded from the
# examples, the conformance scenarios, compiled rules documents, real ClientHellos and HTTP/1
# requests. http1_front sends its inputs to a `meshroute run` gateway started here (with a
# `meshroute hello` upstream, loopback only), which must still hold no more open files than
# it started with once the run is over.
# A crash leaves its input in .build/fuzz/artifacts/TARGET/ and fails the run.
# usage: fuzz.sh BIN_DIR SECONDS MESHROUTE (MESHROUTE_WASM: the filter module; FUZZ_TARGETS:
# the targets to run, all by default; differential and abi_fuzz are make fuzz's own)
set -eu
bin=$1; seconds=$2; meshroute=$3
work=.build/fuzz
progress() { echo "fuzz: $*" >&2; }

seed_dir() { d="$work/seeds/$1"; rm -rf "$d"; mkdir -p "$d"; echo "$d"; }

compile_seeds=$(seed_dir compile)
for f in examples/*/*.yaml tests/conformance/*.yaml; do
  cp "$f" "$compile_seeds/$(echo "$f" | tr / _)"
done

rules_seeds=$(seed_dir rules)
# name, proxy kind, the files compiled (hello's cases are alternatives: one at a time)
while read -r name kind files; do
  # shellcheck disable=SC2086 # the file list is split on purpose
  "$meshroute" compile $(printf -- '-f %s ' $files) --for "$kind" -o "$rules_seeds/$name.json" \
    2>"$work/seed.err" || { progress "no rules seed $name:"; cat "$work/seed.err" >&2; exit 1; }
done <<SEEDS
hello-sidecar sidecar examples/hello/registry.yaml examples/hello/case5-subsets.yaml
hello-gateway gateway examples/hello/registry.yaml examples/hello/demo-gateway.yaml
bookinfo-sidecar sidecar examples/bookinfo
bookinfo-gateway gateway examples/bookinfo
tcp-gateway gateway examples/tcp
external-sidecar sidecar examples/external
SEEDS

hello_seeds=$(seed_dir client_hello)
python3 - "$hello_seeds" <<'PY'
import os, ssl, sys
# ClientHellos as Python's TLS stack writes them, with and without a server name.
for i, name in enumerate(["db.example.com", "Nginx.Example.COM", None]):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    out, inc = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    open(os.path.join(sys.argv[1], f"hello-{i}"), "wb").write(out.read())
PY

front_seeds=$(seed_dir http1_front)
python3 - "$front_seeds" <<'PY'
import os, sys
requests = {
    "get": b"GET /v1 HTTP/1.1\r\nhost: fuzz.example\r\n\r\n",
    "pipelined": b"GET /v1 HTTP/1.1\r\nhost: a\r\n\r\nGET /v2 HTTP/1.1\r\nhost: a\r\n\r\nHEAD / HTTP/1.1\r\nhost: a\r\n\r\n",
    "chunked": b"POST /v1 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-trailer: t\r\n\r\n",
    "content-length": b"PUT /v2 HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhello",
    "http10": b"GET /v1 HTTP/1.0\r\n\r\n",
    "absolute-form": b"GET http://fuzz.example:80/v1?q=1 HTTP/1.1\r\nhost: other\r\n\r\n",
    "connect": b"CONNECT fuzz.example:443 HTTP/1.1\r\nhost: fuzz.example:443\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    "h2c": b"GET / HTTP/1.1\r\nhost: a\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n",
    "control-headers": b"GET /v1 HTTP/1.1\r\nhost: a\r\nx-envoy-retry-on: 5xx\r\nx-meshroute-cluster: x\r\nx-forwarded-for: 1.2.3.4\r\n\r\n",
    "duplicate-length": b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
}
for name, data in requests.items():
    open(os.path.join(sys.argv[1], name), "wb").write(data)
PY

# The gateway http1_front talks to: every request routed to a hello upstream.
ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')
set -- $ports; upstream_port=$1; front_port=$2; admin_port=$3
cat >"$work/front.yaml" <<YAML
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fuzz, namespace: default}
spec:
  hosts: [fuzz.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: $upstream_port}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: fuzz, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: fuzz, namespace: default}
spec:
  hosts: ["*"]
  gateways: [fuzz]
  http:
  - route: [{destination: {host: fuzz.example}}]
YAML
pids=""
stop() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap stop EXIT
"$meshroute" hello --listen "127.0.0.1:$upstream_port" --name fuzz \
  >"$work/hello.log" 2>&1 </dev/null &
pids="$pids $!"
"$meshroute" run -f "$work/front.yaml" --for gateway --port-offset $((front_port - 80)) \
  --admin "127.0.0.1:$admin_port" --access-log off >"$work/front.log" 2>&1 </dev/null &
front_pid=$!; pids="$pids $front_pid"
ready=""
for _ in $(seq 1 600); do
  if python3 -c 'import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)' \
      "http://127.0.0.1:$admin_port/ready" 2>/dev/null; then ready=1; break; fi
  kill -0 "$front_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ready" ] || { progress "the gateway for http1_front did not start:"; cat "$work/front.log" >&2; exit 1; }
open_files() { ls "/proc/$front_pid/fd" | wc -l; }
front_files=$(open_files)
export MESHROUTE_FUZZ_FRONT="127.0.0.1:$front_port"

status=0
for target in ${FUZZ_TARGETS:-compile rules client_hello http1_front}; do
  # The generated-input tests (make fuzz runs them after this script) are not libFuzzer's.
  case $target in differential|abi_fuzz) continue ;; esac
  corpus="$work/corpus/$target"; artifacts="$work/artifacts/$target/"
  mkdir -p "$corpus" "$artifacts"
  regressions="fuzz/regressions/$target"
  if [ -d "$regressions" ] && [ -n "$(ls -A "$regressions")" ]; then
    progress "$target: regression inputs"
    "$bin/$target" -runs=1 "$regressions"/* >"$work/$target-regressions.log" 2>&1 \
      || { progress "$target: a regression input fails (see $work/$target-regressions.log)"; status=1; }
  fi
  progress "$target: ${seconds}s"
  if "$bin/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" "$work/seeds/$target" \
      >"$work/$target.log" 2>&1; then
    progress "$target: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$target.log" | grep -o '[0-9]*$') runs, no crash"
  else
    progress "$target: FAILED, input in $artifacts:"
    tail -n 30 "$work/$target.log" >&2
    status=1
  fi
done

# Everything http1_front opened is closed again (connections, upstream sockets, timers).
after=$(open_files)
for _ in $(seq 1 50); do [ "$after" -le $((front_files + 4)) ] && break; sleep 0.2; after=$(open_files); done
if [ "$after" -gt $((front_files + 4)) ]; then
  progress "http1_front: the gateway holds $after open files, $front_files before the run"; status=1
else
  progress "http1_front: the gateway holds $after open files ($front_files before), answers /ready"
fi
kill -0 "$front_pid" 2>/dev/null || { progress "the gateway exited:"; tail -n 30 "$work/front.log" >&2; status=1; }
exit $status
