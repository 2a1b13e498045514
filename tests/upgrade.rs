//! Live upgrade (SIGUSR2), black-box: the serving process hands every
//! listener and every connection, with its whole state, to a new process
//! started from the binary's path, and the clients notice nothing but a
//! short pause, which does not include the new binary's start-up. Also
//! what happens when the new binary is missing, exits, or never becomes
//! ready, signals before and after the commit, a new process that dies
//! after the commit, and a new process that refuses an offer in a format
//! it does not know.
//!
//! The moment between the commit and the new process's `S` is held open
//! by a `NOTIFY_SOCKET` whose queue is full: the new process blocks
//! sending `MAINPID=` there, before its `S`, until the test reads.
//!
//! Each server runs from its own copy of the binary (see
//! [`common::Upgradable`]): a test breaks an upgrade by replacing that
//! file. After an upgrade the serving process is not our child; its pid
//! comes from the pid file.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A stand-in for the new binary that exits at once.
const EXITS_AT_ONCE: &[u8] = b"#!/bin/sh\nexit 1\n";
/// A stand-in for the new binary that runs but never takes anything over.
const NEVER_READY: &[u8] = b"#!/bin/sh\nexec sleep 60\n";
/// A stand-in for the new binary that takes the offer (reads its 16 bytes,
/// answers `A`), then reads nothing more and never answers.
/// (bash: dash takes only one-digit descriptors in a redirection.)
const TAKES_THE_OFFER_THEN_HANGS: &[u8] = b"#!/usr/bin/env bash
head -c 16 <&$ECHOLOOP_UPGRADE_FD >/dev/null
printf A >&$ECHOLOOP_UPGRADE_FD
exec sleep 60
";

/// How long a log line may take to show up after what it reports.
const LOG_DELAY: Duration = Duration::from_secs(10);

/// The load generator built next to the server.
fn load_tool() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_echoloop")).with_file_name("echoloop-load")
}

/// The metrics page of whatever process serves `up` now.
fn metrics_of(up: &Upgradable) -> String {
    http_get(
        up.server.metrics.expect("started with --metrics"),
        "/metrics",
    )
}

/// A client with a line exchanged, so the server has it in its table.
fn open_client(up: &Upgradable, name: &str) -> TcpStream {
    let mut c = up.server.connect();
    exchange(
        &mut c,
        format!("{name}\n").as_bytes(),
        &said(name.as_bytes()),
    );
    c
}

/// Sends the first half of a line and waits until the server has read it.
fn send_half_line(up: &Upgradable, c: &mut TcpStream) {
    c.write_all(b"hel").unwrap();
    wait_read_by_server(&up.server, c);
}

/// Finishes the line [`send_half_line`] began: exactly one reply comes, the
/// right one, and nothing after it (the next exchange starts clean).
fn finish_half_line(c: &mut TcpStream) {
    exchange(c, b"lo\n", &said(b"hello"));
    exchange(c, b"next\n", &said(b"next"));
}

/// Every `upgrade failed: ...; still serving` message, in order.
fn failures(log: &str) -> Vec<String> {
    messages(log)
        .filter(|m| m.starts_with("upgrade failed: ") && m.ends_with("; still serving"))
        .map(str::to_owned)
        .collect()
}

/// Sends SIGUSR2 to a server whose binary is broken and waits for the
/// failure: logged at error level, the same process still in the pid file
/// and running, no child left behind. Returns the failure message and how
/// long it took.
fn failed_upgrade(up: &Upgradable) -> (String, Duration) {
    let pid = up.serving();
    let before = failures(&up.stderr()).len();
    let start = Instant::now();
    signal_pid(pid, libc::SIGUSR2);
    up.wait_until(Duration::from_secs(15), "the upgrade failure", |u| {
        failures(&u.stderr()).len() > before
    });
    let took = start.elapsed();
    let log = up.stderr();
    let failure = failures(&log)[before].clone();
    assert!(
        log.lines()
            .any(|l| l.contains(" ERROR ") && l.ends_with(&failure)),
        "the failure is not logged at error level:\n{log}"
    );
    assert_eq!(
        up.pid_file_pid(),
        Some(pid),
        "pid file after a failed upgrade"
    );
    assert!(alive(pid), "the old process died:\n{log}");
    up.wait_until(
        Duration::from_secs(5),
        "the failed child to be gone",
        |_| children_of(pid).is_empty(),
    );
    assert!(
        handovers(&log).is_empty(),
        "a failed upgrade handed over:\n{log}"
    );
    (failure, took)
}

/// A failed upgrade leaves the old process serving everything: an
/// existing connection answers and finishes the half line it had sent
/// before the signal, a new one is accepted, and a later upgrade with the
/// real binary back in place works and keeps the connection.
fn upgrade_fails_then_recovers(
    args: &[&str],
    break_it: impl FnOnce(&Upgradable),
) -> (String, Duration) {
    let mut up = Upgradable::start(args);
    let mut old = open_client(&up, "before");
    send_half_line(&up, &mut old);
    break_it(&up);
    let (failure, took) = failed_upgrade(&up);
    finish_half_line(&mut old);
    let mut fresh = up.server.connect();
    exchange(&mut fresh, b"new\n", &said(b"new"));

    up.restore_exe();
    send_half_line(&up, &mut old);
    let h = up.upgrade();
    assert_eq!(h.connections, 2, "{h:?}");
    finish_half_line(&mut old);
    exchange(&mut fresh, b"still\n", &said(b"still"));
    (failure, took)
}

