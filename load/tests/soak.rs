//! `--mode soak`: every server below breaks one promise of the SPEC under
//! abuse, and the soak must fail it (exit 1) and name what broke; the real
//! echoloop keeps them all and passes.

mod common;

use common::{Behaviour, ServerSpec, describe, json, load, start};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The server limits every soak here runs with (and tells the tool).
const LIMITS: &[&str] = &[
    "--idle-timeout",
    "1s",
    "--max-line",
    "1KiB",
    "--max-pending-output",
    "16KiB",
];

/// A short soak against `addr`; returns the run and its JSON report.
fn soak(addr: SocketAddr, extra: &[&str]) -> (std::process::Output, Value) {
    let mut args = vec![
        "--mode",
        "soak",
        "--conns",
        "4",
        "--abusers",
        "1",
        "--secs",
        "2",
        "--warmup",
        "0",
        "--json",
    ];
    args.extend_from_slice(LIMITS);
    args.extend_from_slice(extra);
    let out = load(addr, &args);
    let v = json(&out);
    (out, v)
}

/// The abuse row of `kind` in a soak report.
fn abuse<'a>(v: &'a Value, kind: &str) -> &'a Value {
    v["soak"]["abuse"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["kind"] == kind))
        .unwrap_or_else(|| panic!("no abuse row {kind} in {v}"))
}

/// Checks that a soak failed and that `what` is among its broken promises.
fn fails_with(server: Behaviour, extra: &[&str], what: &str) {
    let addr = start(ServerSpec::new(server));
    let (out, v) = soak(addr, extra);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(v["ok"], false);
    let broken: Vec<&str> = v["soak"]["broken"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    assert!(
        broken.iter().any(|b| b.starts_with(what)),
        "{what} not among {broken:?}: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("broken [soak] {what}")),
        "{stderr}"
    );
}

#[test]
fn a_server_that_never_closes_idle_connections_fails() {
    // The test server has no idle timeout (its 10 s read timeout is far
    // beyond the 1 s it claims).
    fails_with(Behaviour::Correct, &[], "slowloris");
}

#[test]
fn a_server_that_ignores_max_line_fails() {
    fails_with(Behaviour::Correct, &[], "long_line");
}

#[test]
fn a_server_that_drops_the_tail_after_a_half_close_fails() {
    fails_with(Behaviour::DropTail, &[], "half_close");
}

#[test]
fn a_server_that_starves_pingpong_behind_a_firehose_fails() {
    fails_with(Behaviour::Unfair, &[], "starved");
}

#[test]
fn a_server_that_buffers_without_bound_for_a_non_reader_fails() {
    // The test servers run in this process: it is the server sampled.
    let pid = std::process::id().to_string();
    fails_with(Behaviour::Unbounded, &["--server-pid", &pid], "memory");
}

/// A binary built beside this test, `name` relative to the profile
/// directory (`cargo build --release --bins --examples` builds them all; a
/// whole `cargo test --workspace` does too).
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --bins --examples` (or the whole workspace's tests)",
        path.display()
    );
    path
}

/// A server process started from `cmd`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts `cmd` and reads the address from its `Echoing on ADDR` line.
    fn start(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("no address in `{line}`"));
        Server { child, addr }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_server_that_spins_once_its_clients_leave_fails() {
    // Its own process: the CPU it burns must not be this test process's.
    let mut cmd = Command::new(built("examples/spinning_server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    let server = Server::start(cmd);
    let (out, v) = soak(server.addr, &["--server-pid", &server.pid()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let share = v["soak"]["server"]["quiet_cpu_share"].as_f64();
    assert!(
        share > Some(0.05),
        "quiet CPU {share:?}: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken [soak] spin: with no client left the server used"),
        "{stderr}"
    );
}

#[test]
fn echoloop_keeps_every_promise() {
    for raw in [false, true] {
        let mut cmd = Command::new(built("echoloop"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(LIMITS);
        if raw {
            cmd.arg("--raw");
        }
        let server = Server::start(cmd);
        let proto = if raw { "raw" } else { "prefix" };
        let (out, v) = soak(
            server.addr,
            &["--server-pid", &server.pid(), "--proto", proto],
        );
        drop(server);
        assert_eq!(out.status.code(), Some(0), "raw={raw}: {}", describe(&out));
        assert_eq!(v["soak"]["broken"].as_array().map(Vec::len), Some(0));
        for kind in [
            "slowloris",
            "long_line",
            "half_close",
            "random_bytes",
            "firehose",
        ] {
            let row = abuse(&v, kind);
            assert!(row["attempts"].as_u64() > Some(0), "{kind}: {row}");
            assert_eq!(row["broken"], 0, "{kind}: {row}");
        }
        let server = &v["soak"]["server"];
        assert!(
            server["fds_peak"].as_u64() > server["fds_before"].as_u64(),
            "{server}"
        );
        assert!(server["quiet_cpu_share"].is_number(), "{server}");
    }
}
