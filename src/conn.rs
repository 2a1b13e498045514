//! One client connection as an explicit state machine, driven without sockets.
//!
//! [`Conn`] holds what a connection is doing ([`State`]), its unfinished
//! input and its unsent replies. It never owns a socket, a poll or a timer:
//! the event loop hands it something that reads and writes ([`Io`]) and the
//! current time, and then asks it questions. So it is tested with scripted
//! byte streams and a clock the test moves (see the tests at the bottom).
//!
//! # Vocabulary (after quinn-proto's `Connection`)
//! - "this happened": [`Conn::handle_io`] (the socket may be ready),
//!   [`Conn::handle_timeout`] (a deadline may have passed),
//!   [`Conn::handle_shutdown`] (the server is stopping). Each returns
//!   [`Next`]: keep the connection, or close it for a [`CloseReason`].
//! - "what do you want now": [`Conn::interest`] (readiness to wait for),
//!   [`Conn::deadline`] (when to be woken), [`Conn::wants_read`] (input is
//!   probably still waiting in the kernel: serve me next turn).
//!
//! # Invariants
//! - In [`State::Open`], `rbuf` holds at most one partial line (no `\n`) of
//!   at most `max_line + 1` bytes: the line limit is applied while a line
//!   arrives. In [`State::Paused`] it may also hold whole lines not answered
//!   yet (at most one read's worth more).
//! - Replies are only produced while `wbuf` is below `max_pending_output`,
//!   so unsent output is bounded by that plus one read's replies.
//! - Both buffers are released when empty: an idle connection owns no heap.
//! - Only a completed line moves `last_line` (slowloris: trickled bytes do
//!   not keep a connection alive).
//! - `Conn::set_state` is the only writer of `state`, and logs each change.

use crate::config::Config;
use crate::line::{self, Stop};
use crate::metrics::{self, Counters};
use crate::proxy;
use bytes::{Buf, BytesMut};
use log::trace;
use std::io::{self, Read, Write};
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

pub use crate::metrics::CloseReason;

/// What a connection is doing. Closed is not a state: a [`Next::Close`]
/// makes the loop release the socket, the slab slot and the timer at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// `--proxy-protocol`: collecting the PROXY header; nothing is answered
    /// until it parses (an invalid or late header closes as `error`).
    ProxyHeader,
    /// A `--metrics` client: collecting its HTTP request head.
    Request,
    /// Reading input, answering each complete line.
    Open,
    /// Unsent replies reached `max_pending_output`: no reading or framing
    /// until they drain below half (the client is not reading).
    Paused,
    /// No more input is read; the queued replies are written out, then the
    /// connection closes for the reason (or lingers, see [`State::Lingering`]).
    Flushing(CloseReason),
    /// Everything was sent and the write side shut down; input is read and
    /// discarded until EOF, `linger_bytes` or `until`, so that closing with
    /// unread input does not RST away the last reply (SPEC §1).
    Lingering {
        /// Why the connection is closing.
        reason: CloseReason,
        /// When to stop waiting for the client's EOF.
        until: Instant,
        /// Bytes the client may still send before we close anyway.
        allowance: usize,
    },
}

/// The verdict of a `handle_*` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Next {
    /// Keep the connection; ask it what it wants.
    Keep,
    /// Close it now, counting it under this reason.
    Close(CloseReason),
}

/// A byte stream the connection can drive: a socket, or a script in tests.
pub trait Io: Read + Write {
    /// Shuts down the write side (TCP FIN), keeping the read side open.
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl Io for mio::net::TcpStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// The readiness the loop wants for a connection, derived from its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Wait for input.
    Read,
    /// Wait for room in the send buffer.
    Write,
    /// Both.
    ReadWrite,
}