// ----- what a client sees --------------------------------------------------

#[test]
fn a_thousand_ping_pong_connections_see_no_error_across_three_upgrades() {
    const CONNS: u64 = 1000;
    assert!(raise_nofile() > 2 * CONNS + 100, "open-file limit too low");
    let mut up = Upgradable::start_with(
        |cmd| limit_nofile(cmd, 20_000),
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--log-level",
            "info",
        ],
        2,
    );
    let load = Command::new(load_tool())
        .args(["--target", &up.server.addr().to_string()])
        .args(["--conns", &CONNS.to_string(), "--warmup", "500ms"])
        .args(["--secs", "8s", "--json", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echoloop-load (built by `cargo build --workspace --release --bins`)");
    let mut load = KillOnDrop(load);
    up.wait_until(LOG_DELAY, "every load connection open", |_| {
        metric(&metrics_of(&up), "echoloop_connections_open") == CONNS
    });
    for round in 1..=3 {
        let lines_before = metric(&metrics_of(&up), "echoloop_lines_total");
        let h = up.upgrade();
        assert_eq!(h.listeners, 2, "round {round}: {h:?}");
        assert!(h.connections >= CONNS as usize, "round {round}: {h:?}");
        // The counters go on from where the old process left them, and
        // the connections keep answering in the new one.
        up.server
            .wait_until(LOG_DELAY, "lines answered by the new process", |_| {
                metric(&metrics_of(&up), "echoloop_lines_total") > lines_before
            });
        let page = metrics_of(&up);
        assert_eq!(
            metric(&page, "echoloop_connections_open"),
            CONNS,
            "round {round}"
        );
        assert_eq!(
            metric(&page, "echoloop_connections_accepted_total"),
            CONNS,
            "round {round}: the connections are the same ones, the count goes on"
        );
    }
    assert!(
        load.0.try_wait().unwrap().is_none(),
        "the load ended before the third upgrade: nothing was tested"
    );
    let out = load.wait_output(Duration::from_secs(20));
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("echoloop-load --json: {e}: {report}\n{stderr}"));
    assert_eq!(json["errors"]["total"], 0, "{report}\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{report}\n{stderr}");
    // The tool never reconnects: one connect per connection, and all of them
    // lasted the whole run (a close would count as closed_early).
    assert_eq!(json["connects"]["attempted"], CONNS, "{report}");
    assert_eq!(json["connects"]["established"], CONNS, "{report}");
    let replies = json["replies_total"].as_u64().unwrap();
    let log = up.stderr();
    let frozen: Vec<&str> = messages(&log)
        .filter_map(|m| m.strip_prefix("upgrade: the loops were frozen for "))
        .collect();
    eprintln!(
        "{replies} replies, latency max {} us (p99 {} us); loops frozen for {frozen:?}",
        json["latency_us"]["max"], json["latency_us"]["p99"]
    );
    assert!(replies > 10 * CONNS, "{report}");
    // Every line the tool was answered was counted once, over four processes.
    up.wait_until(LOG_DELAY, "the load's connections to close", |_| {
        metric(&metrics_of(&up), "echoloop_connections_open") == 0
    });
    let page = metrics_of(&up);
    assert_eq!(metric(&page, "echoloop_lines_total"), replies, "{page}");
    assert_eq!(metric(&page, "echoloop_connections_accepted_total"), CONNS);
    assert_eq!(
        metric(&page, "echoloop_connections_closed_total{reason=\"eof\"}"),
        CONNS,
        "every connection ended by the tool's close: {page}"
    );
}

