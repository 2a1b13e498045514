//! SPEC §3, black-box: connection cap, descriptor exhaustion, signals,
//! several loops, metrics and the PROXY protocol.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

// ----- connection cap -------------------------------------------------------

#[test]
fn over_the_cap_a_client_is_told_busy_and_room_frees_up() {
    let server = Server::start(&["--max-connections", "3"]);
    let mut held: Vec<TcpStream> = (0..3).map(|_| server.connect()).collect();
    for c in held.iter_mut() {
        exchange(c, b"in\n", &said(b"in"));
    }
    let mut extra = server.connect();
    assert_eq!(read_to_eof(&mut extra), b"error: server busy\n");
    // A busy client that is still sending gets its error line too.
    let mut eager = server.connect();
    let _ = eager.write_all(b"hello\nhello\n");
    assert_eq!(read_to_eof(&mut eager), b"error: server busy\n");
    drop(held.pop());
    let start = Instant::now();
    loop {
        let mut c = server.connect();
        c.write_all(b"again\n").unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        if &buf[..n] == said(b"again").as_slice() {
            break;
        }
        assert_eq!(&buf[..n], b"error: server busy\n");
        assert!(start.elapsed() < Duration::from_secs(5), "room never freed");
        thread::sleep(Duration::from_millis(20));
    }
}

// ----- descriptor exhaustion --------------------------------------------------

