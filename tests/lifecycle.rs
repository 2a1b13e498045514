//! SPEC §2, black-box: idle timeouts, slow readers, fairness, resets,
//! descriptor hygiene and 10,000 concurrent connections.
//!
//! Time-based tests use short timeouts with wide margins: CI machines are
//! shared, 2-core and noisy.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_millis(400);

#[test]
fn idle_connection_is_closed() {
    let server = Server::start(&["--idle-timeout", "400ms"]);
    let mut c = server.connect();
    exchange(&mut c, b"hi\n", &said(b"hi"));
    let took = wait_closed(&mut c);
    assert!(
        took >= IDLE - Duration::from_millis(50),
        "closed early: {took:?}"
    );
    assert!(took < IDLE * 6, "closed late: {took:?}");
}

#[test]
fn lines_keep_a_connection_alive() {
    let server = Server::start(&["--idle-timeout", "400ms"]);
    let mut c = server.connect();
    let start = Instant::now();
    // 2 s of lines, each well inside the timeout.
    while start.elapsed() < Duration::from_secs(2) {
        exchange(&mut c, b"still here\n", &said(b"still here"));
        thread::sleep(Duration::from_millis(100));
    }
    // Then silence: now it must go.
    let took = wait_closed(&mut c);
    assert!(took < IDLE * 6, "closed late: {took:?}");
}

#[test]
fn trickled_bytes_do_not_keep_a_connection_alive() {
    let server = Server::start(&["--idle-timeout", "400ms"]);
    let mut c = server.connect();
    c.set_nodelay(true).unwrap();
    let start = Instant::now();
    let mut closed_after = None;
    // A slowloris: one byte every 50 ms, never a newline.
    for _ in 0..100 {
        if c.write_all(b"x").is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(50));
        let mut probe = [0u8; 1];
        c.set_nonblocking(true).unwrap();
        let r = c.read(&mut probe);
        c.set_nonblocking(false).unwrap();
        if matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        {
            closed_after = Some(start.elapsed());
            break;
        }
    }
    let took = closed_after.expect("slowloris was never closed");
    assert!(took < IDLE * 6, "closed late: {took:?}");
}

#[test]
fn idle_timeout_zero_never_closes() {
    let server = Server::start(&["--idle-timeout", "0"]);
    let mut c = server.connect();
    thread::sleep(Duration::from_millis(800));
    exchange(&mut c, b"still\n", &said(b"still"));
}

#[test]
fn slow_reader_is_bounded_and_others_are_served() {
    let server = Server::start(&["--max-pending-output", "64KiB"]);
    let before = server.rss();
    let mut slow = server.connect();
    let mut writer = slow.try_clone().unwrap();
    let lines = 400_000usize; // ~8 MB of input, ~8 MB of replies
    let sender = thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..lines {
            buf.extend_from_slice(format!("{i:>12}\n").as_bytes());
            if buf.len() > 64 * 1024 {
                writer.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        writer.write_all(&buf).unwrap();
    });
    // While the slow client reads nothing, another one is served at once.
    thread::sleep(Duration::from_millis(500));
    let mut other = server.connect();
    for _ in 0..20 {
        exchange(&mut other, b"ping\n", &said(b"ping"));
    }
    let grown = server.rss().saturating_sub(before);
    assert!(
        grown < 4 << 20,
        "server memory grew by {grown} bytes for a client that does not read"
    );
    // Now the slow client reads: every reply arrives, in order.
    let mut got = Vec::with_capacity(lines * 24);
    let mut buf = vec![0u8; 64 * 1024];
    let want_len = lines * said(b"123456789012").len();
    while got.len() < want_len {
        let n = slow.read(&mut buf).unwrap();
        assert!(n > 0, "closed early after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    sender.join().unwrap();
    for (i, reply) in got.chunks(said(b"123456789012").len()).enumerate() {
        assert_eq!(reply, said(format!("{i:>12}").as_bytes()), "reply {i}");
    }
}

#[test]
fn a_firehose_does_not_starve_a_ping_pong_client() {
    let server = Server::start(&[]);
    let hose = server.connect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut hose_w = hose.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let block = b"firehose firehose firehose\n".repeat(4096);
        while Instant::now() < deadline {
            if hose_w.write_all(&block).is_err() {
                break;
            }
        }
        let _ = hose_w.shutdown(std::net::Shutdown::Write);
    });
    let mut hose_r = hose;
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Ok(n) = hose_r.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
            counted.store(total, Ordering::Relaxed);
        }
        total
    });
    // The firehose is flowing (1 MiB of replies back) before the
    // ping-pong client starts.
    let flowing = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < 1 << 20 {
        assert!(Instant::now() < flowing, "the firehose never got going");
        thread::sleep(Duration::from_millis(5));
    }
    let mut pp = server.connect();
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let line = format!("pp {i}\n");
        let t = Instant::now();
        exchange(
            &mut pp,
            line.as_bytes(),
            &said(format!("pp {i}").as_bytes()),
        );
        worst = worst.max(t.elapsed());
    }
    writer.join().unwrap();
    let hosed = reader.join().unwrap();
    assert!(
        hosed > 1 << 20,
        "the firehose itself was served ({hosed} bytes)"
    );
    assert!(
        worst < Duration::from_millis(500),
        "ping-pong waited {worst:?}"
    );
}

#[test]
fn reset_by_peer_is_cleaned_up() {
    let server = Server::start(&[]);
    // A first connection and its close settle the baseline (lazy set-up).
    let mut warm = server.connect();
    exchange(&mut warm, b"warm\n", &said(b"warm"));
    drop(warm);
    thread::sleep(Duration::from_millis(200));
    let baseline = server.fd_count();
    let mut others = server.connect();
    let mut resets = Vec::new();
    for i in 0..50 {
        let mut c = server.connect();
        exchange(&mut c, b"before reset\n", &said(b"before reset"));
        if i % 2 == 0 {
            // Unread replies in flight make the close an RST too.
            c.write_all(b"pending\npending\n").unwrap();
        }
        let sock = socket2::Socket::from(c);
        sock.set_linger(Some(Duration::ZERO)).unwrap();
        resets.push(sock);
    }
    drop(resets); // 50 RSTs
    exchange(&mut others, b"unaffected\n", &said(b"unaffected"));
    drop(others);
    server.wait_until(
        Duration::from_secs(5),
        "descriptors back at baseline",
        |s| s.fd_count() == baseline,
    );
    assert!(!server.stderr().contains("panicked"));
}

#[test]
fn ten_thousand_concurrent_connections() {
    raise_nofile();
    let server = Server::start(&[]);
    let baseline = server.fd_count();
    let n = 10_000;
    let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(server.connect());
    }
    for round in 0..3 {
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(format!("c{i} r{round}\n").as_bytes()).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let want = said(format!("c{i} r{round}").as_bytes());
            assert_eq!(read_n(c, want.len()), want, "connection {i} round {round}");
        }
    }
    server.wait_until(Duration::from_secs(10), "all connections open", |s| {
        s.fd_count() >= baseline + n
    });
    drop(conns);
    let start = Instant::now();
    while server.fd_count() != baseline {
        if start.elapsed() > Duration::from_secs(20) {
            let log = server.stderr();
            panic!(
                "descriptors: {} open, baseline {baseline}; {} accepted, {} closed; last log lines:\n{}",
                server.fd_count(),
                log.matches(": accepted").count(),
                log.matches(": closed (").count(),
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}