/// A child process killed (if still running) when dropped.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// Waits up to `within` for it to exit; its whole output.
    fn wait_output(&mut self, within: Duration) -> std::process::Output {
        let start = Instant::now();
        while self.0.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < within, "did not exit within {within:?}");
            thread::sleep(Duration::from_millis(50));
        }
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_end(&mut stdout).unwrap();
        }
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_end(&mut stderr).unwrap();
        }
        std::process::Output {
            status: self.0.wait().unwrap(),
            stdout,
            stderr,
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn half_a_line_before_the_upgrade_and_the_rest_after_get_one_reply() {
    let mut up = Upgradable::start(&[]);
    let mut c = open_client(&up, "first");
    send_half_line(&up, &mut c);
    let h = up.upgrade();
    assert_eq!((h.listeners, h.connections), (1, 1), "{h:?}");
    finish_half_line(&mut c);
}

/// Fixed-width numbered lines, so a byte count says which lines went out.
fn numbered_line(i: usize) -> String {
    format!("line {i:08}\n")
}

const LINE_LEN: usize = 14;

/// Bytes `from..from + len` of the stream of numbered lines.
fn numbered_bytes(from: usize, len: usize) -> Vec<u8> {
    let first = from / LINE_LEN;
    let lines = (from % LINE_LEN + len).div_ceil(LINE_LEN);
    let text: String = (first..first + lines).map(numbered_line).collect();
    text.as_bytes()[from % LINE_LEN..from % LINE_LEN + len].to_vec()
}

#[test]
fn a_paused_client_that_did_not_read_gets_its_whole_backlog_after_the_upgrade() {
    let mut up = Upgradable::start(&["--max-pending-output", "64KiB", "--idle-timeout", "60s"]);
    let mut c = open_client(&up, "start");
    // Write until the server stops reading: the client cannot write for a
    // while and the server's end holds unread input.
    c.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let mut blocked_since: Option<Instant> = None;
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match c.write(&numbered_bytes(sent, 64 * 1024)) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("client write: {e}"),
        }
        assert!(
            sent < 256 << 20 && Instant::now() < give_up,
            "the server never paused ({sent} bytes sent)"
        );
    }
    c.set_nonblocking(false).unwrap();
    assert!(
        server_end(&c).unwrap().rx_queue > 0,
        "the server is not paused: it has read everything"
    );
    let h = up.upgrade();
    assert_eq!(h.connections, 1, "{h:?}");
    // Finish the line the last write cut (on a thread: there is room for
    // it only once the backlog drains), and take everything.
    let rest = numbered_bytes(sent, (LINE_LEN - sent % LINE_LEN) % LINE_LEN);
    sent += rest.len();
    let mut w = c.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&rest));
    let expected: Vec<u8> = (0..sent / LINE_LEN)
        .flat_map(|i| said(numbered_line(i).trim_end().as_bytes()))
        .collect();
    let got = read_n(&mut c, expected.len());
    if got != expected {
        let at = got.iter().zip(&expected).position(|(a, b)| a != b).unwrap();
        panic!(
            "backlog differs at byte {at} of {}: got {:?}, expected {:?}",
            expected.len(),
            String::from_utf8_lossy(&got[at..(at + 40).min(got.len())]),
            String::from_utf8_lossy(&expected[at..(at + 40).min(expected.len())]),
        );
    }
    writer.join().unwrap().expect("finish the cut line");
    exchange(&mut c, b"more\n", &said(b"more"));
}

#[test]
fn the_idle_timeout_counts_the_time_before_the_upgrade() {
    let mut up = Upgradable::start(&["--idle-timeout", "2s"]);
    let mut c = up.server.connect();
    exchange(&mut c, b"last\n", &said(b"last"));
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(1));
    up.upgrade();
    assert!(
        t0.elapsed() < Duration::from_millis(1800),
        "the upgrade took until {:?} after the line: too late to tell",
        t0.elapsed()
    );
    wait_closed(&mut c);
    let closed = t0.elapsed();
    assert!(
        closed >= Duration::from_millis(1950),
        "closed early: {closed:?}"
    );
    assert!(
        closed <= Duration::from_millis(2600),
        "closed {closed:?} after the last line: the idle time before the upgrade was lost"
    );
    up.wait_until(LOG_DELAY, "the idle close logged", |s| {
        s.stderr().contains("closed (idle)")
    });
}

#[test]
fn connections_opened_during_upgrades_are_all_answered() {
    let mut up = Upgradable::start(&["--log-level", "info"]);
    let addr = up.server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let churn: Vec<_> = (0..2)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || -> Result<(), String> {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let line = format!("t{t} c{i}");
                    let mut c =
                        TcpStream::connect(addr).map_err(|e| format!("connect {line}: {e}"))?;
                    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    c.write_all(format!("{line}\n").as_bytes())
                        .map_err(|e| format!("write {line}: {e}"))?;
                    let mut reply = vec![0; said(line.as_bytes()).len()];
                    c.read_exact(&mut reply)
                        .map_err(|e| format!("reply to {line}: {e}"))?;
                    if reply != said(line.as_bytes()) {
                        return Err(format!("reply to {line}: {reply:?}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    // Paced: a few thousand connections in all, not a
                    // port exhaustion test.
                    thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            })
        })
        .collect();
    let wait_more = |up: &Upgradable, what: &str| {
        let at = done.load(Ordering::Relaxed);
        up.wait_until(LOG_DELAY, what, |_| {
            done.load(Ordering::Relaxed) >= at + 50 || churn.iter().any(|t| t.is_finished())
        });
    };
    wait_more(&up, "connections before the upgrades");
    for _ in 0..3 {
        up.upgrade();
        wait_more(&up, "connections after an upgrade");
    }
    stop.store(true, Ordering::Relaxed);
    for t in churn {
        if let Err(e) = t.join().unwrap() {
            panic!("{e} (after {} good ones)", done.load(Ordering::Relaxed));
        }
    }
    eprintln!(
        "{} connections, each answered, across three upgrades",
        done.load(Ordering::Relaxed)
    );
}