/// Per-turn resources the loop lends to the connection it is serving.
pub struct Cx<'a> {
    /// Limits and mode.
    pub cfg: &'a Config,
    /// The time of this turn of the loop.
    pub now: Instant,
    /// The loop's read buffer: every read lands here first, so a connection
    /// only keeps the bytes it could not answer yet.
    pub input: &'a mut [u8],
    /// An empty output buffer with capacity, lent to a connection whose own
    /// is empty and returned when it is drained: a ping-pong client never
    /// allocates.
    pub spare: &'a mut BytesMut,
    /// Traffic counted this turn (the loop adds it to the metrics).
    pub tally: &'a mut Tally,
    /// Every loop's counters, for a `/metrics` page.
    pub metrics: &'a [Arc<Counters>],
}

/// Traffic counters the loop collects from its connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Lines answered.
    pub lines: u64,
    /// Bytes read from clients.
    pub received: u64,
    /// Bytes written to clients.
    pub sent: u64,
}

/// Readiness hints from the poller (they may be spurious).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// Input, EOF or an error may be waiting.
    pub readable: bool,
    /// The peer has shut down its side: read until EOF, not just until a
    /// short read.
    pub read_closed: bool,
}

/// One client connection. See the module docs for the call order.
#[derive(Debug)]
pub struct Conn {
    /// What it is doing.
    state: State,
    /// The peer, for logs (the real client when the PROXY protocol said so).
    peer: SocketAddr,
    /// Unanswered input: a partial line (or, when paused, whole lines too).
    rbuf: BytesMut,
    /// Replies not written yet.
    wbuf: BytesMut,
    /// When the last complete line arrived (or the connection opened).
    last_line: Instant,
    /// The peer's FIN was seen: never stop reading at a short read.
    peer_closed: bool,
    /// The read budget ran out with input possibly left in the kernel.
    wants_read: bool,
}

/// The outcome of one `read`, mapped from `io::Result` where the call is.
enum Read_ {
    Data(usize),
    WouldBlock,
    Eof,
    Reset,
    Failed(io::Error),
}

fn read_some(io: &mut impl Io, buf: &mut [u8]) -> Read_ {
    loop {
        return match io.read(buf) {
            Ok(0) => Read_::Eof,
            Ok(n) => Read_::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read_::WouldBlock,
            Err(e) if is_reset(&e) => Read_::Reset,
            Err(e) => Read_::Failed(e),
        };
    }
}

/// The peer went away (SPEC §2 "reset by peer"): not worth more than debug.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

impl Conn {
    /// A new echo connection from `peer`, opened at `now`; it starts by
    /// waiting for a PROXY header when the configuration asks for one.
    pub fn new(peer: SocketAddr, now: Instant, cfg: &Config) -> Conn {
        let state = match cfg.proxy_header_timeout {
            Some(_) => State::ProxyHeader,
            None => State::Open,
        };
        Conn::with_state(peer, now, state)
    }

    /// A new `--metrics` client, expected to send one HTTP request.
    pub fn new_metrics(peer: SocketAddr, now: Instant) -> Conn {
        Conn::with_state(peer, now, State::Request)
    }

    fn with_state(peer: SocketAddr, now: Instant, state: State) -> Conn {
        Conn {
            state,
            peer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            last_line: now,
            peer_closed: false,
            wants_read: false,
        }
    }

