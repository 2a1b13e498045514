//! One client connection as an explicit state machine, driven without sockets.
//!
//! [`Conn`] holds what a connection is doing ([`State`]), its unfinished
//! input and its unsent replies. It never owns a socket, a poll or a timer:
//! the event loop hands it something that reads and writes ([`Io`]), the
//! loop's buffers ([`Scratch`]) and the current time ([`Cx`]), and then asks
//! it questions. So it is tested with scripted byte streams and a clock the
//! test moves (see the tests at the bottom).
//!
//! # Vocabulary (after quinn-proto's `Connection`)
//! - "this happened": [`Conn::handle_io`] (the socket may be ready),
//!   [`Conn::handle_timeout`] (a deadline may have passed),
//!   [`Conn::handle_shutdown`] (the server is stopping). Each returns
//!   [`Next`]: keep the connection, or close it for a [`CloseReason`].
//! - "what do you want now": [`Conn::interest`] (readiness to wait for),
//!   [`Conn::deadline`] (when to be woken), [`Conn::read_again`] (input is
//!   probably still waiting in the kernel: serve me again next turn).
//!
//! # Invariants
//! - In [`State::Open`], `rbuf` holds at most one partial line (no `\n`) of
//!   at most `max_line + 1` bytes: the line limit is applied while a line
//!   arrives. In [`State::Paused`] it may also hold whole lines not answered
//!   yet (at most one read's worth more).
//! - Lines are only answered while `wbuf` is below `max_pending_output`, so
//!   unsent output exceeds it by at most one reply (at shutdown, by the
//!   replies to what the client had already sent).
//! - Both buffers are released when empty: an idle connection owns no heap.
//! - Only a completed line moves `last_line` (slowloris: trickled bytes do
//!   not keep a connection alive).
//! - A connection is closed only once its client's EOF has been read, or
//!   after lingering: closing with unread input would send an RST that can
//!   destroy the last reply (SPEC §1).
//! - `Conn::set_state` is the only writer of `state`, and logs each change.

use crate::config::Config;
use crate::line::{self, Stop};
use crate::metrics::{self, Counters};
use crate::proxy;
use bytes::{Buf, BytesMut};
use log::{debug, trace};
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
    /// until they drain to half (the client is not reading).
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

/// The loop's buffers, lent to the connection being served.
pub struct Scratch<'a> {
    /// Every read lands here first, so a connection only keeps the bytes
    /// it could not answer yet.
    pub input: &'a mut [u8],
    /// An empty output buffer with capacity, lent to a connection whose own
    /// is empty and taken back once drained: a ping-pong client builds its
    /// replies here and never allocates.
    pub spare: &'a mut BytesMut,
}

/// What the loop tells the connection it is serving, and what it collects.
pub struct Cx<'a> {
    /// Limits and mode.
    pub cfg: &'a Config,
    /// The time of this turn of the loop.
    pub now: Instant,
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
pub struct Hints {
    /// Input, EOF or an error may be waiting.
    pub readable: bool,
    /// The client's FIN has arrived (EPOLLRDHUP), though maybe not been read.
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
    /// The client's FIN has arrived: a short read no longer proves the
    /// socket drained, since the FIN's edge may already be consumed.
    fin_seen: bool,
    /// The client's EOF has been read: nothing unread is left to cause an
    /// RST, so the connection may close without lingering.
    eof_read: bool,
    /// The read budget ran out with input possibly left in the kernel.
    read_again: bool,
    /// A busy or metrics connection: owed one answer, then closed, within
    /// the request timeout.
    one_answer: bool,
    /// The server is shutting down: after the lines already read are
    /// answered, no more reading.
    shutting_down: bool,
}

/// The outcome of one `read`, mapped from `io::Result` where the call is.
enum ReadOutcome {
    Data(usize),
    WouldBlock,
    Eof,
    Reset,
    Failed(io::Error),
}