#[test]
fn a_lingering_connection_is_handed_over_and_drops_input_until_the_client_closes() {
    let mut up = Upgradable::start(&["--max-line", "8"]);
    let mut c = up.server.connect();
    c.write_all(b"123456789\n").unwrap();
    assert_eq!(read_to_eof(&mut c), b"error: line too long (max 8 bytes)\n");
    // The server has shut its side and lingers (for up to 2 s), dropping
    // what the client still sends so that its close is no reset.
    let h = up.upgrade();
    assert_eq!(h.connections, 1, "the lingering connection: {h:?}");
    let end = server_end(&c).expect("the server's end");
    assert!(
        fd_targets(h.to)
            .iter()
            .any(|(_, t)| *t == format!("socket:[{}]", end.inode)),
        "the new process does not hold the lingering socket"
    );
    c.write_all(b"more input\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    up.wait_until(LOG_DELAY, "the lingering close", |s| {
        s.stderr().contains("closed (too_long)")
    });
    let mut buf = [0u8; 16];
    assert_eq!(
        c.read(&mut buf).map_err(|e| e.kind()),
        Ok(0),
        "a clean close, no reset"
    );
}

// ----- failed upgrades ------------------------------------------------------

#[test]
fn a_missing_binary_fails_the_upgrade_and_the_old_process_serves_on() {
    let (failure, _) = upgrade_fails_then_recovers(&[], |up| up.remove_exe());
    eprintln!("logged: {failure}");
}

#[test]
fn a_binary_that_exits_at_once_fails_the_upgrade_without_waiting_for_the_timeout() {
    let (failure, took) = upgrade_fails_then_recovers(&["--upgrade-timeout", "10s"], |up| {
        up.replace_exe(EXITS_AT_ONCE)
    });
    eprintln!("logged after {took:?}: {failure}");
    assert!(
        took < Duration::from_secs(5),
        "a new process that exited was noticed only after {took:?}"
    );
}

#[test]
fn a_binary_that_never_gets_ready_is_killed_after_the_upgrade_timeout() {
    let (failure, took) = upgrade_fails_then_recovers(&["--upgrade-timeout", "1s"], |up| {
        up.replace_exe(NEVER_READY)
    });
    eprintln!("logged after {took:?}: {failure}");
    assert!(
        took >= Duration::from_millis(900),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "gave up late: {took:?}");
}

// ----- the process -------------------------------------------------------------

#[test]
fn after_three_upgrades_the_same_descriptors_hold_the_same_connections() {
    let mut up = Upgradable::start(&[]);
    let mut clients: Vec<TcpStream> = (0..20)
        .map(|i| open_client(&up, &format!("c{i}")))
        .collect();
    let tcp_inodes = |pid: u32| -> Vec<u64> {
        let tcp: Vec<u64> = tcp_sockets().iter().map(|e| e.inode).collect();
        let mut inodes: Vec<u64> = fd_targets(pid)
            .iter()
            .filter_map(|(_, t)| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .filter(|i| tcp.contains(i))
            .collect();
        inodes.sort_unstable();
        inodes
    };
    let original = fd_targets(up.server.pid());
    let original_tcp = tcp_inodes(up.server.pid());
    assert_eq!(
        original_tcp.len(),
        21,
        "a listener and 20 connections: {original:?}"
    );
    for _ in 0..3 {
        let h = up.upgrade();
        assert_eq!((h.listeners, h.connections), (1, 20), "{h:?}");
    }
    let pid = up.serving();
    up.wait_until(
        Duration::from_secs(5),
        "the descriptor count to settle",
        |_| fd_targets(pid).len() == original.len(),
    );
    assert_eq!(
        tcp_inodes(pid),
        original_tcp,
        "not the same TCP sockets: before {original:?}, now {:?}",
        fd_targets(pid)
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let line = format!("c{i} again");
        exchange(c, format!("{line}\n").as_bytes(), &said(line.as_bytes()));
    }
    assert_eq!(
        fd_targets(pid).len(),
        original.len(),
        "{:?}",
        fd_targets(pid)
    );
}

#[test]
fn after_an_upgrade_sigterm_shuts_the_new_process_down_and_removes_the_pid_file() {
    let mut up = Upgradable::start(&[]);
    let mut c = open_client(&up, "before");
    let h = up.upgrade();
    // Replies in flight when the signal comes.
    c.write_all(b"one\ntwo\n").unwrap();
    signal_pid(h.to, libc::SIGTERM);
    let mut expected = said(b"one");
    expected.extend_from_slice(&said(b"two"));
    assert_eq!(up.read_to_eof(&mut c), expected);
    up.wait_until(LOG_DELAY, "the new process to exit", |_| !alive(h.to));
    assert_eq!(up.pid_file_pid(), None, "the pid file outlived the server");
}

// ----- signals during an upgrade ---------------------------------------------

#[test]
fn sigusr2_during_an_upgrade_is_logged_and_ignored() {
    let up = Upgradable::start(&["--upgrade-timeout", "2s"]);
    let mut c = open_client(&up, "before");
    up.replace_exe(NEVER_READY);
    let pid = up.serving();
    signal_pid(pid, libc::SIGUSR2);
    up.wait_until(LOG_DELAY, "the upgrade to start", |s| {
        s.stderr().contains("upgrade: starting ")
    });
    signal_pid(pid, libc::SIGUSR2);
    up.wait_until(LOG_DELAY, "the ignored signal", |s| {
        s.stderr().lines().any(|l| {
            l.contains(" WARN ") && l.ends_with("upgrade already in progress: signal ignored")
        })
    });
    up.wait_until(LOG_DELAY, "the upgrade failure", |s| {
        !failures(&s.stderr()).is_empty()
    });
    // The client is served through it all.
    exchange(&mut c, b"after\n", &said(b"after"));
    // Time for a second upgrade the signal might have queued to show up.
    thread::sleep(Duration::from_millis(300));
    let log = up.stderr();
    assert_eq!(log.matches("upgrade: starting ").count(), 1, "{log}");
    assert_eq!(failures(&log).len(), 1, "{log}");
}

#[test]
fn sigterm_while_the_new_binary_is_not_ready_abandons_the_upgrade_at_once() {
    // A timeout far beyond what the test waits: the stop does not wait
    // for it, it kills the new process and shuts down gracefully at once.
    let mut up = Upgradable::start(&["--upgrade-timeout", "10s"]);
    let mut c = open_client(&up, "before");
    up.replace_exe(NEVER_READY);
    let pid = up.serving();
    signal_pid(pid, libc::SIGUSR2);
    up.wait_until(LOG_DELAY, "the never-ready child", |_| {
        !children_of(pid).is_empty()
    });
    let child = children_of(pid)[0];
    c.write_all(b"one\ntwo\n").unwrap();
    let signalled = Instant::now();
    signal_pid(pid, libc::SIGTERM);
    let mut expected = said(b"one");
    expected.extend_from_slice(&said(b"two"));
    assert_eq!(up.read_to_eof(&mut c), expected);
    let took = exits_with(&mut up, Some(0), signalled);
    let log = up.stderr();
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after the SIGTERM: it waited for the upgrade\n{log}"
    );
    let abandoning = abandoning_line();
    let order: Vec<&str> = messages(&log)
        .filter(|m| *m == abandoning || m.starts_with("upgrade failed: "))
        .collect();
    assert_eq!(order.len(), 2, "{log}");
    assert_eq!(order[0], abandoning, "{log}");
    assert!(
        order[1].contains("a stop signal came") && order[1].ends_with("; still serving"),
        "{log}"
    );
    assert!(!alive(child), "the never-ready child outlived the server");
    assert_eq!(up.pid_file_pid(), None, "the pid file outlived the server");
    assert!(handovers(&log).is_empty(), "{log}");
}