    /// What the connection is doing.
    pub fn state(&self) -> State {
        self.state
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Unsent reply bytes.
    pub fn pending_output(&self) -> usize {
        self.wbuf.len()
    }

    /// Heap bytes held by the connection's buffers.
    pub fn buffered_capacity(&self) -> usize {
        self.rbuf.capacity() + self.wbuf.capacity()
    }

    /// The only writer of `state`.
    fn set_state(&mut self, new: State) {
        trace!("{}: {:?} -> {:?}", self.peer, self.state, new);
        self.state = new;
    }

    // ----- "this happened" -------------------------------------------------

    /// The socket may be readable or writable (or neither: events can be
    /// spurious). Reads what the state allows, answers complete lines,
    /// writes what is queued, and moves between states accordingly.
    pub fn handle_io(&mut self, io: &mut impl Io, ready: Ready, cx: &mut Cx) -> Next {
        self.wants_read = false;
        self.peer_closed |= ready.read_closed;
        self.borrow_spare(cx);
        let next = match self.state {
            State::Open | State::ProxyHeader | State::Request if ready.readable => {
                self.read_input(io, cx)
            }
            State::Lingering { .. } if ready.readable => self.discard_input(io, cx),
            _ => Next::Keep,
        };
        self.end_turn(io, next, cx)
    }

    /// A deadline this connection asked for may have passed. Spurious calls
    /// (early, or for a deadline since moved) are no-ops.
    pub fn handle_timeout(&mut self, now: Instant, cfg: &Config) -> Next {
        match self.deadline(cfg) {
            Some(due) if due <= now => Next::Close(match self.state {
                State::Lingering { reason, .. } => reason,
                State::ProxyHeader => {
                    log::debug!("{}: no complete PROXY header in time", self.peer);
                    CloseReason::Error
                }
                _ => CloseReason::Idle,
            }),
            _ => Next::Keep,
        }
    }

    /// The server is stopping (SIGINT/SIGTERM): read what the client has
    /// already sent (one budget's worth), answer every complete line, even
    /// those waiting behind a pause, then flush and close. The shutdown
    /// timeout bounds the whole wait.
    pub fn handle_shutdown(&mut self, io: &mut impl Io, cx: &mut Cx) -> Next {
        self.borrow_spare(cx);
        let mut next = Next::Keep;
        if self.state == State::Open {
            next = self.read_input(io, cx);
        }
        if next == Next::Keep && matches!(self.state, State::Open | State::Paused) {
            let buffered = mem::take(&mut self.rbuf);
            let a = line::answer_lines(
                &buffered,
                cx.cfg.mode,
                cx.cfg.max_line,
                &mut self.wbuf,
                usize::MAX,
            );
            cx.tally.lines += a.lines as u64;
            self.set_state(State::Flushing(CloseReason::Shutdown));
        }
        if matches!(self.state, State::ProxyHeader | State::Request) {
            // Nothing was asked of it yet: it just goes.
            next = Next::Close(CloseReason::Shutdown);
        }
        self.end_turn(io, next, cx)
    }

    /// The end of every `handle_*` turn: write what is queued (unless the
    /// connection is closing anyway) and give the spare buffer back.
    fn end_turn(&mut self, io: &mut impl Io, next: Next, cx: &mut Cx) -> Next {
        let next = match next {
            Next::Keep => self.flush(io, cx),
            close => close,
        };
        if self.wbuf.is_empty() {
            // Lend the allocation back; an idle connection holds no heap.
            let mut empty = mem::take(&mut self.wbuf);
            if empty.capacity() > cx.spare.capacity() {
                empty.clear();
                mem::swap(&mut empty, cx.spare);
            }
        }
        next
    }

    /// Replies are built straight into the loop's spare buffer when this
    /// connection has none of its own.
    fn borrow_spare(&mut self, cx: &mut Cx) {
        if self.wbuf.capacity() == 0 {
            mem::swap(&mut self.wbuf, cx.spare);
        }
    }

    // ----- "what do you want now" -------------------------------------------

    /// The readiness to wait for, from the state and the buffers alone (like
    /// rustls's `event_set`); the loop re-registers only when it changes.
    pub fn interest(&self) -> Want {
        match self.state {
            State::ProxyHeader | State::Request => Want::Read,
            State::Open if self.wbuf.is_empty() => Want::Read,
            State::Open => Want::ReadWrite,
            State::Paused | State::Flushing(_) => Want::Write,
            State::Lingering { .. } => Want::Read,
        }
    }

    /// When [`Conn::handle_timeout`] should next be called, if ever.
    pub fn deadline(&self, cfg: &Config) -> Option<Instant> {
        match self.state {
            State::Lingering { until, .. } => Some(until),
            State::ProxyHeader => cfg.proxy_header_timeout.map(|t| self.last_line + t),
            State::Request => Some(self.last_line + cfg.request_timeout),
            _ => cfg.idle_timeout.map(|idle| self.last_line + idle),
        }
    }

    /// True when the read budget ran out: input may still be waiting in the
    /// kernel, and with edge-triggered readiness no event will say so.
    pub fn wants_read(&self) -> bool {
        self.wants_read
    }

    // ----- reading ------------------------------------------------------------

    /// Reads until `WouldBlock`, EOF, a short read (the kernel buffer is
    /// drained) or the per-turn budget, handing each read to `take_input`.
    fn read_input(&mut self, io: &mut impl Io, cx: &mut Cx) -> Next {
        let mut budget = cx.cfg.read_budget;
        while matches!(
            self.state,
            State::Open | State::ProxyHeader | State::Request
        ) {
            if budget == 0 {
                self.wants_read = true;
                break;
            }
            let want = budget.min(cx.input.len());
            let input = mem::take(&mut cx.input);
            let got = read_some(io, &mut input[..want]);
            let n = match got {
                Read_::Data(n) => n,
                Read_::WouldBlock => {
                    cx.input = input;
                    break;
                }
                Read_::Eof => {
                    cx.input = input;
                    match self.state {
                        State::Open => self.end_of_input(cx),
                        State::ProxyHeader => {
                            log::debug!("{}: EOF before a PROXY header", self.peer);
                            return Next::Close(CloseReason::Error);
                        }
                        _ => return Next::Close(CloseReason::Eof),
                    }
                    break;
                }
                Read_::Reset => {
                    cx.input = input;
                    return Next::Close(CloseReason::Reset);
                }
                Read_::Failed(e) => {
                    cx.input = input;
                    log::debug!("{}: read failed: {e}", self.peer);
                    return Next::Close(CloseReason::Error);
                }
            };
            cx.tally.received += n as u64;
            budget -= n;
            let next = self.take_input(&input[..n], cx);
            cx.input = input;
            if next != Next::Keep {
                return next;
            }
            // A short read drained the socket: a new edge will come for new
            // bytes, so skip the read that would only say WouldBlock. Not
            // after a FIN, whose edge may already have been consumed.
            if n < want && !self.peer_closed {
                break;
            }
        }
        Next::Keep
    }

    /// Freshly read bytes, handled as the state says.
    fn take_input(&mut self, data: &[u8], cx: &mut Cx) -> Next {
        match self.state {
            State::ProxyHeader => self.take_proxy_header(data, cx),
            State::Request => {
                self.take_request(data, cx);
                Next::Keep
            }
            _ => {
                self.take_lines(data, cx);
                Next::Keep
            }
        }
    }

    /// Collects the PROXY header; the bytes after it are the client's first
    /// input. Headers may arrive split over any number of reads.
    fn take_proxy_header(&mut self, data: &[u8], cx: &mut Cx) -> Next {
        self.rbuf.extend_from_slice(data);
        match proxy::parse(&self.rbuf) {
            proxy::Parsed::Incomplete => Next::Keep,
            proxy::Parsed::Invalid(why) => {
                log::debug!("{}: invalid PROXY header: {why}", self.peer);
                Next::Close(CloseReason::Error)
            }
            proxy::Parsed::Done { len, source } => {
                match source {
                    Some(client) => {
                        log::debug!("{}: PROXY header names client {client}", self.peer);
                        self.peer = client;
                    }
                    None => log::debug!("{}: PROXY health check (LOCAL/UNKNOWN)", self.peer),
                }
                let after = mem::take(&mut self.rbuf).split_off(len);
                self.set_state(State::Open);
                self.take_lines(&after, cx);
                Next::Keep
            }
        }
    }

    /// Collects a `/metrics` request head and queues the response.
    fn take_request(&mut self, data: &[u8], cx: &mut Cx) {
        self.rbuf.extend_from_slice(data);
        let request = metrics::parse_request(&self.rbuf);
        if let Some(response) = metrics::response(request, cx.metrics) {
            self.rbuf = BytesMut::new();
            self.wbuf.extend_from_slice(&response);
            self.set_state(State::Flushing(CloseReason::Eof));
        }
    }

    /// Frames freshly read bytes against the partial line kept in `rbuf`.
    fn take_lines(&mut self, mut data: &[u8], cx: &mut Cx) {
        if !self.rbuf.is_empty() {
            // Only the new bytes are searched: `rbuf` holds no `\n`.
            match memchr::memchr(b'\n', data) {
                None => {
                    self.rbuf.extend_from_slice(data);
                    if line::unterminated_too_long(&self.rbuf, cx.cfg.max_line) {
                        self.too_long(cx);
                    }
                    return;
                }
                Some(nl) => {
                    self.rbuf.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    let joined = mem::take(&mut self.rbuf);
                    self.answer(&joined, cx);
                }
            }
        }
        match self.state {
            State::Open => self.answer(data, cx),
            // Paused on the joined line: keep the rest for later.
            State::Paused => self.rbuf.extend_from_slice(data),
            _ => {}
        }
    }

    /// Answers the complete lines of `input` and keeps what is left.
    fn answer(&mut self, input: &[u8], cx: &mut Cx) {
        let a = line::answer_lines(
            input,
            cx.cfg.mode,
            cx.cfg.max_line,
            &mut self.wbuf,
            cx.cfg.max_pending_output,
        );
        if a.lines > 0 {
            cx.tally.lines += a.lines as u64;
            self.last_line = cx.now;
        }
        let rest = &input[a.consumed..];
        match a.stop {
            Stop::Incomplete => self.rbuf.extend_from_slice(rest),
            Stop::Full => {
                self.rbuf.extend_from_slice(rest);
                self.set_state(State::Paused);
            }
            Stop::TooLong => self.too_long(cx),
        }
    }

    /// SPEC §1: the lines before it were answered; queue the error, close.
    fn too_long(&mut self, cx: &mut Cx) {
        self.wbuf
            .extend_from_slice(&line::too_long_error(cx.cfg.max_line));
        self.rbuf = BytesMut::new();
        self.set_state(State::Flushing(CloseReason::TooLong));
    }

    /// EOF: what is left without a `\n` is a final line and gets its reply.
    fn end_of_input(&mut self, cx: &mut Cx) {
        if !self.rbuf.is_empty() {
            line::write_reply(cx.cfg.mode, &self.rbuf, &mut self.wbuf);
            cx.tally.lines += 1;
            self.rbuf = BytesMut::new();
        }
        self.set_state(State::Flushing(CloseReason::Eof));
    }

    /// While lingering: read and drop input until EOF or the allowance.
    fn discard_input(&mut self, io: &mut impl Io, cx: &mut Cx) -> Next {
        let State::Lingering {
            reason,
            until,
            mut allowance,
        } = self.state
        else {
            return Next::Keep;
        };
        let next = loop {
            let want = cx.input.len().min(allowance.max(1));
            match read_some(io, &mut cx.input[..want]) {
                Read_::Data(n) if n >= allowance => break Next::Close(reason),
                Read_::Data(n) => allowance -= n,
                Read_::WouldBlock => break Next::Keep,
                Read_::Eof | Read_::Reset | Read_::Failed(_) => break Next::Close(reason),
            }
        };
        if next == Next::Keep {
            self.set_state(State::Lingering {
                reason,
                until,
                allowance,
            });
        }
        next
    }

    // ----- writing ------------------------------------------------------------

    /// Writes queued replies until done or `WouldBlock`, resumes a paused
    /// connection that drained below half, and finishes a flushing one.
    fn flush(&mut self, io: &mut impl Io, cx: &mut Cx) -> Next {
        loop {
            while !self.wbuf.is_empty() {
                match io.write(&self.wbuf) {
                    Ok(0) => return Next::Close(CloseReason::Error),
                    Ok(n) => {
                        cx.tally.sent += n as u64;
                        self.wbuf.advance(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if is_reset(&e) => return Next::Close(CloseReason::Reset),
                    Err(e) => {
                        log::debug!("{}: write failed: {e}", self.peer);
                        return Next::Close(CloseReason::Error);
                    }
                }
            }
            if self.state == State::Paused && self.wbuf.len() < cx.cfg.max_pending_output / 2 {
                self.resume(cx);
                if !self.wbuf.is_empty() {
                    continue; // write the replies to the lines just answered
                }
            }
            break;
        }
        match self.state {
            State::Flushing(reason) if self.wbuf.is_empty() => self.finish(io, reason, cx),
            _ => Next::Keep,
        }
    }

    /// Backlog below half: answer the lines that waited in `rbuf` at once (no
    /// event will come for them), then read again next turn.
    fn resume(&mut self, cx: &mut Cx) {
        self.set_state(State::Open);
        let buffered = mem::take(&mut self.rbuf);
        self.answer(&buffered, cx);
        if self.state == State::Open {
            self.wants_read = true;
        }
    }

    /// Everything is sent: close now, or shut down the write side and linger
    /// when the client may still be sending (an error line or a shutdown).
    fn finish(&mut self, io: &mut impl Io, reason: CloseReason, cx: &mut Cx) -> Next {
        if reason == CloseReason::Eof || self.peer_closed {
            return Next::Close(reason);
        }
        if io.shutdown_write().is_err() {
            return Next::Close(reason);
        }
        self.set_state(State::Lingering {
            reason,
            until: cx.now + cx.cfg.linger_time,
            allowance: cx.cfg.linger_bytes,
        });
        // Input may already be waiting: drain what is there now.
        self.discard_input(io, cx)
    }
}

#[cfg(test)]
mod tests {
    //! Tests grouped by the state the connection starts in, with fixtures
    //! `conn_open()` and `conn_paused()` (after smoltcp's socket tests).
    use super::*;
    use std::collections::VecDeque;
    use std::time::Duration;

    /// A scripted socket: each read returns the next scripted step, writes
    /// accept up to `room` bytes and then say WouldBlock.
    #[derive(Default)]
    struct Script {
        reads: VecDeque<io::Result<Vec<u8>>>,
        written: Vec<u8>,
        room: usize,
        shut: bool,
    }

    impl Script {
        fn new() -> Script {
            Script {
                room: usize::MAX,
                ..Script::default()
            }
        }
        fn data(mut self, bytes: &[u8]) -> Script {
            self.reads.push_back(Ok(bytes.to_vec()));
            self
        }
        fn eof(self) -> Script {
            self.data(b"")
        }
        fn err(mut self, kind: io::ErrorKind) -> Script {
            self.reads.push_back(Err(kind.into()));
            self
        }
        fn room(mut self, room: usize) -> Script {
            self.room = room;
            self
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.reads.pop_front() {
                None => Err(io::ErrorKind::WouldBlock.into()),
                Some(Err(e)) => Err(e),
                Some(Ok(mut bytes)) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.reads.push_front(Ok(bytes.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
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

    impl Io for Script {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }
    }

    /// The loop's side of a test: config, clock, buffers.
    struct Harness {
        cfg: Config,
        now: Instant,
        input: Vec<u8>,
        spare: BytesMut,
        tally: Tally,
    }

    impl Harness {
        fn new() -> Harness {
            Harness::with(Config::default())
        }
        fn with(cfg: Config) -> Harness {
            Harness {
                cfg,
                now: Instant::now(),
                input: vec![0; 4096],
                spare: BytesMut::new(),
                tally: Tally::default(),
            }
        }
        /// One readiness event. The poller flags `read_closed` when the
        /// client's FIN is queued, as epoll's EPOLLRDHUP does.
        fn io(&mut self, conn: &mut Conn, io: &mut Script) -> Next {
            let ready = Ready {
                readable: true,
                read_closed: io.reads.iter().any(|r| matches!(r, Ok(b) if b.is_empty())),
            };
            let mut cx = Cx {
                cfg: &self.cfg,
                now: self.now,
                input: &mut self.input,
                spare: &mut self.spare,
                tally: &mut self.tally,
                metrics: &[],
            };
            conn.handle_io(io, ready, &mut cx)
        }
        fn advance(&mut self, by: Duration) {
            self.now += by;
        }
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn conn_open(h: &Harness) -> Conn {
        Conn::new(peer(), h.now, &h.cfg)
    }

    /// A connection paused behind `max_pending_output` = 8 with a client
    /// that reads nothing: 9 bytes of replies queued, `c\n` unanswered.
    fn conn_paused(h: &mut Harness) -> (Conn, Script) {
        let mut conn = conn_open(h);
        let mut io = Script::new().data(b"aaaa\nbbb\nc\n").room(0);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(conn.state(), State::Paused);
        (conn, io)
    }

    fn small_output() -> Config {
        Config {
            max_pending_output: 8,
            mode: line::Mode::Raw,
            ..Config::default()
        }
    }

    // ----- Open -----------------------------------------------------------

    #[test]
    fn open_answers_lines_and_writes_once() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\nb\r\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, b"you said: a!\nyou said: b!\n");
        assert_eq!(h.tally.lines, 2);
        assert_eq!(conn.interest(), Want::Read);
        assert_eq!(conn.buffered_capacity(), 0, "idle conn holds no heap");
    }

    #[test]
    fn open_keeps_a_partial_line_until_its_end() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"hel");
        let _ = h.io(&mut conn, &mut io);
        assert!(io.written.is_empty());
        let mut io = Script::new().data(b"lo\n");
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(io.written, b"you said: hello!\n");
        assert_eq!(conn.buffered_capacity(), 0);
    }

    #[test]
    fn open_eof_answers_the_unterminated_line_then_closes() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\nb").eof();
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
        assert_eq!(io.written, b"you said: a!\nyou said: b!\n");
    }

    #[test]
    fn open_too_long_line_gets_the_error_after_earlier_replies() {
        let mut h = Harness::with(Config {
            max_line: 4,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"ok\n").data(b"abc").data(b"de");
        // Three segments, three events.
        for _ in 0..3 {
            assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        }
        assert_eq!(
            io.written,
            b"you said: ok!\nerror: line too long (max 4 bytes)\n"
        );
        assert!(io.shut, "write side shut down before lingering");
        assert!(matches!(conn.state(), State::Lingering { .. }));
    }

    #[test]
    fn open_reset_closes_as_reset() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().err(io::ErrorKind::ConnectionReset);
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Reset));
    }

    #[test]
    fn open_interrupted_read_is_retried() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().err(io::ErrorKind::Interrupted).data(b"x\n");
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(io.written, b"you said: x!\n");
    }

