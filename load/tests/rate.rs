//! `--mode rate`: open-loop load measured from each line's due time. A
//! server that stalls for a second must show it in the percentiles (not
//! only in the max, as a closed-loop run does), a run where the tool itself
//! sends late is invalid (exit 3), `--hgrm` writes a plottable file, and
//! `--slo` finds a lower rate for a slower server.

mod common;

use common::{Behaviour, SLOW_PER_LINE, STALL, ServerSpec, describe, errors, json, load, start};
use serde_json::Value;

/// A lateness bound that a test machine busy with other tests still keeps
/// (the default, 5 ms at p99, is for a machine given to the measurement).
const LENIENT: &str = "200ms";

/// A latency figure in milliseconds from a `latency_us`-shaped object.
fn ms(l: &Value, key: &str) -> f64 {
    l[key].as_f64().unwrap_or_else(|| panic!("no {key} in {l}")) / 1000.0
}

#[test]
fn correct_server_gets_the_rate_asked() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(
        addr,
        &[
            "--mode",
            "rate",
            "--rate",
            "500",
            "--conns",
            "5",
            "--secs",
            "1",
            "--warmup",
            "0.2",
            "--json",
            "--max-lateness",
            LENIENT,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    assert_eq!(errors(&v, "total"), 0);
    let sent = v["rate"]["sent_per_sec"].as_f64().unwrap();
    assert!((490.0..=510.0).contains(&sent), "sent {sent}/s: {v}");
    assert_eq!(v["replies"], v["latency_us"]["samples"], "{v}");
    assert_eq!(v["rate"]["valid"], true);
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][key].is_number(), "{v}");
        assert!(v["latency_uncorrected_us"][key].is_number(), "{v}");
    }
    // Corrected latency includes the tool's lateness, so it is never lower.
    assert!(ms(&v["latency_us"], "max") >= ms(&v["latency_uncorrected_us"], "max") - 0.01);
}

#[test]
fn a_stall_shows_in_the_percentiles_of_a_rate_run() {
    let addr = start(ServerSpec::new(Behaviour::Stall));
    let out = load(
        addr,
        &[
            "--mode",
            "rate",
            "--rate",
            "400",
            "--conns",
            "4",
            "--secs",
            "2.5",
            "--warmup",
            "0",
            "--grace",
            "3",
            "--json",
            "--max-lateness",
            LENIENT,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    let l = &v["latency_us"];
    let stall_ms = STALL.as_secs_f64() * 1000.0;
    assert!(ms(l, "max") >= 0.9 * stall_ms, "max below the stall: {l}");
    // About 40% of the lines fell due in the stall, waiting 0..1 s each:
    // p90 is one of them.
    assert!(ms(l, "p90") >= 300.0, "p90 misses the stalled lines: {l}");
    assert_eq!(v["rate"]["valid"], true, "{v}");
}

#[test]
fn a_stall_hides_from_the_percentiles_of_a_closed_loop_run() {
    // The same server measured closed-loop: each connection waits out the
    // stall with one line, so only the max sees it (coordinated omission).
    let addr = start(ServerSpec::new(Behaviour::Stall));
    let out = load(
        addr,
        &[
            "--mode", "pingpong", "--conns", "4", "--secs", "2.5", "--warmup", "0", "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let l = &json(&out)["latency_us"];
    assert!(ms(l, "max") >= 0.9 * STALL.as_secs_f64() * 1000.0, "{l}");
    assert!(ms(l, "p90") < 50.0, "{l}");
}

#[test]
fn a_tool_that_sends_late_is_invalid() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(
        addr,
        &[
            "--mode",
            "rate",
            "--rate",
            "2000",
            "--conns",
            "2",
            "--secs",
            "0.5",
            "--warmup",
            "0",
            "--max-lateness",
            "1ns",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let v = json(&out);
    assert_eq!(v["rate"]["valid"], false, "{v}");
    assert_eq!(errors(&v, "total"), 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid run: the tool sent late"),
        "{stderr}"
    );
}

#[test]
fn hgrm_file_holds_the_distribution() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rate.hgrm");
    let path = file.to_str().unwrap();
    let out = load(
        addr,
        &[
            "--mode",
            "rate",
            "--rate",
            "300",
            "--conns",
            "3",
            "--secs",
            "0.5",
            "--warmup",
            "0",
            "--json",
            "--hgrm",
            path,
            "--max-lateness",
            LENIENT,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
    let last: Vec<f64> = text
        .lines()
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert_eq!(last[1], 1.0, "{text}");
    assert_eq!(
        last[2],
        v["latency_us"]["samples"].as_f64().unwrap(),
        "{text}"
    );
    let max_ms = ms(&v["latency_us"], "max");
    assert!(
        (last[0] - max_ms).abs() <= 0.01 * max_ms + 0.001,
        "{text}\n{v}"
    );
}

/// The best rate an SLO search from `from` lines/s finds against a server
/// with `behaviour`.
fn slo_best(behaviour: Behaviour, from: &str) -> f64 {
    let addr = start(ServerSpec::new(behaviour));
    let out = load(
        addr,
        &[
            "--mode",
            "rate",
            "--rate",
            from,
            "--slo",
            "p99=100ms",
            "--conns",
            "4",
            "--secs",
            "0.5",
            "--warmup",
            "0.2",
            "--grace",
            "1",
            "--json",
            "--max-lateness",
            LENIENT,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    let slo = &v["slo"];
    let steps = slo["steps"].as_array().unwrap();
    assert!((1..=8).contains(&steps.len()), "{slo}");
    let best = slo["best_rate"].as_f64().unwrap_or_else(|| panic!("{slo}"));
    // The report's figures are the best step's.
    assert_eq!(v["rate"]["asked_per_sec"].as_f64(), Some(best), "{v}");
    assert!(ms(&v["latency_us"], "p99") <= 100.0, "{v}");
    best
}

#[test]
fn slo_search_finds_a_lower_rate_for_a_slower_server() {
    let slow = slo_best(Behaviour::Slow, "250");
    let capacity = 1.0 / SLOW_PER_LINE.as_secs_f64();
    assert!(
        slow < 1.5 * capacity,
        "{slow} lines/s passed against a server of {capacity}/s"
    );
    // Started above the slow server's capacity, so a busy test machine
    // must fail several steps in a row to mislead it.
    let fast = slo_best(Behaviour::Correct, "2000");
    assert!(fast > slow, "fast server {fast}, slow server {slow}");
}
