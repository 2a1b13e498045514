//! The library's `EventLoop` driven in-process over real loopback sockets,
//! without spawning the binary: one loop on a thread, real clients, then a
//! shutdown through the [`LoopHandle`] and `run` returning.

use echoloop::config::Config;
use echoloop::event_loop::{EventLoop, LoopHandle, Shared};
use echoloop::listener;
use echoloop::metrics::{self, CloseReason, Counters};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// One loop serving on 127.0.0.1:0 on its own thread.
struct Running {
    addr: SocketAddr,
    shutdown: LoopHandle,
    thread: JoinHandle<io::Result<()>>,
    counters: Arc<[Arc<Counters>]>,
}

fn start(cfg: Config) -> Running {
    let l = listener::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
    let addr = l.local_addr().unwrap();
    let counters: Arc<[Arc<Counters>]> = vec![Arc::new(Counters::new())].into();
    let shared = Shared {
        cfg: Arc::new(cfg),
        counters: counters.clone(),
        live: Arc::new(AtomicUsize::new(0)),
    };
    let event_loop = EventLoop::new(shared, 0, vec![l], None).unwrap();
    let shutdown = event_loop.handle();
    let thread = thread::spawn(move || event_loop.run());
    Running {
        addr,
        shutdown,
        thread,
        counters,
    }
}

impl Running {
    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Waits until the loop's counters (published once a turn) say `what`.
    fn wait_for(&self, what: &str, done: impl Fn(&metrics::Snapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&metrics::sum(&self.counters)) {
            assert!(Instant::now() < deadline, "not counted in time: {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the loop has counted at least `n` closes for `reason`.
    fn wait_closed(&self, reason: CloseReason, n: u64) {
        self.wait_for(reason.as_str(), |s| s.closed(reason) >= n);
    }

    fn stop(self) {
        self.shutdown.shutdown();
        self.thread.join().unwrap().unwrap();
    }
}

fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn a_turn_answers_pipelined_lines_and_eof_closes() {
    let server = start(Config::default());
    let mut client = server.connect();
    client.write_all(b"one\ntwo\r\nthr").unwrap();
    client.write_all(b"ee").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut all = String::new();
    client.read_to_string(&mut all).unwrap();
    assert_eq!(all, "you said: one!\nyou said: two!\nyou said: three!\n");
    server.wait_closed(CloseReason::Eof, 1);
    server.wait_for("3 lines", |s| s.lines == 3);
    server.stop();
}

#[test]
fn clients_are_served_side_by_side_and_a_reset_harms_no_one() {
    let server = start(Config::default());
    let a = server.connect();
    let mut b = server.connect();
    {
        // `a` resets: SO_LINGER 0 then close sends an RST.
        let a = socket2::SockRef::from(&a);
        a.set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(a);
    b.write_all(b"still here\n").unwrap();
    let mut reader = BufReader::new(b.try_clone().unwrap());
    assert_eq!(read_line(&mut reader), "you said: still here!\n");
    server.wait_closed(CloseReason::Reset, 1);
    drop((reader, b));
    server.wait_closed(CloseReason::Eof, 1);
    server.stop();
}

#[test]
fn over_the_cap_a_client_is_told_busy() {
    let server = start(Config {
        max_connections: 1,
        ..Config::default()
    });
    let mut first = server.connect();
    first.write_all(b"hi\n").unwrap();
    let mut reader = BufReader::new(first.try_clone().unwrap());
    assert_eq!(read_line(&mut reader), "you said: hi!\n");
    let second = server.connect();
    let mut busy = BufReader::new(second);
    assert_eq!(read_line(&mut busy), "error: server busy\n");
    assert_eq!(read_line(&mut busy), "", "then the server's FIN");
    drop((busy, reader, first));
    server.wait_closed(CloseReason::Eof, 1);
    server.wait_closed(CloseReason::Busy, 1);
    server.stop();
}

#[test]
fn shutdown_answers_what_was_sent_then_run_returns() {
    let server = start(Config::default());
    let mut client = server.connect();
    client.write_all(b"ping\n").unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    assert_eq!(read_line(&mut reader), "you said: ping!\n");
    // Sent just before the signal: answered either way, then the FIN.
    client.write_all(b"last\n").unwrap();
    server.shutdown.shutdown();
    assert_eq!(read_line(&mut reader), "you said: last!\n");
    assert_eq!(read_line(&mut reader), "", "then the server's FIN");
    drop(reader);
    drop(client);
    server.thread.join().unwrap().unwrap();
}