#[test]
fn a_sigterm_while_the_hand_over_is_being_sent_abandons_it_at_once() {
    let mut up = Upgradable::start(&["--upgrade-timeout", "10s", "--max-line", "2MiB"]);
    // An unfinished line larger than a socket buffer: the new process below
    // takes the offer but reads none of the hand-over, so the old one is
    // held writing it, frozen and uncommitted.
    let mut c = up.server.connect();
    c.write_all(&vec![b'x'; 1 << 20]).unwrap();
    wait_read_by_server(&up.server, &c);
    up.replace_exe(TAKES_THE_OFFER_THEN_HANGS);
    let pid = up.serving();
    signal_pid(pid, libc::SIGUSR2);
    up.wait_until(LOG_DELAY, "the old process to write the hand-over", |_| {
        upgrade_thread_sending(pid)
    });
    let child = children_of(pid)[0];
    let signalled = Instant::now();
    signal_pid(pid, libc::SIGTERM);
    // The shutdown drops the unfinished line and lingers (at most 2 s) for
    // a client that does not close.
    let took = exits_with(&mut up, Some(0), signalled);
    let log = up.stderr();
    assert!(
        took < Duration::from_secs(4),
        "exited after {took:?}\n{log}"
    );
    let abandoning = abandoning_line();
    let lines: Vec<&str> = messages(&log).collect();
    let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|m| what(m));
    let abandoned = at(&|m| m == abandoning).expect("the abandoning line");
    let failed = at(&|m| m.starts_with("upgrade failed:") && m.contains("a stop signal came"))
        .unwrap_or_else(|| panic!("no failure line\n{log}"));
    assert!(abandoned < failed, "{log}");
    up.wait_until(
        Duration::from_secs(5),
        "the new process to be killed",
        |_| !alive(child),
    );
    assert!(handovers(&log).is_empty(), "{log}");
}

/// What the old process logs for a SIGTERM during an uncommitted upgrade.
fn abandoning_line() -> String {
    format!(
        "signal {}: abandoning the upgrade, then a graceful shutdown",
        libc::SIGTERM
    )
}

/// Waits for the process we started to exit, expecting `status`; how long
/// after `since` it exited.
fn exits_with(up: &mut Upgradable, status: Option<i32>, since: Instant) -> Duration {
    assert_eq!(
        up.wait_exit(Duration::from_secs(15)),
        status,
        "{}",
        up.stderr()
    );
    since.elapsed()
}

/// Whether a thread named `upgrade` of `pid` is blocked in a send.
fn upgrade_thread_sending(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        comm.trim_end() == "upgrade" && in_send(&t.path().join("syscall"))
    })
}