    #[test]
    fn open_read_budget_asks_to_be_served_again() {
        let mut h = Harness::with(Config {
            read_budget: 4,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\nb\nc\nd\n");
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(h.tally.received, 4);
        assert!(conn.wants_read());
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(h.tally.lines, 4);
    }

    #[test]
    fn open_idle_timeout_counts_from_the_last_complete_line() {
        let mut h = Harness::new();
        let idle = h.cfg.idle_timeout.unwrap();
        let mut conn = conn_open(&h);
        h.advance(idle / 2);
        let _ = h.io(&mut conn, &mut Script::new().data(b"line\n"));
        h.advance(idle / 2);
        // Trickled bytes do not count.
        let _ = h.io(&mut conn, &mut Script::new().data(b"x"));
        assert_eq!(conn.handle_timeout(h.now, &h.cfg), Next::Keep);
        h.advance(idle / 2);
        assert_eq!(
            conn.handle_timeout(h.now, &h.cfg),
            Next::Close(CloseReason::Idle)
        );
    }

    #[test]
    fn open_slow_writer_gets_writable_interest() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"hello\n").room(3);
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(conn.interest(), Want::ReadWrite);
        io.room = usize::MAX;
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(io.written, b"you said: hello!\n");
        assert_eq!(conn.interest(), Want::Read);
    }

