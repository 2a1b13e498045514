//! Against a correct server the load generator must pass: exit 0, zero
//! errors, replies > 0, even when every reply comes one byte per segment.

mod common;

use common::{Behaviour, ServerSpec, describe, errors, json, load, start};

/// Runs `mode_args` against a correct server that writes replies one byte
/// at a time, and checks the run is clean.
fn passes(raw: bool, one_byte: bool, mode_args: &[&str]) -> serde_json::Value {
    let addr = start(ServerSpec {
        behaviour: Behaviour::Correct,
        raw,
        one_byte,
    });
    let proto = if raw { "raw" } else { "prefix" };
    let mut args = vec![
        "--conns", "4", "--secs", "0.5", "--warmup", "0.1", "--json", "--proto", proto,
    ];
    args.extend_from_slice(mode_args);
    let out = load(addr, &args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    assert_eq!(errors(&v, "total"), 0, "{}", describe(&out));
    assert_eq!(v["ok"], true);
    assert!(v["replies"].as_u64().unwrap() > 0, "{}", describe(&out));
    assert!(v["latency_us"]["samples"].as_u64().unwrap() > 0);
    assert_eq!(v["connects"]["established"], 4);
    v
}

#[test]
fn pingpong_prefix_one_byte_segments() {
    let v = passes(false, true, &["--mode", "pingpong"]);
    assert_eq!(v["mode"], "pingpong");
}

#[test]
fn pingpong_raw_one_byte_segments() {
    passes(true, true, &["--mode", "pingpong"]);
}

#[test]
fn pipeline_prefix_one_byte_segments() {
    let v = passes(false, true, &["--mode", "pipeline", "--depth", "8"]);
    assert_eq!(v["depth"], 8);
}

#[test]
fn pipeline_raw_one_byte_segments() {
    passes(true, true, &["--mode", "pipeline", "--depth", "8"]);
}

#[test]
fn pipeline_prefix_whole_writes_long_lines() {
    passes(
        false,
        false,
        &["--mode", "pipeline", "--depth", "32", "--line-len", "300"],
    );
}

#[test]
fn crlf_lines_are_chomped_in_prefix_and_kept_in_raw() {
    passes(false, true, &["--mode", "pipeline", "--crlf"]);
    passes(true, false, &["--mode", "pingpong", "--crlf"]);
}

#[test]
fn two_threads_and_spread_source_addresses() {
    let v = passes(
        false,
        false,
        &["--mode", "pipeline", "--threads", "2", "--spread"],
    );
    assert_eq!(v["threads"], 2);
    assert_eq!(v["sources"], 2);
}

#[test]
fn table_output_without_json() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(addr, &["--conns", "2", "--secs", "0.2", "--warmup", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("replies/s"), "{stdout}");
    assert!(stdout.contains("errors              none"), "{stdout}");
}