/// Whether the task whose `/proc/.../syscall` file is `path` is in
/// write(2), sendto(2) or sendmsg(2).
fn in_send(path: &Path) -> bool {
    let sends = [libc::SYS_write, libc::SYS_sendto, libc::SYS_sendmsg].map(|nr| nr.to_string());
    std::fs::read_to_string(path).is_ok_and(|s| {
        s.split_whitespace()
            .next()
            .is_some_and(|nr| sends.iter().any(|s| s == nr))
    })
}

#[test]
fn sigterm_right_after_sigusr2_ends_in_a_graceful_shutdown_of_whoever_serves() {
    // The shutdown may overtake the upgrade or come during it: either way
    // the clients get every reply and a clean close, and nobody serves on.
    let mut up = Upgradable::start(&[]);
    let mut clients: Vec<TcpStream> = (0..4).map(|i| open_client(&up, &format!("c{i}"))).collect();
    let addr = up.server.addr();
    for c in clients.iter_mut() {
        c.write_all(b"one\ntwo\n").unwrap();
    }
    let pid = up.serving();
    signal_pid(pid, libc::SIGUSR2);
    signal_pid(pid, libc::SIGTERM);
    let mut expected = said(b"one");
    expected.extend_from_slice(&said(b"two"));
    for c in clients.iter_mut() {
        assert_eq!(up.read_to_eof(c), expected);
    }
    assert_eq!(up.wait_exit(Duration::from_secs(15)), Some(0));
    up.wait_until(Duration::from_secs(15), "the pid file removed", |_| {
        up.pid_file_pid().is_none()
    });
    for (_, _, to) in handovers(&up.stderr()) {
        up.server
            .wait_until(LOG_DELAY, "the new process to exit", |_| !alive(to));
    }
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
}

// ----- between the commit and `S` -------------------------------------------

/// A `NOTIFY_SOCKET` whose receive queue a test fills, so that the next
/// process to notify blocks in its send (sd_notify's datagram socket is
/// blocking) until the test reads.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// The sockets that filled the queue (their datagrams are charged to
    /// them until read).
    fillers: Vec<UnixDatagram>,
    _dir: tempfile::TempDir,
}

/// What the test's own datagrams say.
const FILLER: &str = "FILLER=1";

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("echoloop-notify-")
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        NotifySocket {
            sock,
            path,
            fillers: Vec::new(),
            _dir: dir,
        }
    }

    /// Fills the receive queue up to `net.unix.max_dgram_qlen`, then reads
    /// `room` datagrams back: the next `room` datagrams are taken, the one
    /// after them blocks its sender. Filled from as many sockets as it
    /// takes, until a fresh one cannot send: then the queue is full, not
    /// merely a sender's buffer.
    fn fill_leaving(&mut self, room: usize) {
        let mut queued = 0;
        loop {
            let filler = UnixDatagram::unbound().unwrap();
            filler.connect(&self.path).unwrap();
            filler.set_nonblocking(true).unwrap();
            let mut sent = 0;
            loop {
                match filler.send(FILLER.as_bytes()) {
                    Ok(_) => sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("filling NOTIFY_SOCKET: {e}"),
                }
            }
            self.fillers.push(filler);
            queued += sent;
            if sent == 0 {
                break;
            }
            assert!(self.fillers.len() < 1000, "the queue never filled");
        }
        assert!(queued > room, "only {queued} datagrams fill the queue");
        for _ in 0..room {
            assert_eq!(self.recv(), FILLER);
        }
    }

    /// The next datagram.
    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = (self.sock.recv(&mut buf)).unwrap_or_else(|e| panic!("recv NOTIFY_SOCKET: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until a datagram holds the line `want`; every datagram read
    /// that is not the test's own.
    fn recv_until(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let d = self.recv();
            if d == FILLER {
                continue;
            }
            let done = d.lines().any(|l| l == want);
            seen.push(d);
            if done {
                return seen;
            }
        }
    }
}

/// An upgrade held between the commit and `S`: the new process has the
/// commit and serves (it wrote the pid file), but it is blocked telling
/// `NOTIFY_SOCKET` its `MAINPID=`, which it does before it sends `S`; the
/// old one waits for that `S`.
struct HeldAfterCommit {
    up: Upgradable,
    notify: NotifySocket,
    old: u32,
    new: u32,
    /// A client connected before the upgrade.
    client: TcpStream,
}

fn upgrade_held_after_commit() -> HeldAfterCommit {
    let mut notify = NotifySocket::bind();
    let up = Upgradable::start_with(
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &notify.path);
        },
        &["--listen", "127.0.0.1:0"],
        1,
    );
    notify.recv_until("READY=1");
    let mut client = open_client(&up, "before");
    let old = up.serving();
    // Room for the old process's `RELOADING=1` only.
    notify.fill_leaving(1);
    signal_pid(old, libc::SIGUSR2);
    up.wait_until(LOG_DELAY, "the new process to write the pid file", |u| {
        u.pid_file_pid().is_some_and(|p| p != old)
    });
    let new = up.serving();
    up.wait_until(LOG_DELAY, "the new process blocked notifying", |_| {
        in_send(Path::new(&format!("/proc/{new}/syscall")))
    });
    let log = up.stderr();
    assert!(alive(old), "the old process did not wait for `S`:\n{log}");
    assert!(handovers(&log).is_empty(), "`S` came already:\n{log}");
    // The new process serves meanwhile.
    exchange(&mut client, b"meanwhile\n", &said(b"meanwhile"));
    HeldAfterCommit {
        up,
        notify,
        old,
        new,
        client,
    }
}

