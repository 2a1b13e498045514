//! SPEC §3, the command line: help, bad arguments, bind failures, the
//! startup line and the logged limits.

mod common;

use common::*;
use std::process::{Command, Output};

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

#[test]
fn a_taken_port_exits_1_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = echoloop(&["--listen", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
    assert!(!err.contains("panicked"), "{err}");
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
    server.wait_until(
        std::time::Duration::from_secs(5),
        "limits in the log",
        |s| s.stderr().contains("open-file limit") && s.stderr().contains("max connections"),
    );
}
