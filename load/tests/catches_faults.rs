//! The load generator must catch every way a server can get replies wrong:
//! each misbehaving server below gets it to exit 1 and name the error kind.

mod common;

use common::{
    Behaviour, ServerSpec, closed_port, describe, errors, json, load, load_within, start,
};
use std::time::Duration;

/// Runs a short load against a server with `behaviour` and checks that the
/// run fails with at least one error of `kind`, named on stderr.
fn caught(behaviour: Behaviour, raw: bool, mode_args: &[&str], kind: &str) {
    let addr = start(ServerSpec {
        behaviour,
        raw,
        one_byte: false,
    });
    let proto = if raw { "raw" } else { "prefix" };
    let mut args = vec![
        "--conns", "2", "--secs", "0.3", "--warmup", "0", "--grace", "0.5", "--json", "--proto",
        proto,
    ];
    args.extend_from_slice(mode_args);
    let out = load(addr, &args);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let v = json(&out);
    assert!(errors(&v, kind) >= 1, "no {kind} error: {}", describe(&out));
    assert_eq!(v["ok"], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("[{kind}]")),
        "{kind} not named: {}",
        describe(&out)
    );
}

const PINGPONG: &[&str] = &["--mode", "pingpong"];
const PIPELINE: &[&str] = &["--mode", "pipeline", "--depth", "4"];

#[test]
fn dropped_reply_is_missing_in_pingpong() {
    caught(Behaviour::Drop, false, PINGPONG, "missing");
}

#[test]
fn dropped_reply_is_missing_in_pipeline() {
    caught(Behaviour::Drop, true, PIPELINE, "missing");
}

#[test]
fn swapped_replies_are_reordered() {
    caught(Behaviour::Reorder, false, PIPELINE, "reordered");
}

#[test]
fn repeated_reply_is_duplicated() {
    caught(Behaviour::Duplicate, false, PINGPONG, "duplicated");
}

#[test]
fn repeated_reply_is_duplicated_in_pipeline() {
    caught(Behaviour::Duplicate, true, PIPELINE, "duplicated");
}

#[test]
fn changed_byte_is_altered() {
    caught(Behaviour::Alter, false, PINGPONG, "altered");
}

#[test]
fn changed_byte_is_altered_in_raw_pipeline() {
    caught(Behaviour::Alter, true, PIPELINE, "altered");
}

#[test]
fn early_close_is_closed_early() {
    caught(Behaviour::CloseEarly, false, PINGPONG, "closed_early");
}

#[test]
fn early_close_in_pipeline_also_counts_missing() {
    caught(Behaviour::CloseEarly, false, PIPELINE, "closed_early");
    caught(Behaviour::CloseEarly, false, PIPELINE, "missing");
}

#[test]
fn unrequested_line_is_extra() {
    caught(Behaviour::Greet, false, PINGPONG, "extra");
}

/// Runs against a correct server in the other mode and checks the run
/// stops at once, naming the protocol to try.
fn wrong_protocol_named(server_raw: bool, mode_args: &[&str]) {
    let addr = start(ServerSpec {
        behaviour: Behaviour::Correct,
        raw: server_raw,
        one_byte: true,
    });
    let (asked, answers) = if server_raw {
        ("prefix", "raw")
    } else {
        ("raw", "prefix")
    };
    let mut args = vec![
        "--conns", "3", "--secs", "5", "--warmup", "0", "--json", "--proto", asked,
    ];
    args.extend_from_slice(mode_args);
    let out = load_within(addr, &args, Duration::from_secs(2));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let v = json(&out);
    assert!(errors(&v, "wrong_proto") >= 1, "{}", describe(&out));
    let hint = format!("the server answers in {answers} mode: try --proto {answers}");
    assert_eq!(v["stopped_early"], hint.as_str(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&hint));
}

#[test]
fn raw_server_checked_as_prefix_names_raw() {
    wrong_protocol_named(true, PINGPONG);
}

#[test]
fn prefix_server_checked_as_raw_names_prefix() {
    wrong_protocol_named(false, PIPELINE);
}

#[test]
fn wrong_protocol_stops_the_idle_open_phase() {
    wrong_protocol_named(true, &["--mode", "idle", "--hold", "5"]);
}

#[test]
fn refused_connection_is_a_connect_error() {
    let out = load(
        closed_port(),
        &["--conns", "3", "--secs", "0.2", "--warmup", "0", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(errors(&json(&out), "connect"), 3);
}