#[test]
fn sigterm_to_the_old_process_after_the_commit_is_passed_on_to_the_new_one() {
    let HeldAfterCommit {
        mut up,
        notify,
        old,
        new,
        mut client,
    } = upgrade_held_after_commit();
    signal_pid(old, libc::SIGTERM);
    let passed_on = format!(
        "signal {}: passed on to pid {new}, which serves now",
        libc::SIGTERM
    );
    up.wait_until(LOG_DELAY, "the signal passed on", |u| {
        messages(&u.stderr()).any(|m| m == passed_on)
    });
    assert!(alive(old), "the old process did not wait for `S`");
    // Let the new process notify: it sends `S`, then acts on the signal.
    let seen = notify.recv_until("STOPPING=1");
    let main_pid = format!("MAINPID={new}\nREADY=1\n");
    assert!(
        seen.ends_with(&[main_pid, "STOPPING=1\n".into()]),
        "the old process's RELOADING=1, then the new one's: {seen:?}"
    );
    assert_eq!(up.read_to_eof(&mut client), b"", "a graceful close");
    assert_eq!(
        up.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        up.stderr()
    );
    up.wait_until(LOG_DELAY, "the new process to exit", |_| !alive(new));
    assert_eq!(up.pid_file_pid(), None, "the pid file outlived the server");
    let log = up.stderr();
    assert_eq!(handovers(&log), [(1, 1, new)], "{log}");
    assert!(!log.contains("second signal"), "{log}");
}

#[test]
fn a_new_process_that_dies_after_the_commit_makes_the_old_one_exit_1() {
    // The socket stays full (closing it would unblock the new process).
    let HeldAfterCommit {
        mut up,
        notify: _full,
        new,
        mut client,
        ..
    } = upgrade_held_after_commit();
    signal_pid(new, libc::SIGKILL);
    assert_eq!(
        up.wait_exit(Duration::from_secs(10)),
        Some(1),
        "{}",
        up.stderr()
    );
    let log = up.stderr();
    let lost = log.lines().find(|l| {
        l.contains(" ERROR ")
            && l.contains(&format!("upgrade: pid {new} ended after it took over ("))
            && l.ends_with("): nobody serves the connections now")
    });
    assert!(lost.is_some(), "{log}");
    // Nobody serves: the connection ended with the process that held it,
    // and nothing listens.
    wait_closed(&mut client);
    assert!(
        TcpStream::connect(up.server.addr()).is_err(),
        "still accepting"
    );
    // The new process wrote the pid file before it died: not the old
    // one's to remove.
    assert_eq!(up.pid_file_pid(), Some(new), "{log}");
}

// ----- the freeze -------------------------------------------------------------

/// `D` of the last `upgrade: the loops were frozen for D` line (`Duration`'s
/// `Debug`: `850µs`, `12.5ms`, `1.2s`).
fn last_frozen(log: &str) -> Duration {
    let text = messages(log)
        .filter_map(|m| m.strip_prefix("upgrade: the loops were frozen for "))
        .last()
        .unwrap_or_else(|| panic!("no frozen line:\n{log}"));
    let (number, unit) = text.split_at(text.find(|c: char| c.is_alphabetic()).unwrap());
    let scale = match unit {
        "ns" => 1e-9,
        "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => panic!("frozen for {text:?}"),
    };
    Duration::from_secs_f64(number.parse::<f64>().unwrap() * scale)
}

#[test]
fn the_loops_do_not_freeze_while_the_new_binary_starts_up() {
    const START_UP: Duration = Duration::from_secs(2);
    let mut up = Upgradable::start(&[]);
    // A new binary that takes 2 s to start, as a cold one on a busy disk.
    let real = up.install_beside(
        "echoloop.real",
        &std::fs::read(env!("CARGO_BIN_EXE_echoloop")).unwrap(),
    );
    let wrapper = format!(
        "#!/bin/sh\nsleep {}\nexec '{}' \"$@\"\n",
        START_UP.as_secs(),
        real.display()
    );
    up.replace_exe(wrapper.as_bytes());
    // A client exchanging lines throughout; its longest wait for a reply.
    let mut c = open_client(&up, "before");
    let stop = Arc::new(AtomicBool::new(false));
    let client = thread::spawn({
        let stop = stop.clone();
        move || {
            let (mut longest, mut lines) = (Duration::ZERO, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                exchange(&mut c, b"ping\n", &said(b"ping"));
                longest = longest.max(sent.elapsed());
                lines += 1;
                thread::sleep(Duration::from_millis(5));
            }
            (longest, lines)
        }
    });
    let signalled = Instant::now();
    let h = up.upgrade();
    let took = signalled.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (longest, lines) = client.join().unwrap();
    let frozen = last_frozen(&up.stderr());
    eprintln!(
        "upgrade took {took:?}, frozen for {frozen:?}, {lines} lines, longest wait {longest:?}"
    );
    assert_eq!(h.connections, 1, "{h:?}");
    assert!(
        took >= START_UP,
        "the slow start was not waited for: {took:?}"
    );
    assert!(frozen < Duration::from_millis(500), "frozen for {frozen:?}");
    assert!(
        longest < Duration::from_secs(1),
        "a client waited {longest:?} for a reply"
    );
    assert!(lines > 50, "only {lines} lines during the upgrade");
}

