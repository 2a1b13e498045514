//! Idle timeouts at scale, black-box: with `--idle-timeout 1s`, 10,000
//! connections that each send one line and then stay quiet are each closed
//! no earlier than 1 s and no later than 1.5 s after their line. The loop
//! sleeps until the next deadline that is due instead of ticking, so this is
//! the test that would catch a deadline it slept through (a late close) or a
//! tick rounded the wrong way (an early one).
//!
//! The bounds are wide for a shared 2-core machine; the server's own error
//! is one 20 ms tick.

mod common;

use common::*;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

const CONNS: usize = 10_000;
const IDLE: Duration = Duration::from_secs(1);
const LATEST: Duration = Duration::from_millis(1500);

/// One client: when it sent its line, and when it saw the server's FIN.
struct Client {
    stream: TcpStream,
    sent: Instant,
    replied: usize,
    closed: Option<Instant>,
}

/// Reads whatever `c` has; notes the time of its EOF.
fn drain(c: &mut Client, now: Instant) {
    let mut buf = [0u8; 64];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                c.closed.get_or_insert(now);
                return;
            }
            Ok(n) => c.replied += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("client read failed (reset instead of an idle close?): {e}"),
        }
    }
}

/// Waits up to `timeout` for events and drains the clients they name.
fn serve(poll: &mut Poll, events: &mut Events, clients: &mut [Client], timeout: Duration) {
    poll.poll(events, Some(timeout)).expect("poll");
    let now = Instant::now();
    for event in events.iter() {
        drain(&mut clients[event.token().0], now);
    }
}

#[test]
fn ten_thousand_idle_connections_close_on_time() {
    assert!(
        raise_nofile() > CONNS as u64 + 100,
        "open-file limit too low"
    );
    let server = Server::start_with_nofile(&["--idle-timeout", "1s"], 20_000);
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(1024);
    let mut clients: Vec<Client> = Vec::with_capacity(CONNS);
    let started = Instant::now();
    for i in 0..CONNS {
        let std_stream = std::net::TcpStream::connect(server.addr()).expect("connect");
        (&std_stream).write_all(b"x\n").expect("send the line");
        let sent = Instant::now();
        std_stream.set_nonblocking(true).unwrap();
        let mut stream = TcpStream::from_std(std_stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)
            .unwrap();
        clients.push(Client {
            stream,
            sent,
            replied: 0,
            closed: None,
        });
        if i % 64 == 63 {
            // Keep watching the early ones while the rest connect.
            serve(&mut poll, &mut events, &mut clients, Duration::ZERO);
        }
    }
    let opened = started.elapsed();
    let give_up = Instant::now() + LATEST + Duration::from_secs(3);
    while clients.iter().any(|c| c.closed.is_none()) && Instant::now() < give_up {
        serve(
            &mut poll,
            &mut events,
            &mut clients,
            Duration::from_millis(50),
        );
    }

    let reply = said(b"x").len();
    let mut waits: Vec<Duration> = Vec::with_capacity(CONNS);
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.replied, reply, "client {i} got its reply");
        let closed = c
            .closed
            .unwrap_or_else(|| panic!("client {i} still open {LATEST:?} after its line"));
        waits.push(closed - c.sent);
    }
    waits.sort_unstable();
    let (first, median, last) = (waits[0], waits[CONNS / 2], waits[CONNS - 1]);
    eprintln!(
        "{CONNS} connections opened in {opened:?}; closed after their line: first {first:?}, median {median:?}, last {last:?}"
    );
    assert!(first >= IDLE, "closed early: {first:?} after its line");
    assert!(last <= LATEST, "closed late: {last:?} after its line");
    // The log is read on a thread of its own: wait for it to catch up with
    // what the clients saw.
    let idle_closes = |s: &Server| s.stderr().matches("closed (idle)").count();
    server.wait_until(Duration::from_secs(10), "every idle close logged", |s| {
        idle_closes(s) >= CONNS
    });
    assert_eq!(idle_closes(&server), CONNS, "every close was an idle close");
}