fn read_some(io: &mut impl Io, buf: &mut [u8]) -> ReadOutcome {
    loop {
        return match io.read(buf) {
            Ok(0) => ReadOutcome::Eof,
            Ok(n) => ReadOutcome::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
            Err(e) if is_reset(&e) => ReadOutcome::Reset,
            Err(e) => ReadOutcome::Failed(e),
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

/// The reply to a client over `--max-connections`.
pub const BUSY_REPLY: &[u8] = b"error: server busy\n";

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

    /// A client over `--max-connections`: it is only told so, then closed
    /// like any connection after an error line.
    pub fn new_busy(peer: SocketAddr, now: Instant) -> Conn {
        let mut conn = Conn::with_state(peer, now, State::Flushing(CloseReason::Busy));
        conn.wbuf.extend_from_slice(BUSY_REPLY);
        conn
    }

    fn with_state(peer: SocketAddr, now: Instant, state: State) -> Conn {
        Conn {
            state,
            peer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            last_line: now,
            fin_seen: false,
            eof_read: false,
            read_again: false,
            one_answer: !matches!(state, State::Open | State::ProxyHeader),
            shutting_down: false,
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
    pub fn handle_io(
        &mut self,
        io: &mut impl Io,
        hints: Hints,
        scratch: &mut Scratch,
        cx: &mut Cx,
    ) -> Next {
        self.read_again = false;
        self.fin_seen |= hints.read_closed;
        self.borrow_spare(scratch);
        let next = match self.state {
            State::Open | State::ProxyHeader | State::Request if hints.readable => {
                self.read_input(io, cx.cfg.read_budget, scratch.input, cx)
            }
            State::Lingering { .. } if hints.readable => self.discard_input(io, scratch.input),
            _ => Next::Keep,
        };
        self.end_turn(io, next, scratch, cx)
    }

    /// A deadline this connection asked for may have passed. Spurious calls
    /// (early, or for a deadline since moved) are no-ops.
    pub fn handle_timeout(&mut self, now: Instant, cfg: &Config) -> Next {
        match self.deadline(cfg) {
            Some(due) if due <= now => Next::Close(match self.state {
                State::Lingering { reason, .. } => reason,
                State::ProxyHeader => {
                    debug!("{}: no complete PROXY header in time", self.peer);
                    CloseReason::Proxy
                }
                _ => {
                    debug!("{}: idle for {:?}", self.peer, now - self.last_line);
                    CloseReason::Idle
                }
            }),
            _ => Next::Keep,
        }
    }

    /// The server is stopping (SIGINT/SIGTERM): read what the client has
    /// already sent (up to `shutdown_read_limit`), answer its complete
    /// lines, flush and close. The output bound still holds: a connection
    /// that pauses answers the rest of what it read as its backlog drains,
    /// and the shutdown timeout bounds the whole wait.
    pub fn handle_shutdown(
        &mut self,
        io: &mut impl Io,
        scratch: &mut Scratch,
        cx: &mut Cx,
    ) -> Next {
        self.borrow_spare(scratch);
        self.shutting_down = true;
        let mut next = Next::Keep;
        if self.state == State::Open {
            next = self.read_input(io, cx.cfg.shutdown_read_limit, scratch.input, cx);
        }
        match self.state {
            State::Open => self.stop_reading(),
            // Nothing was asked of these yet: they just go.
            State::ProxyHeader | State::Request => next = Next::Close(CloseReason::Shutdown),
            // Paused: `resume` finishes the job; the others are closing.
            _ => {}
        }
        self.end_turn(io, next, scratch, cx)
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
            // Owed one answer only: done within the request timeout of
            // opening (`last_line` never moves for them), idle timeout or not.
            _ if self.one_answer => Some(self.last_line + cfg.request_timeout),
            _ => cfg.idle_timeout.map(|idle| self.last_line + idle),
        }
    }

    /// True when the read budget ran out, or reading just resumed after a
    /// pause: input may still be waiting in the kernel, and with
    /// edge-triggered readiness no event will say so.
    pub fn read_again(&self) -> bool {
        self.read_again
    }

    // ----- reading ------------------------------------------------------------

    /// Reads until `WouldBlock`, EOF, a short read (the kernel buffer is
    /// drained) or `budget` bytes, handing each read to `take_input`.
    fn read_input(
        &mut self,
        io: &mut impl Io,
        mut budget: usize,
        input: &mut [u8],
        cx: &mut Cx,
    ) -> Next {
        while matches!(
            self.state,
            State::Open | State::ProxyHeader | State::Request
        ) {
            if budget == 0 {
                self.read_again = true;
                break;
            }
            let want = budget.min(input.len());
            let n = match read_some(io, &mut input[..want]) {
                ReadOutcome::Data(n) => n,
                ReadOutcome::WouldBlock => break,
                ReadOutcome::Eof => return self.end_of_input(cx),
                ReadOutcome::Reset => return Next::Close(CloseReason::Reset),
                ReadOutcome::Failed(e) => {
                    debug!("{}: read failed: {e}", self.peer);
                    return Next::Close(CloseReason::Error);
                }
            };
            cx.tally.received += n as u64;
            budget -= n;
            if let Next::Close(reason) = self.take_input(&input[..n], cx) {
                return Next::Close(reason);
            }
            // A short read drained the socket: a new edge will come for new
            // bytes, so skip the read that would only say WouldBlock. Not
            // after a FIN, whose edge may already have been consumed.
            if n < want && !self.fin_seen {
                break;
            }
        }
        Next::Keep
    }

    /// Freshly read bytes, handled as the state says.
    fn take_input(&mut self, data: &[u8], cx: &mut Cx) -> Next {
        match self.state {
            State::ProxyHeader => return self.take_proxy_header(data, cx),
            State::Request => self.take_request(data, cx),
            _ => self.take_lines(data, cx),
        }
        Next::Keep
    }

    /// Collects the PROXY header; the bytes after it are the client's first
    /// input. Headers may arrive split over any number of reads.
    fn take_proxy_header(&mut self, data: &[u8], cx: &mut Cx) -> Next {
        self.rbuf.extend_from_slice(data);
        match proxy::parse(&self.rbuf) {
            proxy::Parsed::Incomplete => Next::Keep,
            proxy::Parsed::Invalid(why) => {
                debug!("{}: invalid PROXY header: {why}", self.peer);
                Next::Close(CloseReason::Proxy)
            }
            proxy::Parsed::Done { len, source } => {
                match source {
                    Some(client) => {
                        debug!("{}: PROXY header names client {client}", self.peer);
                        self.peer = client;
                    }
                    None => debug!("{}: PROXY health check (LOCAL/UNKNOWN)", self.peer),
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
                    self.answer(&joined, cx.cfg.max_pending_output, cx);
                }
            }
        }
        match self.state {
            State::Open => self.answer(data, cx.cfg.max_pending_output, cx),
            // Paused on the joined line: keep the rest for later.
            State::Paused => self.rbuf.extend_from_slice(data),
            _ => {}
        }
    }

    /// Answers the complete lines of `input` while fewer than `max_out`
    /// reply bytes are queued, and keeps what is left.
    fn answer(&mut self, input: &[u8], max_out: usize, cx: &mut Cx) {
        let a = line::answer_lines(input, cx.cfg.mode, cx.cfg.max_line, &mut self.wbuf, max_out);
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

    /// EOF: in `Open`, what is left without a `\n` is a final line and gets
    /// its reply before the close; anywhere else it ends the connection.
    fn end_of_input(&mut self, cx: &mut Cx) -> Next {
        self.eof_read = true;
        match self.state {
            State::Open => {
                if !self.rbuf.is_empty() {
                    line::write_reply(cx.cfg.mode, &self.rbuf, &mut self.wbuf);
                    cx.tally.lines += 1;
                    self.rbuf = BytesMut::new();
                }
                self.set_state(State::Flushing(CloseReason::Eof));
                Next::Keep
            }
            State::ProxyHeader => {
                debug!("{}: EOF before a PROXY header", self.peer);
                Next::Close(CloseReason::Proxy)
            }
            _ => Next::Close(CloseReason::Eof),
        }
    }

    /// While lingering: read and drop input until EOF or the allowance.
    fn discard_input(&mut self, io: &mut impl Io, input: &mut [u8]) -> Next {
        let State::Lingering {
            reason,
            until,
            mut allowance,
        } = self.state
        else {
            return Next::Keep;
        };
        let next = loop {
            let want = input.len().min(allowance.max(1));
            match read_some(io, &mut input[..want]) {
                ReadOutcome::Data(n) if n >= allowance => break Next::Close(reason),
                ReadOutcome::Data(n) => allowance -= n,
                ReadOutcome::WouldBlock => break Next::Keep,
                ReadOutcome::Eof | ReadOutcome::Reset | ReadOutcome::Failed(_) => {
                    break Next::Close(reason);
                }
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

    /// The end of every `handle_*` turn: write what is queued (unless the
    /// connection is closing anyway) and give the spare buffer back.
    fn end_turn(
        &mut self,
        io: &mut impl Io,
        next: Next,
        scratch: &mut Scratch,
        cx: &mut Cx,
    ) -> Next {
        let next = match next {
            Next::Keep => self.flush(io, scratch.input, cx),
            close => close,
        };
        if self.wbuf.is_empty() {
            // Give the allocation back; an idle connection holds no heap.
            // Written bytes were `advance`d past: asking for one byte more
            // than the capacity left reclaims all of them, without ever
            // allocating.
            let mut empty = mem::take(&mut self.wbuf);
            let _ = empty.try_reclaim(empty.capacity() + 1);
            if empty.capacity() > scratch.spare.capacity() {
                mem::swap(&mut empty, scratch.spare);
            }
        }
        next
    }

    /// Replies are built straight into the loop's spare buffer when this
    /// connection has none of its own.
    fn borrow_spare(&mut self, scratch: &mut Scratch) {
        if self.wbuf.capacity() == 0 {
            mem::swap(&mut self.wbuf, scratch.spare);
        }
    }

    /// Writes queued replies until done or `WouldBlock`, resumes a paused
    /// connection that drained to half, and finishes a flushing one.
    fn flush(&mut self, io: &mut impl Io, input: &mut [u8], cx: &mut Cx) -> Next {
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
                        debug!("{}: write failed: {e}", self.peer);
                        return Next::Close(CloseReason::Error);
                    }
                }
            }
            if self.state == State::Paused
                && self.wbuf.len() < cx.cfg.max_pending_output.div_ceil(2)
            {
                self.resume(cx);
                if !self.wbuf.is_empty() {
                    continue; // write the replies to the lines just answered
                }
            }
            break;
        }
        match self.state {
            State::Flushing(reason) if self.wbuf.is_empty() => self.finish(io, reason, input, cx),
            _ => Next::Keep,
        }
    }

    /// Backlog down to half: answer the lines that waited in `rbuf` at once
    /// (no event will come for them), then read again next turn.
    fn resume(&mut self, cx: &mut Cx) {
        self.set_state(State::Open);
        let buffered = mem::take(&mut self.rbuf);
        self.answer(&buffered, cx.cfg.max_pending_output, cx);
        if self.state == State::Open {
            if self.shutting_down {
                self.stop_reading();
            } else {
                self.read_again = true;
            }
        }
    }

    /// Shutdown: an unfinished line is not a line yet; flush and close.
    fn stop_reading(&mut self) {
        self.rbuf = BytesMut::new();
        self.set_state(State::Flushing(CloseReason::Shutdown));
    }

    /// Everything is sent: close now if the client's EOF was read, else shut
    /// down the write side and linger, discarding input, until it comes.
    fn finish(
        &mut self,
        io: &mut impl Io,
        reason: CloseReason,
        input: &mut [u8],
        cx: &mut Cx,
    ) -> Next {
        if self.eof_read || io.shutdown_write().is_err() {
            return Next::Close(reason);
        }
        self.set_state(State::Lingering {
            reason,
            until: cx.now + cx.cfg.linger_time,
            allowance: cx.cfg.linger_bytes,
        });
        // Input may already be waiting: drain what is there now.
        self.discard_input(io, input)
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
            let hints = Hints {
                readable: true,
                read_closed: io.reads.iter().any(|r| matches!(r, Ok(b) if b.is_empty())),
            };
            let (mut scratch, mut cx) = self.parts();
            conn.handle_io(io, hints, &mut scratch, &mut cx)
        }
        fn shutdown(&mut self, conn: &mut Conn, io: &mut Script) -> Next {
            let (mut scratch, mut cx) = self.parts();
            conn.handle_shutdown(io, &mut scratch, &mut cx)
        }
        fn parts(&mut self) -> (Scratch<'_>, Cx<'_>) {
            let scratch = Scratch {
                input: &mut self.input,
                spare: &mut self.spare,
            };
            let cx = Cx {
                cfg: &self.cfg,
                now: self.now,
                tally: &mut self.tally,
                metrics: &[],
            };
            (scratch, cx)
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
        assert!(conn.read_again());
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

    #[test]
    fn open_ping_pong_reuses_the_loops_spare_buffer() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let _ = h.io(&mut conn, &mut Script::new().data(b"first\n"));
        let lent = h.spare.capacity();
        assert!(lent > 0, "the spare keeps the allocation");
        assert_eq!(conn.buffered_capacity(), 0);
        let _ = h.io(&mut conn, &mut Script::new().data(b"again\n"));
        assert_eq!(h.spare.capacity(), lent, "written bytes are reclaimed");
    }

    #[test]
    fn open_fin_behind_unread_input_is_not_a_reason_to_skip_lingering() {
        let mut h = Harness::with(Config {
            max_line: 4,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        // A too-long line, more of it unread, then the FIN.
        let mut io = Script::new().data(b"0123456789").data(&[b'x'; 8192]).eof();
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::TooLong));
        assert!(io.shut, "lingered: FIN sent, input drained up to the EOF");
        assert!(io.reads.is_empty(), "nothing left unread to cause an RST");
    }

    #[test]
    fn open_metrics_request_gets_a_page_and_lingers() {
        let mut h = Harness::new();
        let mut conn = Conn::new_metrics(peer(), h.now);
        let mut io = Script::new().data(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(io.written.starts_with(b"HTTP/1.1 200"));
        assert!(io.shut);
        io.reads.push_back(Ok(Vec::new()));
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
    }

    // ----- Busy -------------------------------------------------------------

    #[test]
    fn busy_sends_its_line_then_lingers_until_eof() {
        let mut h = Harness::new();
        let mut conn = Conn::new_busy(peer(), h.now);
        let mut io = Script::new().data(b"hello\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, BUSY_REPLY);
        assert!(io.shut);
        io.reads.push_back(Ok(Vec::new()));
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Busy));
    }

    #[test]
    fn busy_is_bounded_in_time_even_without_an_idle_timeout() {
        let mut h = Harness::with(Config {
            idle_timeout: None,
            ..Config::default()
        });
        let mut conn = Conn::new_busy(peer(), h.now);
        let _ = h.io(&mut conn, &mut Script::new().room(0));
        assert_eq!(conn.deadline(&h.cfg), Some(h.now + h.cfg.request_timeout));
    }

    // ----- Paused ---------------------------------------------------------

    #[test]
    fn paused_with_a_one_byte_bound_still_resumes() {
        let mut h = Harness::with(Config {
            max_pending_output: 1,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\nb\nc\n");
        for _ in 0..4 {
            let _ = h.io(&mut conn, &mut io);
        }
        assert_eq!(io.written, [said(b"a"), said(b"b"), said(b"c")].concat());
    }

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
        assert!(conn.read_again(), "input may wait in the kernel");
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
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
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

    #[test]
    fn shutdown_answers_everything_already_sent() {
        let mut h = Harness::with(Config {
            max_pending_output: 1 << 20,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        // Far more than one turn's read budget, all sent before the signal.
        let lines: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("{i:>8}\n").into_bytes())
            .collect();
        let mut io = Script::new().data(&lines);
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
        assert_eq!(h.tally.lines, 20_000);
        assert!(io.shut);
    }

    #[test]
    fn shutdown_keeps_the_output_bound_for_a_client_that_does_not_read() {
        let mut h = Harness::with(Config {
            max_pending_output: 1024,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        // 64 KiB of empty lines would be 768 KiB of replies.
        let mut io = Script::new().data(&[b'\n'; 65536]).room(0);
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
        assert!(conn.pending_output() <= 1024 + said(b"").len());
        assert_eq!(conn.state(), State::Paused);
        // As the client reads, the rest of what was read (one read of the
        // harness's 4 KiB buffer) is answered, then the close; what it sent
        // after is not read once shutting down.
        io.room = usize::MAX;
        for _ in 0..1000 {
            if h.io(&mut conn, &mut io) != Next::Keep || conn.state() != State::Paused {
                break;
            }
        }
        assert!(matches!(conn.state(), State::Lingering { .. }));
        assert_eq!(io.written.len(), 4096 * said(b"").len());
    }

    fn said(content: &[u8]) -> Vec<u8> {
        [line::PREFIX, content, line::SUFFIX].concat()
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
