//! The `connect` and `idle` modes, --server-pid sampling, the JSON report's
//! shape, argument errors (exit 2), and the tokio peer servers under load.

mod common;

use common::{
    Behaviour, ServerSpec, closed_port, describe, errors, json, load, load_within, start,
};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[test]
fn connect_mode_completes_every_connection() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(
        addr,
        &[
            "--mode",
            "connect",
            "--conns",
            "60",
            "--concurrency",
            "8",
            "--secs",
            "20",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    assert_eq!(v["connects"]["completed"], 60, "{}", describe(&out));
    assert_eq!(v["connects"]["established"], 60);
    assert_eq!(v["replies_total"], 60);
    assert!(v["connects"]["per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(v["stopped_by_time_limit"], false);
}

#[test]
fn connect_mode_reports_server_cpu_per_connection() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let pid = std::process::id().to_string();
    let out = load(
        addr,
        &[
            "--mode",
            "connect",
            "--conns",
            "20",
            "--server-pid",
            &pid,
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    assert!(
        v["server"]["cpu_us_per_conn"].is_number(),
        "{}",
        describe(&out)
    );
}

#[test]
fn idle_mode_holds_and_samples_the_server() {
    // The test servers run in this process, so it is the "server" sampled.
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let pid = std::process::id().to_string();
    let out = load(
        addr,
        &[
            "--mode",
            "idle",
            "--conns",
            "20",
            "--hold",
            "0.5",
            "--server-pid",
            &pid,
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json(&out);
    assert_eq!(v["connects"]["established"], 20);
    assert_eq!(v["replies_total"], 20, "one exchange per connection");
    assert_eq!(v["hold_secs"], 0.5);
    let server = &v["server"];
    assert!(server["wakeups_per_sec"].is_number(), "{}", describe(&out));
    assert!(server["rss_before_bytes"].as_u64().unwrap() > 0);
    assert!(server["rss_after_open_bytes"].as_u64().unwrap() > 0);
    assert!(server["rss_growth_per_conn_bytes"].is_number());
}

#[test]
fn idle_mode_notices_a_server_closing_idle_connections() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        // Answer the one exchange, then close the connection during the hold.
        for stream in listener.incoming().take(2).flatten() {
            std::thread::spawn(move || {
                let mut rd = BufReader::new(stream.try_clone().unwrap());
                let mut line = Vec::new();
                if rd.read_until(b'\n', &mut line).is_ok() {
                    use std::io::Write;
                    let _ = (&stream).write_all(&common::reply(&line, false));
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
                let _ = stream.shutdown(std::net::Shutdown::Write);
                std::thread::sleep(std::time::Duration::from_millis(1000));
            });
        }
    });
    let out = load(
        addr,
        &["--mode", "idle", "--conns", "2", "--hold", "1", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        errors(&json(&out), "closed_early") >= 1,
        "{}",
        describe(&out)
    );
}

#[test]
fn json_is_exactly_one_object() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(
        addr,
        &["--conns", "2", "--secs", "0.2", "--warmup", "0", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");
    let mut stream = serde_json::Deserializer::from_str(&stdout).into_iter::<serde_json::Value>();
    let first = stream.next().unwrap().unwrap();
    assert!(stream.next().is_none(), "more than one JSON value");
    for key in [
        "replies_per_sec",
        "latency_us",
        "connects",
        "errors",
        "mode",
        "ok",
    ] {
        assert!(first.get(key).is_some(), "no {key} in {first}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(first["latency_us"][key].is_number(), "no latency {key}");
    }
    // --help: "[default: ceil(conns / 20000), on a 127.0.0.0/8 target]".
    assert_eq!(first["sources"], 1, "{first}");
    assert_eq!(first["threads"], 1);
    // Fields of other modes are left out, not zero.
    for key in ["depth", "hold_secs", "rate", "latency_uncorrected_us"] {
        assert!(
            first.get(key).is_none(),
            "{key} in a pingpong report: {first}"
        );
    }
    assert!(first["connects"].get("completed").is_none(), "{first}");
    assert!(first["tool"]["cpu_secs"].is_number(), "{first}");
}

#[test]
fn table_leaves_out_rows_that_mean_nothing() {
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(addr, &["--conns", "1", "--secs", "0.2", "--warmup", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(" 1 conn, 1 thread,"), "{table}");
    assert!(!table.contains("completed"), "{table}");
    assert!(!table.contains(" - "), "{table}");
    let out = load(
        addr,
        &["--mode", "connect", "--conns", "20", "--secs", "20"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("connections/s"), "{table}");
    assert!(!table.contains("replies/s"), "{table}");
}

#[test]
fn connect_latency_is_stamped_per_connection() {
    // Stamped once per loop turn, every connection of a turn got the same
    // latency: p50 = p99 = max.
    let addr = start(ServerSpec::new(Behaviour::Correct));
    let out = load(
        addr,
        &["--conns", "50", "--secs", "0.2", "--warmup", "0", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let l = &json(&out)["connects"]["latency_us"];
    assert_eq!(l["samples"], 50);
    assert!(l["p50"].as_f64() < l["max"].as_f64(), "{l}");
}

#[test]
fn nothing_listening_stops_at_once() {
    let out = load_within(
        closed_port(),
        &["--conns", "20", "--secs", "5", "--warmup", "1", "--json"],
        Duration::from_secs(2),
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let v = json(&out);
    assert_eq!(errors(&v, "connect"), 20);
    let why = v["stopped_early"].as_str().unwrap_or_default();
    assert!(why.contains("none of the 20 connections"), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is the server listening there?"),
        "{stderr}"
    );
}

#[test]
fn nothing_listening_stops_connect_mode_after_one_round() {
    let started = std::time::Instant::now();
    let out = load(
        closed_port(),
        &[
            "--mode",
            "connect",
            "--conns",
            "100000",
            "--concurrency",
            "10",
            "--json",
        ],
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(errors(&json(&out), "connect"), 10, "{}", describe(&out));
}

fn bad_args(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_echoloop-load"))
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_exit_2() {
    assert!(bad_args(&["--depth", "0"]).contains("--depth"));
    assert!(bad_args(&["--mode", "nope"]).contains("nope"));
    assert!(bad_args(&["--secs=-1"]).contains("duration"));
    assert!(bad_args(&["--grace", "soon"]).contains("500ms"));
    assert!(bad_args(&["--target", "not-an-address"]).contains("not-an-address"));
    assert!(bad_args(&["--target", "[::1]:1", "--spread"]).contains("127.0.0.0/8"));
    assert!(bad_args(&["--conns", "1000000"]).contains("open files"));
}

#[test]
fn help_shows_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_echoloop-load"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--conns",
        "--depth",
        "--secs",
        "--warmup",
        "--line-len",
        "--threads",
        "--proto",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
    assert!(help.contains("[default: 100]"), "{help}");
    assert!(help.contains("[default: pingpong]"), "{help}");
}

/// A built example (cargo builds examples before integration tests).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

/// Starts a peer server on port 0 and reads its `Echoing on ADDR` line.
fn peer(name: &str, raw: bool) -> (Child, std::net::SocketAddr) {
    let path = example(name);
    assert!(
        path.exists(),
        "{} is missing: a whole `cargo test -p echoloop-load` builds the examples \
         (a run filtered with --test does not; `cargo build -p echoloop-load --examples` does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    if raw {
        cmd.arg("--raw");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("start peer server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("Echoing on ")
        .expect("Echoing on line")
        .parse()
        .unwrap();
    (child, addr)
}

#[test]
fn tokio_peers_pass_pipelined_load() {
    for name in ["tokio_idiomatic", "tokio_tuned"] {
        for raw in [false, true] {
            let (mut child, addr) = peer(name, raw);
            let proto = if raw { "raw" } else { "prefix" };
            let out = load(
                addr,
                &[
                    "--mode", "pipeline", "--conns", "8", "--secs", "0.3", "--warmup", "0",
                    "--crlf", "--proto", proto, "--json",
                ],
            );
            let _ = child.kill();
            let _ = child.wait();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{name} raw={raw}: {}",
                describe(&out)
            );
            assert!(json(&out)["replies"].as_u64().unwrap() > 0);
        }
    }
}
