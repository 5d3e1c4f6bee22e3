#!/bin/sh
# Side-by-side proxy benchmark: the same upstream reached directly, through nginx (a plain
# reverse proxy, one worker, upstream keepalive), through plain Envoy, through Envoy with the
# filter, and through `meshroute run` with the filter (access log off, and on to a file);
# then the same
# HTTP/1.1 traffic carried as opaque TCP (a Gateway TCP server and a `tcp` route: the filter
# decides each connection and sees every chunk) through plain Envoy's tcp_proxy, Envoy's
# tcp_proxy behind the filter, and `meshroute run`. Each proxy runs
# with one worker pinned to core 0; wrk, oha and the upstream share core 1. Every target gets
# REPS runs of DURATION seconds at a fixed number of connections (medians reported), then one
# run at a fixed 1000 requests/s for the added latency per hop. Progress goes to stderr; the
# results are kept as JSON and an SVG chart in OUT (default .build/bench).
# usage: bench.sh MESHROUTE(release) WASM ENVOY OHA [DURATION_S] [CONNECTIONS] [REPS] [OUT]
set -eu
mr=$1; wasm=$2; envoy=$3; oha=$4; dur=${5:-10}; conns=${6:-16}; reps=${7:-3}
out=${8:-.build/bench}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
progress() { echo "bench: $*" >&2; }
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT INT TERM
for tool in wrk:wrk nginx:nginx-light; do
  command -v "${tool%%:*}" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${tool#*:}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${tool#*:}" >/dev/null 2>&1; }
done

up=18901; plain=18902; filtered=18903; harness=18904; nginx_port=18907; logged=18908
tcp_plain=18905; tcp_filtered=18906; tcp_harness=$((harness - 80 + 31400))
setsid taskset -c 1 "$mr" hello --listen 127.0.0.1:$up --name v1 </dev/null >"$work/upstream.log" 2>&1 &
pids="$pids $!"

cat >"$work/bench.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {selector: {app: hello}, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: hello-1, namespace: default}
spec: {address: 127.0.0.1, ports: {http: $up}, labels: {app: hello}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bench, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}
  - {port: {number: 31400, name: tcp, protocol: TCP}, hosts: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello, namespace: default}
spec:
  hosts: ["*"]
  gateways: [istio-system/bench]
  http:
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: hello.default.svc.cluster.local}}]
  tcp:
  - route: [{destination: {host: hello.default.svc.cluster.local, port: {number: 8080}}}]
EOF

cat >"$work/plain.yaml" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 18992}}}
static_resources:
  listeners:
  - name: plain
    address: {socket_address: {address: 127.0.0.1, port_value: $plain}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: hello}}]}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: plain_tcp
    address: {socket_address: {address: 127.0.0.1, port_value: $tcp_plain}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: plain_tcp
          cluster: hello
  clusters:
  - name: hello
    type: STATIC
    load_assignment:
      cluster_name: hello
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $up}}}}]}]
EOF

"$mr" envoy-config -f "$work/bench.yaml" --for gateway --namespace istio-system --wasm "$wasm" \
  --listen 80=127.0.0.1:$filtered --listen 31400=127.0.0.1:$tcp_filtered --admin 127.0.0.1:18993 -o "$work/filtered.json" 2>/dev/null
# Same footing as plain Envoy: no access log (the harness runs with --access-log off too).
python3 - "$work/filtered.json" <<'EOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
for listener in config["static_resources"]["listeners"]:
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            f["typed_config"].pop("access_log", None)
json.dump(config, open(path, "w"))
EOF

cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  upstream hello { server 127.0.0.1:$up; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

start() { # name, command...
  name=$1; shift
  setsid taskset -c 0 "$@" </dev/null >"$work/$name.log" 2>&1 &
  pids="$pids $!"
  eval "pid_$name=$!"
}
start plain "$envoy" -c "$work/plain.yaml" --concurrency 1 --disable-hot-restart --log-level warn
start filtered "$envoy" -c "$work/filtered.json" --concurrency 1 --disable-hot-restart --log-level warn
MESHROUTE_WASM=$wasm start harness "$mr" run -f "$work/bench.yaml" --for gateway --namespace istio-system \
  --workers 1 --port-offset $((harness - 80)) --admin 127.0.0.1:18994 --access-log off --wasm "$wasm"
# The default users run: the access log on, to a file.
MESHROUTE_WASM=$wasm start logged "$mr" run -f "$work/bench.yaml" --for gateway --namespace istio-system \
  --workers 1 --port-offset $((logged - 80)) --admin 127.0.0.1:18995 --access-log "$work/access.log" --wasm "$wasm"
start nginx nginx -c "$work/nginx.conf" -g "daemon off;"
progress "waiting for the proxies"
for port in $up $plain $filtered $harness $logged $nginx_port $tcp_plain $tcp_filtered $tcp_harness; do
  for i in $(seq 1 600); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
  done
  curl -fs -o /dev/null "http://127.0.0.1:$port/" || { tail -n 20 "$work"/*.log; exit 1; }
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
: >"$work/results.tsv"
# nginx serves from its worker process; measure that one, not the master.
pid_nginx=$(pgrep -P "$pid_nginx" | head -n 1)
targets="direct:$up:0 nginx:$nginx_port:$pid_nginx plain:$plain:$pid_plain filtered:$filtered:$pid_filtered \
  harness:$harness:$pid_harness logged:$logged:$pid_logged \
  tcp_plain:$tcp_plain:$pid_plain tcp_filtered:$tcp_filtered:$pid_filtered tcp_harness:$tcp_harness:$pid_harness"
total=$(( $(echo $targets | wc -w) * reps )); step=0
for rep in $(seq 1 "$reps"); do
  for target in $targets; do
    name=${target%%:*}; rest=${target#*:}; port=${rest%%:*}; pid=${rest#*:}
    step=$((step + 1)); progress "[$step/$total] $name, run $rep of $reps (${dur}s)"
    taskset -c 1 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null  # warm-up
    before=0; [ "$pid" = 0 ] || before=$(ticks "$pid")
    taskset -c 1 wrk -t1 -c"$conns" -d"${dur}s" --latency "http://127.0.0.1:$port/" >"$work/wrk.txt"
    after=0; [ "$pid" = 0 ] || after=$(ticks "$pid")
    rss=0; [ "$pid" = 0 ] || rss=$(rss_kib "$pid")
    python3 - "$work/wrk.txt" "$name" "$rep" $((after - before)) "$rss" >>"$work/results.tsv" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
# wrk --latency prints its percentiles on lines of their own ("    50%    1.23ms"); anchor
# on those, not on a percentage inside another line (the "+/- Stdev" column).
def percentile(p):
    m = re.search(rf"^\s+{p}%\s+(\S+)\s*$", text, re.M)
    if m is None:
        sys.exit(f"{sys.argv[2]}: no {p}% line in wrk output:\n{text}")
    return m.group(1)
if "Requests/sec" not in text:
    sys.exit(f"{sys.argv[2]}: unexpected wrk output:\n{text}")
def ms(s):
    m = re.match(r"([\d.]+)(\w+)", s)
    if m is None:
        sys.exit(f"{sys.argv[2]}: cannot read latency {s!r} in:\n{text}")
    v, unit = m.groups()
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
requests = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(percentile(50))
p99 = ms(percentile(99))
ticks = int(sys.argv[4])
cpu_us = ticks * 1e6 / 100 / requests if ticks else 0.0  # USER_HZ = 100
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{cpu_us:.1f}\t{sys.argv[5]}")
EOF
  done
done

progress "fixed-rate runs (oha -q 1000)"
: >"$work/fixed.tsv"
for target in direct:$up nginx:$nginx_port plain:$plain filtered:$filtered harness:$harness logged:$logged; do
  name=${target%%:*}; port=${target#*:}
  progress "fixed rate: $name (${dur}s)"
  taskset -c 1 "$oha" -z "${dur}s" -q 1000 -c "$conns" --no-tui --output-format json \
    "http://127.0.0.1:$port/" >"$work/oha.json" 2>/dev/null
  python3 - "$work/oha.json" "$name" >>"$work/fixed.tsv" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))["latencyPercentiles"]
print(f"{sys.argv[2]}\t{p['p50'] * 1000:.3f}\t{p['p90'] * 1000:.3f}\t{p['p99'] * 1000:.3f}")
EOF
done
python3 "$here/bench-report.py" "$work/results.tsv" "$work/fixed.tsv" "$out" \
  "wrk -t1 -c$conns -d${dur}s, $reps runs each, medians (proxy pinned to core 0)"
