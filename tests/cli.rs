//! SPEC §3, the command line: help, bad arguments and the values refused
//! with exit status 2, bind failures (one line naming what failed), the
//! startup line, the logged limits and the warnings about adjusted or
//! ignored settings.

mod common;

use common::*;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn echoloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_echoloop"))
        .args(args)
        .output()
        .expect("run echoloop")
}

#[test]
fn help_lists_every_option_with_its_default() {
    let out = echoloop(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, default) in [
        ("--listen", "127.0.0.1:1234"),
        ("--max-line", "65536"),
        ("--idle-timeout", "10s"),
        ("--max-pending-output", "256KiB"),
        ("--threads", "1"),
        ("--shutdown-timeout", "5s"),
        ("--max-connections", "open-file limit"),
        ("--log-level", "info"),
        ("--raw", ""),
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
        let at = help.find(flag).unwrap();
        let entry = &help[at..];
        let entry = &entry[..entry[2..].find("\n  -").map_or(entry.len(), |e| e + 2)];
        assert!(
            entry.contains(default),
            "{flag} does not show its default {default}:\n{entry}"
        );
    }
}

#[test]
fn a_bad_flag_exits_2_with_a_message() {
    let out = echoloop(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn a_bad_value_exits_2_naming_it() {
    for (flag, value) in [
        ("--max-line", "lots"),
        ("--idle-timeout", "soon"),
        ("--listen", "nowhere"),
        ("--max-pending-output", "12XB"),
    ] {
        let out = echoloop(&[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(value), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Runs `cmd`, expecting exit status 2 and a message containing every one
/// of `wanted`; returns the message. A command that starts serving instead
/// is killed after a few seconds (and fails the test).
fn refused(cmd: &mut Command, wanted: &[&str]) -> String {
    let out = output_within(cmd, Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    for w in wanted {
        assert!(err.contains(w), "no {w:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "printed a startup line although refused"
    );
    err
}

/// Runs `cmd` to its end, killing it if it runs longer than `within`.
fn output_within(cmd: &mut Command, within: Duration) -> Output {
    let mut child = (cmd.stdin(Stdio::null()).stdout(Stdio::piped()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run echoloop");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < within {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

fn echoloop_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_echoloop"));
    cmd.args(args);
    cmd
}

#[test]
fn a_cap_of_zero_is_refused() {
    refused(
        &mut echoloop_cmd(&["--max-connections", "0"]),
        &["--max-connections", "at least 1"],
    );
}

#[test]
fn an_unknown_log_level_is_refused_listing_the_levels() {
    refused(
        &mut echoloop_cmd(&["--log-level", "bogus"]),
        &["bogus", "off, error, warn, info, debug, trace"],
    );
}

#[test]
fn more_loops_than_the_descriptor_limit_holds_are_refused() {
    // 100 descriptors hold (100 - 41) / 19 = 3 loops.
    let err = refused(
        with_nofile(100).args(["--listen", "127.0.0.1:0", "--threads", "10"]),
        &[
            "--threads 10",
            "at most 3 loop(s)",
            "open-file limit of 100",
        ],
    );
    assert_eq!(err.matches("--threads 10").count(), 1, "{err}");
    refused(
        &mut echoloop_cmd(&["--listen", "127.0.0.1:0", "--threads", "100000"]),
        &["--threads 100000", "at most"],
    );
}

#[test]
fn a_cap_above_the_descriptor_limit_is_lowered_with_a_warning() {
    let server = Server::start_with_nofile(&["--max-connections", "100000"], 100);
    // 100 - 59 = 41 connections fit.
    server.wait_until(Duration::from_secs(5), "the lowered cap", |s| {
        s.stderr()
            .contains("open-file limit 100, max connections 41, 1 loop(s)")
    });
    let log = server.stderr();
    assert!(
        log.contains("WARN")
            && log.contains("--max-connections 100000")
            && log.contains("at most 41"),
        "{log}"
    );
    // And the lowered cap is the one enforced: the 42nd client is busy.
    let mut held: Vec<_> = (0..41).map(|_| server.connect()).collect();
    for c in held.iter_mut() {
        exchange(c, b"in\n", &said(b"in"));
    }
    let mut extra = server.connect();
    assert_eq!(read_to_eof(&mut extra), b"error: server busy\n");
}

#[test]
fn a_rust_log_that_would_hide_every_line_is_ignored_with_a_warning() {
    // start_cmd sets RUST_LOG=debug; `env` sets it again for echoloop.
    let mut wrapper = Command::new("env");
    wrapper
        .arg("RUST_LOG=bogus")
        .arg(env!("CARGO_BIN_EXE_echoloop"));
    let server = Server::start_cmd(wrapper, &["--listen", "127.0.0.1:0"], 1);
    server.wait_until(Duration::from_secs(5), "the RUST_LOG warning", |s| {
        s.stderr().contains("ignoring RUST_LOG=bogus")
    });
    // Logging goes on at info: the limits line is there.
    server.wait_until(Duration::from_secs(5), "the info line", |s| {
        s.stderr().contains("INFO") && s.stderr().contains("open-file limit")
    });
}

/// Runs echoloop with `args` (where `{addr}` stands for an address that is
/// taken) and expects exit status 1, no startup line, and `wanted` as the
/// one line of stderr that names the address.
fn fails_to_start_on_a_taken_address(args: &[&str], wanted: &str) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args: Vec<String> = args.iter().map(|a| a.replace("{addr}", &addr)).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = echoloop(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let failures: Vec<&str> = err.lines().filter(|l| l.contains(&addr)).collect();
    assert_eq!(failures, [wanted.replace("{addr}", &addr)], "{err}");
    assert!(!err.contains("ERROR"), "said twice:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "announced although it failed");
}

#[test]
fn a_taken_port_exits_1_with_one_line_naming_the_address() {
    fails_to_start_on_a_taken_address(
        &["--listen", "{addr}"],
        "echoloop: cannot listen on {addr}: Address already in use (os error 98)",
    );
}

#[test]
fn a_taken_metrics_port_exits_1_naming_the_metrics_address() {
    fails_to_start_on_a_taken_address(
        &["--listen", "127.0.0.1:0", "--metrics", "{addr}"],
        "echoloop: cannot serve metrics on {addr}: Address already in use (os error 98)",
    );
}

#[test]
fn startup_line_names_each_listener_and_limits_are_logged() {
    let server = Server::start_raw(&["--listen", "127.0.0.1:0", "--listen", "[::1]:0"], 2);
    assert!(server.addrs[0].is_ipv4() && server.addrs[0].port() != 0);
    assert!(server.addrs[1].is_ipv6() && server.addrs[1].port() != 0);
    for addr in &server.addrs {
        let mut c = connect(*addr);
        exchange(&mut c, b"v4 or v6\n", &said(b"v4 or v6"));
    }
    server.wait_until(Duration::from_secs(5), "limits in the log", |s| {
        s.stderr().contains("open-file limit") && s.stderr().contains("max connections")
    });
}

#[test]
fn sizes_above_1gib_are_refused() {
    for (flag, value) in [("--max-line", "2GiB"), ("--max-pending-output", "1025MiB")] {
        refused(
            &mut echoloop_cmd(&["--listen", "127.0.0.1:0", flag, value]),
            &[flag, value, "at most 1GiB"],
        );
    }
}

#[test]
fn a_size_of_1gib_is_accepted() {
    let server = Server::start(&["--max-line", "1GiB", "--max-pending-output", "1GiB"]);
    let mut c = server.connect();
    exchange(&mut c, b"big enough\n", &said(b"big enough"));
}
