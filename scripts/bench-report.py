#!/usr/bin/env python3
"""The report of one `make bench` run: the tables printed, the ratios against the targets,
and the results kept as JSON and an SVG chart.

usage: bench-report.py RESULTS.tsv FIXED.tsv OUT_DIR DESCRIPTION
RESULTS.tsv: name, run, requests/s, p50 ms, p99 ms, proxy CPU us/request, RSS KiB.
FIXED.tsv: name, p50, p90, p99 (ms) at a fixed 1000 requests/s.
"""
import datetime
import json
import os
import statistics
import sys

NAMES = {
    "direct": "direct to upstream",
    "nginx": "nginx reverse proxy",
    "plain": "Envoy, plain route",
    "filtered": "Envoy + meshroute filter",
    "harness": "meshroute run + filter, access log off",
    "logged": "meshroute run + filter, access log to a file",
    "tcp_plain": "TCP: Envoy tcp_proxy, plain",
    "tcp_filtered": "TCP: Envoy tcp_proxy + filter",
    "tcp_harness": "TCP: meshroute run + filter",
}


def medians(path):
    rows = [line.split("\t") for line in open(path).read().split("\n") if line]
    out = {}
    for key in NAMES:
        r = [x for x in rows if x[0] == key]
        if not r:
            continue
        med = lambda i: statistics.median(float(x[i]) for x in r)
        out[key] = {
            "requests_per_s": med(2),
            "p50_ms": med(3),
            "p99_ms": med(4),
            "cpu_us_per_request": med(5),
            "rss_mib": max(float(x[6]) for x in r) / 1024,
            "runs": len(r),
        }
    return out


def fixed_rate(path):
    out = {}
    for line in open(path).read().split("\n"):
        if line:
            name, p50, p90, p99 = line.split("\t")
            out[name] = {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}
    return out


def ratios(m, fixed):
    """Each target of the performance goals: (what, measured, goal, met)."""
    r = []

    def add(what, value, goal, higher_is_better=True):
        if value is None:
            return
        met = value >= goal if higher_is_better else value <= goal
        r.append({"what": what, "measured": round(value, 2), "goal": goal, "met": met})

    def have(*keys):
        return all(k in m for k in keys)

    def ratio(a, b):
        return a / b if b else None

    if have("logged", "nginx"):
        add("meshroute run (access log on) / nginx requests/s", ratio(m["logged"]["requests_per_s"], m["nginx"]["requests_per_s"]), 0.5)
        add("meshroute run (access log on) / nginx CPU per request", ratio(m["logged"]["cpu_us_per_request"], m["nginx"]["cpu_us_per_request"]), 2.0, False)
    if have("harness", "filtered", "plain"):
        add("meshroute run / Envoy + filter requests/s", ratio(m["harness"]["requests_per_s"], m["filtered"]["requests_per_s"]), 3.0)
        add("meshroute run / plain Envoy requests/s", ratio(m["harness"]["requests_per_s"], m["plain"]["requests_per_s"]), 2.0)
    if have("filtered", "plain"):
        add("Envoy + filter / plain Envoy CPU per request", ratio(m["filtered"]["cpu_us_per_request"], m["plain"]["cpu_us_per_request"]), 1.35, False)
    if all(k in fixed for k in ("direct", "plain", "harness")):
        added = lambda k: fixed[k]["p50_ms"] - fixed["direct"]["p50_ms"]
        if added("plain") > 0:
            add("meshroute run / plain Envoy added p50 at 1000 requests/s", added("harness") / added("plain"), 0.6, False)
    if "harness" in m:
        add("meshroute run RSS MiB", m["harness"]["rss_mib"], 32, False)
    return r


def svg(m, description):
    """A horizontal bar chart of requests/s, one bar per target."""
    keys = [k for k in NAMES if k in m]
    top = max(m[k]["requests_per_s"] for k in keys) or 1
    bar_h, gap, left, width = 22, 8, 330, 420
    height = 50 + len(keys) * (bar_h + gap)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" font-family="sans-serif" font-size="13">',
        f'<text x="10" y="20" font-weight="bold">requests/s per core ({description})</text>',
    ]
    for i, k in enumerate(keys):
        y = 36 + i * (bar_h + gap)
        v = m[k]["requests_per_s"]
        w = max(1, int(width * v / top))
        colour = "#3b7dd8" if k in ("harness", "logged", "tcp_harness") else "#9aa5b1"
        out.append(f'<text x="10" y="{y + 16}">{NAMES[k]}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w}" height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{left + w + 6}" y="{y + 16}">{v:,.0f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    results, fixed_path, out_dir, description = sys.argv[1:5]
    m = medians(results)
    fixed = fixed_rate(fixed_path)
    print(f"== closed loop: {description}")
    print("| target | requests/s | p50 ms | p99 ms | proxy CPU µs/request | proxy RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in m.items():
        cpu = "—" if k == "direct" else f"{v['cpu_us_per_request']:.1f}"
        rss = "—" if k == "direct" else f"{v['rss_mib']:.1f}"
        print(f"| {NAMES[k]} | {v['requests_per_s']:,.0f} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {cpu} | {rss} |")
    print()
    print("== fixed rate: 1000 requests/s (latency, ms)")
    print("| target | p50 | p90 | p99 |")
    print("|---|---:|---:|---:|")
    for k, v in fixed.items():
        print(f"| {NAMES.get(k, k)} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} | {v['p99_ms']:.3f} |")
    print()
    print("== against the goals")
    print("| ratio | measured | goal | met |")
    print("|---|---:|---:|---|")
    goals = ratios(m, fixed)
    for g in goals:
        print(f"| {g['what']} | {g['measured']} | {g['goal']} | {'yes' if g['met'] else 'no'} |")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {"when": stamp, "description": description, "closed_loop": m, "fixed_rate": fixed, "goals": goals}
    os.makedirs(out_dir, exist_ok=True)
    for name in (f"bench-{stamp}.json", "latest.json"):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "latest.svg"), "w") as f:
        f.write(svg(m, description))
    print(f"\nresults: {out_dir}/bench-{stamp}.json, chart: {out_dir}/latest.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