    // ----- Paused ---------------------------------------------------------

    #[test]
    fn paused_neither_reads_nor_answers() {
        let mut h = Harness::with(small_output());
        let (mut conn, mut io) = conn_paused(&mut h);
        assert_eq!(conn.pending_output(), 9);
        io.reads.push_back(Ok(b"more\n".to_vec()));
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(io.reads.len(), 1, "no read while paused");
        assert_eq!(conn.interest(), Want::Write);
    }

    #[test]
    fn paused_resumes_below_half_and_answers_buffered_lines() {
        let mut h = Harness::with(small_output());
        let (mut conn, mut io) = conn_paused(&mut h);
        io.room = usize::MAX;
        let _ = h.io(&mut conn, &mut io);
        assert_eq!(io.written, b"aaaa\nbbb\nc\n");
        assert_eq!(conn.state(), State::Open);
        assert!(conn.wants_read(), "input may wait in the kernel");
    }

    #[test]
    fn paused_still_times_out() {
        let mut h = Harness::with(small_output());
        let (mut conn, _io) = conn_paused(&mut h);
        h.advance(h.cfg.idle_timeout.unwrap());
        assert_eq!(
            conn.handle_timeout(h.now, &h.cfg),
            Next::Close(CloseReason::Idle)
        );
    }

