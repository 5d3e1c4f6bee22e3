//! `make bench`'s report: from the measurements of a run, the tables, the ratios against the
//! performance goals, and the results kept as JSON and an SVG chart.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::fmt::Write as _;

#[test]
fn the_bench_report_keeps_medians_goals_and_a_chart() {
    let root = meshroute_tests::repo_root();
    let dir = std::env::temp_dir().join(format!("meshroute-bench-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // name, run, requests/s, p50 ms, p99 ms, proxy CPU µs/request, RSS KiB: three runs each,
    // the median in the middle, the slowest first.
    let targets = [
        ("direct", 60_000.0, 0.0),
        ("nginx", 50_000.0, 20.0),
        ("plain", 10_000.0, 100.0),
        ("filtered", 6_000.0, 160.0),
        ("harness", 30_000.0, 30.0),
        ("logged", 27_000.0, 35.0),
    ];
    let mut results = String::new();
    for (name, rps, cpu) in targets {
        for (run, factor) in [(1, 0.5), (2, 1.0), (3, 1.1)] {
            let _ = writeln!(
                results,
                "{name}\t{run}\t{}\t0.300\t1.200\t{}\t20480",
                rps * factor,
                cpu / factor
            );
        }
    }
    let fixed =
        "direct\t0.100\t0.150\t0.300\nplain\t0.500\t0.700\t1.000\nharness\t0.300\t0.400\t0.600\n";
    std::fs::write(dir.join("results.tsv"), results).unwrap();
    std::fs::write(dir.join("fixed.tsv"), fixed).unwrap();
    let out = std::process::Command::new("python3")
        .arg(root.join("scripts/bench-report.py"))
        .args([
            dir.join("results.tsv"),
            dir.join("fixed.tsv"),
            dir.join("out"),
        ])
        .arg("a test run")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/latest.json")).unwrap())
            .unwrap();
    let stamped = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("bench-") && n.ends_with(".json"))
        .count();
    assert_eq!(stamped, 1, "one stamped copy besides latest.json");
    let closed = &report["closed_loop"];
    assert_eq!(closed["harness"]["requests_per_s"], 30_000.0);
    assert_eq!(closed["harness"]["cpu_us_per_request"], 30.0);
    assert_eq!(closed["harness"]["runs"], 3);
    assert_eq!(closed["harness"]["rss_mib"], 20.0);
    assert_eq!(report["fixed_rate"]["plain"]["p99_ms"], 1.0);
    let goal = |what: &str| {
        report["goals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["what"].as_str().unwrap().starts_with(what))
            .unwrap_or_else(|| panic!("{what} in {report}"))
            .clone()
    };
    // 27,000 / 50,000 = 0.54 ≥ 0.5; 30,000 / 6,000 = 5 ≥ 3; 160 / 100 = 1.6 > 1.35;
    // added p50 (0.3 - 0.1) / (0.5 - 0.1) = 0.5 ≤ 0.6.
    for (what, measured, met) in [
        (
            "meshroute run (access log on) / nginx requests/s",
            0.54,
            true,
        ),
        ("meshroute run / Envoy + filter requests/s", 5.0, true),
        ("Envoy + filter / plain Envoy CPU per request", 1.6, false),
        ("meshroute run / plain Envoy added p50", 0.5, true),
    ] {
        let g = goal(what);
        assert_eq!(g["measured"], measured, "{g}");
        assert_eq!(g["met"], met, "{g}");
    }
    assert!(
        printed.contains("| Envoy + filter / plain Envoy CPU per request | 1.6 | 1.35 | no |"),
        "{printed}"
    );

    // The chart: a bar per target, the longest for the most requests/s.
    let svg = std::fs::read_to_string(dir.join("out/latest.svg")).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    let widths: Vec<u32> = svg
        .lines()
        .filter(|l| l.starts_with("<rect "))
        .map(|l| {
            l.split("width=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(widths.len(), targets.len(), "{svg}");
    assert_eq!(
        widths.iter().max(),
        widths.first(),
        "direct is the fastest: {svg}"
    );
    assert!(
        svg.contains("meshroute run + filter, access log to a file"),
        "{svg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
