//! The benchmark cannot rot: its seconds-long smoke mode runs the real relay and agent
//! and must report every table (numbers are not judged here; see BENCHMARKS.md).

use std::time::Duration;

use warren_tests::*;

#[test]
fn the_bench_smoke_mode_measures_every_path_and_reports_each_table() {
    let (ok, out, err) = run_cmd(
        bin("warren-bench").to_str().unwrap(),
        &["--smoke"],
        Duration::from_secs(180),
    );
    assert!(ok, "warren-bench --smoke failed:\n{out}\n{err}");
    for heading in [
        "## Throughput",
        "## Latency",
        "## Tunnel open",
        "## Relay memory",
        "## Steadiness",
    ] {
        assert!(out.contains(heading), "no {heading:?} in:\n{out}");
    }
    let row = out
        .lines()
        .find(|l| l.starts_with("| warren (TLS) |") && l.contains("MB/s"))
        .unwrap_or_else(|| panic!("no TLS throughput row:\n{out}"));
    let mbps: f64 = row
        .split('|')
        .nth(2)
        .and_then(|c| c.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {row}"));
    assert!(mbps > 0.0, "{row}");
}
