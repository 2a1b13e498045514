//! Checks of the connection state machine, [`echoloop::conn::Conn`], for
//! the `connection` target: a script of what the client and the kernel do
//! (data, `WouldBlock`, EOF, reset, `EINTR`, writes that take any amount,
//! time passing, a shutdown), played against one connection the way the
//! event loop drives it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use echoloop::admission::Kind;
use echoloop::config::Config;
use echoloop::conn::{CloseReason, Conn, Cx, Hints, Io, Next, Scratch, Spare, Tally, Timeouts};
use echoloop::line::Mode;
use echoloop::timer::{Clock, Tick};

use super::model;

/// The scripted socket: what reads return, how much writes may take.
#[derive(Default)]
struct Socket {
    reads: VecDeque<io::Result<Vec<u8>>>,
    /// Bytes writes may still take this event; then `WouldBlock`.
    room: usize,
    /// The client reset the connection: reads and writes fail.
    reset: bool,
    /// The client's EOF is queued (or read): reads after it return 0.
    ended: bool,
    written: Vec<u8>,
    write_shut: bool,
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.reads.pop_front() {
            Some(Ok(mut bytes)) => {
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                if n < bytes.len() {
                    self.reads.push_front(Ok(bytes.split_off(n)));
                }
                Ok(n)
            }
            Some(Err(e)) => Err(e),
            None if self.reset => Err(io::ErrorKind::ConnectionReset.into()),
            None if self.ended => Ok(0),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(!self.write_shut, "write after shutdown(SHUT_WR)");
        if self.reset {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        self.written.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Io for Socket {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.write_shut = true;
        Ok(())
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 9)))
    }
}

/// The limits of the fuzzed connection, small so that every bound is hit.
fn config(flags: u8, bounds: u8) -> Config {
    Config {
        mode: if flags & 1 == 1 {
            Mode::Raw
        } else {
            Mode::Prefix
        },
        max_line: usize::from((flags >> 1) & 15),
        max_pending_output: 1 + usize::from(bounds & 63),
        read_budget: 1 + usize::from(bounds >> 6) * 16,
        shutdown_read_limit: 64,
        linger_bytes: 32,
        idle_timeout: Some(Duration::from_secs(10)),
        ..Config::default()
    }
}

/// The script: byte 0 chooses mode and `max_line` (as in the framing
/// target), byte 1 the output bound and read budget; then each op is one
/// byte (its low 3 bits the kind, the rest an argument):
///
/// - 0: the client sends `arg` bytes, taken from the script;
/// - 1: `EINTR` on the next read;
/// - 2: the client half-closes; 3: the client resets;
/// - 4: a readiness event, writes may take `arg * 3` bytes;
/// - 5: time passes (`arg * 250 ms`) and the wheel fires if due;
/// - 6: the server shuts down (writes may take `arg * 3` bytes);
/// - 7: an event the poller flags with the FIN (EPOLLRDHUP).
///
/// Checked: never a panic; what the connection wrote is always a prefix of
/// the model's replies to everything the client sent; buffered bytes stay
/// within `max_line` + `max_pending_output` + one read (plus the reply
/// that crosses the bound); every deadline it asks for is in the future;
/// it closes for `eof` only with everything written; once it asked to
/// close it is never driven again (the loop drops it), so it writes nothing
/// more.
pub fn check_connection(input: &[u8]) {
    let [flags, bounds, ops @ ..] = input else {
        return;
    };
    let mut script: &[u8] = ops;
    let cfg = config(*flags, *bounds);
    let clock = Clock::new(cfg.timer_tick(), Instant::now());
    let timeouts = Timeouts::new(&cfg, &clock);
    let mut now = Tick::FIRST;
    let mut conn = Conn::new(Kind::Client, now, &timeouts);
    let mut socket = Socket::default();
    let mut stream = Vec::new();
    let mut read_buf = vec![0u8; cfg.read_budget];
    let mut spare = Spare::default();
    let mut tally = Tally::default();
    let longest_reply = cfg.max_line + 16 + "error: line too long (max 99 bytes)\n".len();

    while let [op, rest @ ..] = script {
        let op = *op;
        script = rest;
        let arg = usize::from(op >> 3);
        let verdict = match op & 7 {
            0 => {
                let (bytes, rest) = script.split_at(arg.min(script.len()));
                script = rest;
                // (An empty read would be an EOF, op 2's job.)
                if !socket.ended && !socket.reset && !bytes.is_empty() {
                    stream.extend_from_slice(bytes);
                    socket.reads.push_back(Ok(bytes.to_vec()));
                }
                continue;
            }
            1 => {
                socket
                    .reads
                    .push_back(Err(io::ErrorKind::Interrupted.into()));
                continue;
            }
            2 => {
                socket.ended = true;
                continue;
            }
            3 => {
                socket.reset = true;
                socket.reads.clear();
                continue;
            }
            5 => {
                now = now.after(clock.span(Duration::from_millis(250 * arg as u64)));
                match conn.deadline(&timeouts) {
                    Some(due) if due <= now => conn.handle_timeout(now, &timeouts),
                    _ => Next::Keep,
                }
            }
            kind => {
                socket.room = arg * 3;
                let hints = Hints {
                    readable: true,
                    read_closed: kind == 7 && socket.ended,
                };
                let mut scratch = Scratch {
                    input: &mut read_buf,
                    spare: &mut spare,
                };
                let mut cx = Cx {
                    cfg: &cfg,
                    timeouts: &timeouts,
                    now,
                    tally: &mut tally,
                    metrics: &[],
                };
                let mut verdict = if kind == 6 {
                    conn.handle_shutdown(&mut socket, &mut scratch, &mut cx)
                } else {
                    conn.handle_io(&mut socket, hints, &mut scratch, &mut cx)
                };
                // The ready list: served again next turn, as the loop does.
                for _ in 0..10_000 {
                    if verdict != Next::Again {
                        break;
                    }
                    let again = Hints {
                        readable: true,
                        read_closed: false,
                    };
                    verdict = conn.handle_io(&mut socket, again, &mut scratch, &mut cx);
                }
                assert_ne!(verdict, Next::Again, "asks to be served again forever");
                verdict
            }
        };

        let (expected, _) = model::replies(cfg.mode, cfg.max_line, &stream, socket.ended);
        assert!(
            expected.starts_with(&socket.written),
            "wrote what the model never sends:\n got {:02x?}\nwant a prefix of {expected:02x?}",
            socket.written
        );
        let held = conn.pending_input() + conn.pending_output();
        let bound = cfg.max_line + 1 + cfg.max_pending_output + longest_reply + cfg.read_budget;
        assert!(held <= bound, "{held} bytes buffered, bound {bound}");
        match verdict {
            Next::Close(reason) => {
                if reason == CloseReason::Eof {
                    assert_eq!(
                        conn.pending_output(),
                        0,
                        "closed for eof with replies unsent"
                    );
                }
                return;
            }
            Next::Keep | Next::Again => {
                if let Some(due) = conn.deadline(&timeouts) {
                    assert!(due > now, "asks to be woken in the past");
                }
            }
        }
    }
}