#[test]
fn out_of_descriptors_pauses_accepting_without_spinning() {
    raise_nofile();
    // The cap is set for 1000 descriptors, then the limit is lowered to 64
    // under the running server (as `prlimit --pid` would): accept runs into
    // EMFILE before the cap is reached. (Asked for at start, such a cap
    // would be lowered to fit the limit.)
    let server = Server::start_with_nofile(&["--max-connections", "900"], 1000);
    lower_nofile_of(server.pid(), 64);
    let mut flood: Vec<TcpStream> = Vec::new();
    for _ in 0..150 {
        flood.push(
            TcpStream::connect(server.addr())
                .unwrap_or_else(|e| panic!("connect {}: {e}\n{}", flood.len(), server.stderr())),
        );
    }
    server.wait_until(Duration::from_secs(5), "the EMFILE warning", |s| {
        s.stderr().contains("pausing accepts")
    });
    // While it is out of descriptors with clients queued, it must not spin.
    let cpu_before = server.cpu_time();
    thread::sleep(Duration::from_millis(1500));
    let burned = server.cpu_time() - cpu_before;
    assert!(
        burned < Duration::from_millis(300),
        "server burned {burned:?} of CPU in 1.5 s while out of descriptors"
    );
    // One warning per episode, not one per attempt.
    assert_eq!(server.stderr().matches("pausing accepts").count(), 1);
    // The flood goes away: the server resumes by itself.
    drop(flood);
    let start = Instant::now();
    loop {
        let mut c = server.connect();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        if c.write_all(b"back\n").is_ok() {
            let mut buf = vec![0u8; said(b"back").len()];
            if c.read_exact(&mut buf).is_ok() {
                assert_eq!(buf, said(b"back"));
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never resumed");
    }
}

// ----- signals -----------------------------------------------------------------

#[test]
fn sigterm_flushes_every_reply_then_closes_and_exits_0() {
    let mut server = Server::start(&[]);
    let addr = server.addr();
    let mut clients: Vec<TcpStream> = (0..5).map(|_| server.connect()).collect();
    let mut expected = Vec::new();
    for i in 0..2000 {
        expected.extend_from_slice(&said(format!("line {i}").as_bytes()));
    }
    for c in clients.iter_mut() {
        let input: Vec<u8> = (0..2000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        c.write_all(&input).unwrap();
    }
    // Replies are in flight (nobody has read yet) when the signal comes.
    server.signal(libc::SIGTERM);
    for c in clients.iter_mut() {
        let got = read_to_eof(c);
        assert!(
            got == expected,
            "got {} of {} bytes",
            got.len(),
            expected.len()
        );
    }
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
}

#[test]
fn sigterm_on_an_idle_server_exits_0_promptly() {
    // Several times: a lost wake-up between the loop threads and the main
    // thread shows up only now and then.
    for _ in 0..5 {
        let mut server = Server::start(&["--threads", "2"]);
        server.signal(libc::SIGTERM);
        assert_eq!(server.wait_exit(Duration::from_secs(3)), Some(0));
    }
}

/// A client that sends 16 MiB of empty lines and reads none of the
/// replies, so the server has output it cannot flush; returned once its
/// backlog has built up.
fn flood_without_reading(server: &Server) -> TcpStream {
    let c = server.connect();
    let mut w = c.try_clone().unwrap();
    thread::spawn(move || {
        let block = vec![b'\n'; 1 << 16];
        for _ in 0..256 {
            if w.write_all(&block).is_err() {
                break;
            }
        }
    });
    thread::sleep(Duration::from_millis(300));
    c
}

#[test]
fn shutdown_timeout_drops_clients_that_do_not_read() {
    let mut server = Server::start(&["--shutdown-timeout", "500ms"]);
    let c = flood_without_reading(&server);
    let start = Instant::now();
    server.signal(libc::SIGINT);
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    drop(c);
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::start(&["--shutdown-timeout", "60s"]);
    let c = flood_without_reading(&server);
    server.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(c);
}

// ----- several loops -----------------------------------------------------------

#[test]
fn threads_2_serves_connections_on_both_loops() {
    let server = Server::start(&["--threads", "2"]);
    let mut conns: Vec<TcpStream> = (0..64).map(|_| server.connect()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let line = format!("conn {i}");
        exchange(c, format!("{line}\n").as_bytes(), &said(line.as_bytes()));
    }
    server.wait_until(Duration::from_secs(5), "both loops accepting", |s| {
        let log = s.stderr();
        log.contains("accepted by loop 0") && log.contains("accepted by loop 1")
    });
}

// ----- metrics -------------------------------------------------------------------

/// Waits until the metric reads `value`.
fn wait_metric(server: &Server, name: &str, value: u64) {
    let addr = server.metrics.unwrap();
    server.wait_until(Duration::from_secs(5), name, |_| {
        metric(&http_get(addr, "/metrics"), name) == value
    });
}

#[test]
fn metrics_count_connections_lines_bytes_and_close_reasons() {
    let server = Server::start_raw(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--max-line",
            "8",
            "--max-connections",
            "3",
        ],
        2,
    );
    let metrics = server.metrics.expect("Metrics on line");
    // eof: two lines, then EOF.
    let mut a = server.connect();
    a.write_all(b"one\ntwo\n").unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut a);
    // too_long
    let mut b = server.connect();
    b.write_all(b"123456789\n").unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut b);
    // The server closes once it has read our EOF too.
    wait_metric(
        &server,
        "echoloop_connections_closed_total{reason=\"too_long\"}",
        1,
    );
    // open: three held, the fourth is busy.
    let mut held: Vec<TcpStream> = (0..3).map(|_| server.connect()).collect();
    for c in held.iter_mut() {
        exchange(c, b"hi\n", &said(b"hi"));
    }
    let mut busy = server.connect();
    assert_eq!(read_to_eof(&mut busy), b"error: server busy\n");
    // The busy connection lingers until its client closes too.
    drop(busy);
    wait_metric(
        &server,
        "echoloop_connections_closed_total{reason=\"busy\"}",
        1,
    );

    let page = http_get(metrics, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("# TYPE echoloop_connections_open gauge"));
    assert_eq!(metric(&page, "echoloop_connections_open"), 3);
    assert_eq!(metric(&page, "echoloop_connections_accepted_total"), 6);
    assert_eq!(
        metric(&page, "echoloop_connections_closed_total{reason=\"eof\"}"),
        1
    );
    assert_eq!(
        metric(
            &page,
            "echoloop_connections_closed_total{reason=\"too_long\"}"
        ),
        1
    );
    assert_eq!(
        metric(&page, "echoloop_connections_closed_total{reason=\"busy\"}"),
        1
    );
    assert_eq!(
        metric(&page, "echoloop_connections_closed_total{reason=\"idle\"}"),
        0
    );
    assert_eq!(metric(&page, "echoloop_lines_total"), 5);
    assert_eq!(
        metric(&page, "echoloop_received_bytes_total"),
        (8 + 10 + 3 * 3) as u64
    );
    let sent = said(b"one").len() * 2
        + "error: line too long (max 8 bytes)\n".len()
        + 3 * said(b"hi").len()
        + "error: server busy\n".len();
    assert_eq!(metric(&page, "echoloop_sent_bytes_total"), sent as u64);

    let other = http_get(metrics, "/other");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[test]
fn metrics_answer_head_and_refuse_other_methods_with_405() {
    let server = Server::start_raw(&["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"], 2);
    let addr = server.metrics.unwrap();
    let get = http(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let (get_head, page) = get.split_once("\r\n\r\n").unwrap();
    assert!(page.contains("echoloop_connections_open 0"), "{get}");

    // HEAD: the same status and headers, Content-Length of the page, no body.
    let head = http(addr, "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(head, format!("{get_head}\r\n\r\n"));
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", page.len())),
        "{head}"
    );

    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let answer = http(
            addr,
            &format!("{method} /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"),
        );
        assert!(
            answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{method}: {answer}"
        );
        assert!(
            answer.contains("\r\nAllow: GET, HEAD\r\n"),
            "{method}: {answer}"
        );
    }
    // Another path is still not found, whatever the method.
    let answer = http(addr, "POST /other HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[test]
fn a_metrics_request_that_never_ends_is_closed() {
    let server = Server::start_raw(&["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"], 2);
    let mut c = connect(server.metrics.unwrap());
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // The head never ends: closed after the 5 s request timeout.
    let took = wait_closed(&mut c);
    assert!(took >= Duration::from_secs(4), "{took:?}");
    assert!(took < Duration::from_secs(9), "{took:?}");
}

// ----- PROXY protocol ---------------------------------------------------------------

#[test]
fn proxy_v1_header_split_across_segments_names_the_client() {
    let server = Server::start(&["--proxy-protocol"]);
    let mut c = server.connect();
    c.set_nodelay(true).unwrap();
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5678 1234\r\n";
    for piece in header.chunks(7) {
        c.write_all(piece).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    exchange(&mut c, b"through\n", &said(b"through"));
    server.wait_until(Duration::from_secs(5), "the real client in the log", |s| {
        s.stderr().contains("client 192.0.2.7:5678")
    });
}

#[test]
fn proxy_header_and_first_line_in_one_segment() {
    let server = Server::start(&["--proxy-protocol"]);
    let mut c = server.connect();
    exchange(
        &mut c,
        b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1234\r\nfirst\n",
        &said(b"first"),
    );
}

#[test]
fn proxy_v2_local_health_check_is_accepted() {
    let server = Server::start(&["--proxy-protocol"]);
    let mut c = server.connect();
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    c.write_all(&header).unwrap();
    exchange(&mut c, b"health\n", &said(b"health"));
}

#[test]
fn missing_or_invalid_proxy_header_closes_the_connection() {
    let server = Server::start_raw(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--proxy-protocol",
            "--proxy-header-timeout",
            "300ms",
        ],
        2,
    );
    let mut plain = server.connect();
    plain.write_all(b"hello\n").unwrap();
    assert_eq!(read_to_eof(&mut plain), b"");
    // A header that never completes is closed after the header timeout.
    let mut slow = server.connect();
    slow.write_all(b"PROXY TCP4 192.0.2.7").unwrap();
    let took = wait_closed(&mut slow);
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // EOF before any header.
    let mut quiet = server.connect();
    quiet.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut quiet), b"");
    // An invalid header.
    let mut invalid = server.connect();
    invalid.write_all(b"PROXY TCP9 what\r\n").unwrap();
    assert_eq!(read_to_eof(&mut invalid), b"");
    wait_metric(
        &server,
        "echoloop_connections_closed_total{reason=\"proxy\"}",
        4,
    );
    let page = http_get(server.metrics.unwrap(), "/metrics");
    assert_eq!(
        metric(&page, "echoloop_connections_closed_total{reason=\"error\"}"),
        0
    );
}

#[test]
fn connections_without_proxy_header_are_warned_about_once_with_a_count() {
    let server = Server::start_raw(
        &[
            "--listen",
            "127.0.0.1:0",
            "--proxy-protocol",
            "--log-level",
            "info",
        ],
        1,
    );
    let warning = "without a valid PROXY header in the last 10 s: is the balancer sending one?";
    // The first one is reported at once, at a level shown by default.
    let mut first = server.connect();
    first.write_all(b"hello\n").unwrap();
    wait_closed(&mut first);
    server.wait_until(Duration::from_secs(5), "the PROXY warning", |s| {
        s.stderr().contains(&format!("1 connection {warning}"))
    });
    // The next ones, within 10 s, are only counted.
    for _ in 0..5 {
        let mut c = server.connect();
        c.write_all(b"hello\n").unwrap();
        wait_closed(&mut c);
    }
    thread::sleep(Duration::from_millis(300));
    let log = server.stderr();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(log.contains("WARN"), "{log}");
}
