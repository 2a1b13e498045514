//! Test helpers: small line-echo servers on 127.0.0.1:0 (std threads and
//! std::net) that answer correctly or misbehave in one chosen way, and a
//! runner for the real `echoloop-load` binary.

#![allow(dead_code)] // each test file uses a different part

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// How a test server treats the line with index `FAULT_AT` (0-based) of
/// every connection; all other lines get the correct reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Every reply correct.
    Correct,
    /// No reply for the faulty line.
    Drop,
    /// The faulty line's reply is sent after the next line's reply.
    Reorder,
    /// The faulty line's reply is sent twice.
    Duplicate,
    /// One byte of the faulty line's reply is changed.
    Alter,
    /// After the reply before the faulty line, the server closes.
    CloseEarly,
    /// The server greets each connection with a line nobody asked for.
    Greet,
    /// Every reply correct, but the whole server stalls (answers nothing)
    /// from `STALL_FROM` to `STALL_FROM + STALL` after it started.
    Stall,
    /// Every reply correct, but the server handles one line at a time over
    /// all connections and spends `SLOW_PER_LINE` on each: it keeps up with
    /// at most 1000 lines/s.
    Slow,
    /// A final line without `\n` (before a half-close) gets no reply.
    DropTail,
    /// Replies are queued without bound (up to `UNBOUNDED_CAP`) for a
    /// client that does not read them, by a reader and a writer thread.
    Unbounded,
    /// While any connection pipelines (another whole line is waiting when
    /// one is read), and for `STARVE` after, the others get no reply: a
    /// firehose starves them.
    Unfair,
}

/// How long the `Unfair` server keeps the others waiting after a firehose
/// batch.
pub const STARVE: Duration = Duration::from_secs(3);

/// How long the `Slow` server works on each line.
pub const SLOW_PER_LINE: Duration = Duration::from_millis(1);

/// How much the `Unbounded` server queues at most, so a test cannot eat
/// the machine's memory: far above what a bounded server may hold.
pub const UNBOUNDED_CAP: usize = 64 << 20;

/// State shared by the connections of one test server.
#[derive(Debug, Default)]
struct Shared {
    /// `Unfair`: no reply to a non-pipelining connection before this.
    starve_until: Mutex<Option<Instant>>,
    /// `Unbounded`: reply bytes queued and not yet written, all connections.
    queued: AtomicUsize,
    /// `Slow`: held while a line is worked on.
    one_at_a_time: Mutex<()>,
}

/// When the `Stall` server stops answering, counted from its start.
pub const STALL_FROM: Duration = Duration::from_millis(500);
/// How long the `Stall` server answers nothing.
pub const STALL: Duration = Duration::from_secs(1);

/// The line index the fault hits.
pub const FAULT_AT: usize = 2;
/// How long any test server thread lives at most.
const SERVER_LIFETIME: Duration = Duration::from_secs(30);

/// The correct reply to one received line (terminator included).
pub fn reply(line: &[u8], raw: bool) -> Vec<u8> {
    if raw {
        return line.to_vec();
    }
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    [b"you said: ", content, b"!\n"].concat()
}

/// A server's settings.
#[derive(Clone, Copy, Debug)]
pub struct ServerSpec {
    pub behaviour: Behaviour,
    /// Raw echo instead of the prefix reply.
    pub raw: bool,
    /// Write every reply one byte at a time, flushing after each byte.
    pub one_byte: bool,
}

impl ServerSpec {
    pub fn new(behaviour: Behaviour) -> Self {
        ServerSpec {
            behaviour,
            raw: false,
            one_byte: false,
        }
    }
}

