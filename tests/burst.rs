//! Memory comes back after a burst, black-box: 300 clients each send up to
//! 8 MB of lines and never read (default bounds: every connection pauses
//! at 256 KiB of unsent replies), the server's resident memory climbs by
//! tens of MiB, the clients leave, and within 5 s the server is back within
//! twice its pre-burst resident size plus 1 MiB.

mod common;

use common::*;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

const CLIENTS: usize = 300;
const PER_CLIENT: usize = 8 << 20;
/// A client that could not send for this long is stalled: its server
/// connection is paused and the kernel buffers are full.
const STALL: Duration = Duration::from_millis(500);
const MIB: u64 = 1 << 20;

struct Client {
    stream: TcpStream,
    sent: usize,
}

/// Writes lines until the socket is full or the client has sent its share;
/// true if it wrote anything.
fn push(c: &mut Client, chunk: &[u8], server: &Server) -> bool {
    let mut progressed = false;
    while c.sent < PER_CLIENT {
        match c.stream.write(chunk) {
            Ok(n) => {
                c.sent += n;
                progressed = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("client write failed: {e}; server log:\n{}", server.stderr()),
        }
    }
    progressed
}

#[test]
fn resident_memory_returns_after_a_burst_of_clients_that_do_not_read() {
    raise_nofile();
    // A long idle timeout: paused connections must not be closed for idling
    // while the burst settles on a slow machine.
    let server = Server::start(&["--max-connections", "1000", "--idle-timeout", "60s"]);
    // The pre-burst level: a server that has served one client.
    let mut warm = server.connect();
    exchange(&mut warm, b"warm\n", &said(b"warm"));
    drop(warm);
    std::thread::sleep(Duration::from_millis(200));
    let before = server.rss();

    let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
    let chunk: Vec<u8> = line.iter().copied().cycle().take(64 * 1024).collect();
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(1024);
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| {
            let std_stream = std::net::TcpStream::connect(server.addr()).expect("connect");
            std_stream.set_nonblocking(true).unwrap();
            let mut stream = TcpStream::from_std(std_stream);
            poll.registry()
                .register(&mut stream, Token(i), Interest::WRITABLE)
                .unwrap();
            Client { stream, sent: 0 }
        })
        .collect();
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut last_progress = Instant::now();
    for c in clients.iter_mut() {
        push(c, &chunk, &server);
    }
    while last_progress.elapsed() < STALL && Instant::now() < give_up {
        poll.poll(&mut events, Some(Duration::from_millis(50)))
            .unwrap();
        for event in events.iter() {
            if push(&mut clients[event.token().0], &chunk, &server) {
                last_progress = Instant::now();
            }
        }
        if clients.iter().all(|c| c.sent >= PER_CLIENT) {
            break;
        }
    }
    // The server works through what its kernel buffers still hold until
    // every connection is paused: wait for its memory to settle.
    let mut peak = server.rss();
    let settle_by = Instant::now() + Duration::from_secs(20);
    let mut steady_since = Instant::now();
    while steady_since.elapsed() < Duration::from_secs(1) && Instant::now() < settle_by {
        std::thread::sleep(Duration::from_millis(100));
        let rss = server.rss();
        if rss > peak {
            peak = rss;
            steady_since = Instant::now();
        }
    }
    let sent: usize = clients.iter().map(|c| c.sent).sum();
    eprintln!(
        "burst: {} MiB sent by {CLIENTS} clients; server rss before {} KiB, at peak {} KiB",
        sent >> 20,
        before >> 10,
        peak >> 10
    );
    assert!(
        peak > before + 20 * MIB,
        "the burst did not load the server (peak {peak}, before {before})"
    );

    let held = server.rss();
    let log = server.stderr();
    assert_eq!(
        log.matches("closed (").count(),
        1,
        "only the warm-up client has gone before the burst leaves"
    );
    eprintln!("held: {} KiB", held >> 10);

    // They leave without reading: the server sees resets and frees all.
    drop(clients);
    let left = Instant::now();
    let bound = 2 * before + MIB;
    let mut now_rss = server.rss();
    while now_rss > bound && left.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        now_rss = server.rss();
    }
    eprintln!(
        "after: {} KiB {:?} after the clients left (bound {} KiB)",
        now_rss >> 10,
        left.elapsed(),
        bound >> 10
    );
    assert!(
        now_rss <= bound,
        "resident memory stuck at {} KiB, 5 s after the burst (before: {} KiB)",
        now_rss >> 10,
        before >> 10
    );
    for line in server
        .stderr()
        .lines()
        .filter(|l| l.contains("free memory"))
    {
        eprintln!("server: {line}");
    }
    // The server still serves.
    let mut c = server.connect();
    exchange(&mut c, b"after\n", &said(b"after"));
}