    #[test]
    fn paused_shutdown_answers_buffered_lines() {
        let mut h = Harness::with(small_output());
        let (mut conn, mut io) = conn_paused(&mut h);
        io.room = usize::MAX;
        let mut cx = Cx {
            cfg: &h.cfg,
            now: h.now,
            input: &mut h.input,
            spare: &mut h.spare,
            tally: &mut h.tally,
            metrics: &[],
        };
        assert_eq!(conn.handle_shutdown(&mut io, &mut cx), Next::Keep);
        assert_eq!(io.written, b"aaaa\nbbb\nc\n");
        assert!(io.shut);
        assert!(matches!(
            conn.state(),
            State::Lingering {
                reason: CloseReason::Shutdown,
                ..
            }
        ));
    }

    // ----- Flushing -------------------------------------------------------

    #[test]
    fn flushing_after_eof_waits_for_the_reader() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"bye\n").eof().room(4);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(conn.state(), State::Flushing(CloseReason::Eof));
        io.room = usize::MAX;
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
        assert_eq!(io.written, b"you said: bye!\n");
    }

    // ----- Lingering ------------------------------------------------------

    #[test]
    fn lingering_discards_input_until_eof() {
        let mut h = Harness::with(Config {
            max_line: 2,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"toolong\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        io.reads.push_back(Ok(b"still sending\n".to_vec()));
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, b"error: line too long (max 2 bytes)\n");
        io.reads.push_back(Ok(Vec::new()));
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::TooLong));
    }

    #[test]
    fn lingering_is_bounded_in_time() {
        let mut h = Harness::with(Config {
            max_line: 2,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let _ = h.io(&mut conn, &mut Script::new().data(b"toolong\n"));
        assert_eq!(conn.deadline(&h.cfg), Some(h.now + h.cfg.linger_time));
        h.advance(h.cfg.linger_time);
        assert_eq!(
            conn.handle_timeout(h.now, &h.cfg),
            Next::Close(CloseReason::TooLong)
        );
    }

    #[test]
    fn lingering_is_bounded_in_bytes() {
        let mut h = Harness::with(Config {
            max_line: 2,
            linger_bytes: 10,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"toolong\n").data(&[b'x'; 20]);
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::TooLong));
    }
}