/// Starts a server on 127.0.0.1:0; it accepts for at most
/// `SERVER_LIFETIME` and serves each connection on its own thread.
pub fn start(spec: ServerSpec) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let shared = Arc::new(Shared::default());
    thread::spawn(move || {
        let end = started + SERVER_LIFETIME;
        while Instant::now() < end {
            match listener.accept() {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    thread::spawn(move || {
                        let _ = if spec.behaviour == Behaviour::Unbounded {
                            serve_unbounded(stream, &shared)
                        } else {
                            serve(stream, spec, started, &shared)
                        };
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    addr
}

fn send(stream: &mut TcpStream, bytes: &[u8], one_byte: bool) -> std::io::Result<()> {
    if one_byte {
        for b in bytes {
            stream.write_all(std::slice::from_ref(b))?;
            stream.flush()?;
        }
        Ok(())
    } else {
        stream.write_all(bytes)
    }
}

/// `Unbounded`: a reader thread turns lines into replies on a queue that
/// only `UNBOUNDED_CAP` limits; a writer thread drains it.
fn serve_unbounded(stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let writer_shared = shared.clone();
    thread::spawn(move || {
        for r in rx {
            writer_shared.queued.fetch_sub(r.len(), Ordering::Relaxed);
            if out.write_all(&r).is_err() {
                return;
            }
        }
    });
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut rd = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if rd.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        while shared.queued.load(Ordering::Relaxed) > UNBOUNDED_CAP {
            thread::sleep(Duration::from_millis(10));
        }
        let r = reply(&line, false);
        shared.queued.fetch_add(r.len(), Ordering::Relaxed);
        if tx.send(r).is_err() {
            return Ok(());
        }
    }
}

/// Serves one connection according to `spec` until EOF, an error, or the
/// read timeout; the server started at `started`.
fn serve(
    stream: TcpStream,
    spec: ServerSpec,
    started: Instant,
    shared: &Shared,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = stream.try_clone()?;
    let mut rd = BufReader::new(stream);
    if spec.behaviour == Behaviour::Greet {
        send(&mut out, b"hello there\n", spec.one_byte)?;
    }
    let mut held: Option<Vec<u8>> = None;
    let mut line = Vec::new();
    for index in 0.. {
        line.clear();
        if rd.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let mut r = reply(&line, spec.raw);
        let faulty = index == FAULT_AT;
        match spec.behaviour {
            Behaviour::Drop if faulty => continue,
            Behaviour::Reorder if faulty => {
                held = Some(r);
                continue;
            }
            Behaviour::Duplicate if faulty => r = [r.clone(), r].concat(),
            Behaviour::Alter if faulty => {
                let mid = r.len() / 2;
                r[mid] ^= 0x20;
            }
            Behaviour::DropTail if !line.ends_with(b"\n") => continue,
            Behaviour::Slow => {
                let _busy = shared.one_at_a_time.lock().unwrap();
                thread::sleep(SLOW_PER_LINE);
            }
            Behaviour::Unfair if rd.buffer().contains(&b'\n') => {
                *shared.starve_until.lock().unwrap() = Some(Instant::now() + STARVE);
            }
            Behaviour::Unfair => loop {
                // Wait while any firehose keeps the server busy.
                let until = *shared.starve_until.lock().unwrap();
                match until {
                    Some(t) if t > Instant::now() => thread::sleep(t - Instant::now()),
                    _ => break,
                }
            },
            Behaviour::Stall => {
                let (from, to) = (started + STALL_FROM, started + STALL_FROM + STALL);
                let now = Instant::now();
                if from <= now && now < to {
                    thread::sleep(to - now);
                }
            }
            Behaviour::CloseEarly if faulty => {
                // FIN, then read until the client closes, so no unread
                // input turns the close into a reset.
                out.shutdown(Shutdown::Write)?;
                let mut sink = Vec::new();
                while rd.read_until(b'\n', &mut sink)? > 0 {
                    sink.clear();
                }
                return Ok(());
            }
            _ => {}
        }
        send(&mut out, &r, spec.one_byte)?;
        if let Some(h) = held.take() {
            send(&mut out, &h, spec.one_byte)?;
        }
    }
    Ok(())
}

/// Runs `echoloop-load` against `addr` with extra arguments (plus --quiet).
pub fn load(addr: SocketAddr, args: &[&str]) -> Output {
    let target = addr.to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_echoloop-load"));
    cmd.args(["--target", &target, "--quiet"]).args(args);
    cmd.output().expect("run echoloop-load")
}

/// Runs `echoloop-load` like `load` and checks that it ended within
/// `limit` (a run that should stop early, not run its window).
pub fn load_within(addr: SocketAddr, args: &[&str], limit: Duration) -> Output {
    let started = Instant::now();
    let out = load(addr, args);
    assert!(
        started.elapsed() < limit,
        "ran for {:?}, limit {limit:?}: {}",
        started.elapsed(),
        describe(&out)
    );
    out
}

/// A local address nothing listens on (a listener bound, then dropped).
pub fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The single JSON object printed with --json.
pub fn json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {stdout}"));
    assert!(v.is_object(), "not a JSON object: {stdout}");
    v
}

/// An error count from the JSON report.
pub fn errors(v: &serde_json::Value, kind: &str) -> u64 {
    v["errors"][kind]
        .as_u64()
        .unwrap_or_else(|| panic!("no errors.{kind} in {v}"))
}

/// Describes a run for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
