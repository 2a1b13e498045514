//! SPEC §3 "several machines", black-box: a real HAProxy in TCP mode with
//! `send-proxy-v2` in front of two `echoloop --proxy-protocol` instances.
//!
//! HAProxy's health checks also send a PROXY v2 header (the `LOCAL`
//! command) and then a line, and expect its echo: a check only passes when
//! echoloop accepts `LOCAL` headers and serves the connection.
//!
//! Needs the `haproxy` binary (Debian package `haproxy`, installed by
//! `.ci/run`). Every wait is bounded; the bounds are wide because CI
//! machines are shared, 2-core and noisy.

mod common;

use common::*;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long HAProxy and its health checks get to come up.
const STARTUP: Duration = Duration::from_secs(20);
/// How long a log line may take to appear after the event behind it.
const LOG_DELAY: Duration = Duration::from_secs(10);

/// A running HAProxy; killed, and its directory removed, when dropped.
struct Haproxy {
    child: Child,
    /// Holds the config and the stats socket; removed when dropped.
    dir: tempfile::TempDir,
    frontend: SocketAddr,
    output: Arc<Mutex<String>>,
}

impl Haproxy {
    /// Starts HAProxy balancing round-robin over `backends`, with PROXY v2
    /// on traffic and health checks, and waits until the frontend accepts
    /// connections and every backend has passed a full health check.
    fn start(backends: &[SocketAddr]) -> Haproxy {
        let dir = tempfile::Builder::new()
            .prefix("echoloop-haproxy-")
            .tempdir()
            .expect("create HAProxy temp dir");
        let frontend = free_port();
        let mut cfg = format!(
            "global\n\
             \x20   maxconn 256\n\
             \x20   stats socket {stats} mode 600 level admin\n\
             \n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 1s\n\
             \x20   timeout client 10s\n\
             \x20   timeout server 10s\n\
             \x20   timeout check 2s\n\
             \n\
             frontend fe\n\
             \x20   bind {frontend}\n\
             \x20   default_backend echoloop\n\
             \n\
             backend echoloop\n\
             \x20   balance roundrobin\n\
             \x20   option tcp-check\n\
             \x20   tcp-check send health\\n\n\
             \x20   tcp-check expect string \"you said: health!\"\n",
            stats = dir.path().join("stats.sock").display(),
        );
        for (i, addr) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "    server s{i} {addr} send-proxy-v2 check check-send-proxy inter 200ms\n"
            ));
        }
        let cfg_path = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, &cfg).expect("write HAProxy config");

        let mut child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy (Debian package `haproxy`; `.ci/run` installs it)");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let mut proxy = Haproxy {
            child,
            dir,
            frontend,
            output,
        };
        proxy.wait_ready(backends.len());
        proxy
    }

    fn wait_ready(&mut self, backends: usize) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("haproxy exited ({status}):\n{}", self.output());
            }
            let accepting = TcpStream::connect(self.frontend).is_ok();
            let states = self.check_states();
            let healthy = states.iter().filter(|s| s.as_str() == "L7OK").count();
            if accepting && healthy == backends {
                return;
            }
            assert!(
                start.elapsed() < STARTUP,
                "haproxy not ready: frontend accepting {accepting}, checks {states:?}\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last health-check result of each server (`L7OK`, `L4CON`,
    /// `L7RSP`, ...) from the stats socket; empty until the socket is up.
    fn check_states(&self) -> Vec<String> {
        let stat = self.show_stat();
        let mut lines = stat.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let Some(col) = header
            .trim_start_matches("# ")
            .split(',')
            .position(|f| f == "check_status")
        else {
            return Vec::new();
        };
        lines
            .filter(|l| l.starts_with("echoloop,s"))
            .map(|l| {
                let status = l.split(',').nth(col).unwrap_or("");
                status.trim_start_matches("* ").to_string()
            })
            .collect()
    }

    /// `show stat` on the stats socket, as CSV; empty on any error.
    fn show_stat(&self) -> String {
        let Ok(mut s) = UnixStream::connect(self.dir.path().join("stats.sock")) else {
            return String::new();
        };
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut out = String::new();
        if s.write_all(b"show stat\n").is_err() || s.read_to_string(&mut out).is_err() {
            return String::new();
        }
        out
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn connect(&self) -> TcpStream {
        connect(self.frontend)
    }

    /// Panics if a server went down at any point (HAProxy reports it).
    fn assert_no_server_went_down(&self) {
        let out = self.output();
        assert!(!out.contains(" is DOWN"), "a backend went DOWN:\n{out}");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap()
}

/// Two `echoloop --proxy-protocol` instances and HAProxy in front of them.
fn setup() -> (Server, Server, Haproxy) {
    let a = Server::start(&["--proxy-protocol"]);
    let b = Server::start(&["--proxy-protocol"]);
    let proxy = Haproxy::start(&[a.addr(), b.addr()]);
    (a, b, proxy)
}

/// Whether `log` contains `client ADDR` with nothing more to the port (so
/// `:5432` does not match `:54321`).
fn names_client(log: &str, client: SocketAddr) -> bool {
    let needle = format!("client {client}");
    log.match_indices(&needle).any(|(i, _)| {
        !log[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Which of `servers` logged `client ADDR`, waiting up to [`LOG_DELAY`] for
/// at least one; panics with both logs if none did.
fn who_logged(servers: &[&Server], client: SocketAddr) -> Vec<usize> {
    let start = Instant::now();
    loop {
        let found: Vec<usize> = servers
            .iter()
            .enumerate()
            .filter(|(_, s)| names_client(&s.stderr(), client))
            .map(|(i, _)| i)
            .collect();
        if !found.is_empty() {
            return found;
        }
        if start.elapsed() > LOG_DELAY {
            let logs: Vec<String> = servers.iter().map(|s| s.stderr()).collect();
            panic!("no instance logged `client {client}`; logs:\n{logs:#?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn echoes_through_haproxy_on_both_instances() {
    let (a, b, proxy) = setup();
    let mut clients: Vec<TcpStream> = (0..20).map(|_| proxy.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..3 {
            let line = format!("client {i} line {j}");
            exchange(c, format!("{line}\n").as_bytes(), &said(line.as_bytes()));
        }
    }
    // Pipelined lines in one write, split replies in one read.
    for c in clients.iter_mut() {
        exchange(
            c,
            b"one\ntwo\r\nthree\n",
            b"you said: one!\nyou said: two!\nyou said: three!\n",
        );
    }

    // Round-robin spread the clients: each instance served some of them,
    // and each client was served by exactly one instance.
    let mut served = [0usize; 2];
    for c in &clients {
        let who = who_logged(&[&a, &b], c.local_addr().unwrap());
        assert_eq!(who.len(), 1, "both instances name {c:?}");
        served[who[0]] += 1;
    }
    assert!(
        served[0] > 0 && served[1] > 0,
        "one instance got no clients: {served:?}"
    );
    for (name, s) in [("a", &a), ("b", &b)] {
        let log = s.stderr();
        assert!(
            log.contains("accepted"),
            "instance {name} logged no accepted connection:\n{log}"
        );
    }

    // A client's EOF still gets its last (unterminated) line answered.
    let mut last = proxy.connect();
    last.write_all(b"bye").unwrap();
    last.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut last), said(b"bye"));

    proxy.assert_no_server_went_down();
}

#[test]
fn instances_log_the_real_client_address() {
    let (a, b, proxy) = setup();
    for i in 0..4 {
        let mut c = proxy.connect();
        let client = c.local_addr().unwrap();
        let line = format!("who am I {i}");
        exchange(
            &mut c,
            format!("{line}\n").as_bytes(),
            &said(line.as_bytes()),
        );
        let who = who_logged(&[&a, &b], client);
        assert_eq!(who.len(), 1, "both instances name client {client}");
        // The socket peer is HAProxy's own outgoing connection, not the
        // client: the instance learned the address from the header.
        let log = [&a, &b][who[0]].stderr();
        let line = log
            .lines()
            .find(|l| names_client(l, client))
            .expect("the line naming the client");
        assert!(
            line.contains("PROXY header names client"),
            "unexpected log line {line:?}"
        );
        assert!(
            !line.contains(&format!("{client}: ")),
            "the socket peer is the client itself? {line:?}"
        );
    }
    proxy.assert_no_server_went_down();
}

#[test]
fn connection_without_proxy_header_is_closed() {
    let server = Server::start(&["--proxy-protocol"]);
    let mut c = server.connect();
    // The server may already have closed when the write lands.
    if let Err(e) = c.write_all(b"hello\n") {
        assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "write: {e}"
        );
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "connection without a PROXY header was not closed: {e}\n{}",
                server.stderr()
            ),
        }
    }
    assert!(
        !String::from_utf8_lossy(&got).contains("you said"),
        "answered without a PROXY header: {:?}",
        String::from_utf8_lossy(&got)
    );

    // The instance is still fine for a client that does send a header.
    let mut ok = server.connect();
    ok.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 1234\r\n")
        .unwrap();
    exchange(&mut ok, b"hello\n", &said(b"hello"));
    server.wait_until(LOG_DELAY, "the v1 client address in the log", |s| {
        names_client(&s.stderr(), "192.0.2.7:40000".parse().unwrap())
    });
}