// ----- several loops, PROXY -----------------------------------------------------

#[test]
fn with_two_loops_every_listener_and_connection_is_handed_over() {
    let mut up = Upgradable::start_with(
        |_| {},
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--threads",
            "2",
        ],
        2,
    );
    let mut clients: Vec<TcpStream> = (0..32)
        .map(|i| open_client(&up, &format!("c{i}")))
        .collect();
    let on_both =
        |log: &str| log.contains("accepted by loop 0") && log.contains("accepted by loop 1");
    up.wait_until(LOG_DELAY, "connections on both loops", |s| {
        on_both(&s.stderr())
    });
    let h = up.upgrade();
    assert_eq!(h.listeners, 4, "2 echo + 2 metrics listeners: {h:?}");
    assert_eq!(h.connections, 32, "{h:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        let line = format!("c{i} again");
        exchange(c, format!("{line}\n").as_bytes(), &said(line.as_bytes()));
    }
    // The new process accepts on both loops, and serves metrics.
    let log_at = up.stderr().len();
    let fresh: Vec<TcpStream> = (0..32)
        .map(|i| open_client(&up, &format!("n{i}")))
        .collect();
    up.wait_until(LOG_DELAY, "new connections on both loops", |s| {
        on_both(&s.stderr()[log_at..])
    });
    drop(fresh);
    let page = metrics_of(&up);
    assert_eq!(
        metric(&page, "echoloop_connections_accepted_total"),
        64,
        "{page}"
    );
}

#[test]
fn a_proxy_protocol_client_keeps_its_name_and_an_unfinished_header_completes() {
    let mut up = Upgradable::start(&["--proxy-protocol"]);
    let mut named = up.server.connect();
    exchange(
        &mut named,
        b"PROXY TCP4 192.0.2.7 198.51.100.1 5678 1234\r\nbefore\n",
        &said(b"before"),
    );
    let mut halfway = up.server.connect();
    halfway.write_all(b"PROXY TCP4 192.0.2.8 198.51").unwrap();
    wait_read_by_server(&up.server, &halfway);
    let h = up.upgrade();
    assert_eq!(h.connections, 2, "{h:?}");
    // Served as clients past their header, not asked for one again.
    exchange(&mut named, b"after\n", &said(b"after"));
    exchange(
        &mut halfway,
        b".100.1 5679 1234\r\nfinally\n",
        &said(b"finally"),
    );
    let log_at = up.stderr().len();
    drop(named);
    drop(halfway);
    for client in ["192.0.2.7:5678", "192.0.2.8:5679"] {
        up.server
            .wait_until(LOG_DELAY, "the close, naming the PROXY client", |s| {
                messages(&s.stderr()[log_at..])
                    .any(|m| m.starts_with(client) && m.ends_with("closed (eof)"))
            });
    }
}

#[test]
fn a_metrics_request_half_sent_before_the_upgrade_is_answered_after_it() {
    let mut up = Upgradable::start_with(
        |_| {},
        &["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        2,
    );
    let mut echo = open_client(&up, "counted");
    let mut c = connect(up.server.metrics.unwrap());
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        .unwrap();
    wait_read_by_server(&up.server, &c);
    let h = up.upgrade();
    assert_eq!((h.listeners, h.connections), (2, 2), "{h:?}");
    c.write_all(b"\r\n").unwrap();
    let page = String::from_utf8(up.read_to_eof(&mut c)).unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(metric(&page, "echoloop_lines_total"), 1, "{page}");
    exchange(&mut echo, b"again\n", &said(b"again"));
}

// ----- the hand-over format ---------------------------------------------------

#[test]
fn a_new_process_refuses_an_unknown_hand_over_format_before_serving() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("echoloop.pid");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_echoloop"));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .arg("--pid-file")
        .arg(&pid_file)
        .env("ECHOLOOP_UPGRADE_FD", "3")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    // SAFETY: only dup2(2) and fcntl(2), async-signal-safe, between fork and
    // exec, on a descriptor the parent keeps open until spawn returns.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if ok == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start echoloop");
    drop(theirs);
    let mut child = KillOnDrop(child);
    let mut offer = b"ECHOLOOP".to_vec();
    offer.extend_from_slice(&99u32.to_le_bytes());
    offer.extend_from_slice(&1u32.to_le_bytes());
    // The new process may have refused and gone already: a failed write is
    // no failure of the test.
    let _ = (&ours).write_all(&offer);
    let out = child.wait_output(Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("hand-over format version 99")),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "served before refusing: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!pid_file.exists(), "wrote a pid file before refusing");
    assert!(!stderr.contains("accepted"), "{stderr}");
}
