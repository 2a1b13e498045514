//! One client connection as an explicit state machine.
//!
//! [`Conn`] holds what a connection is doing ([`State`], each variant with
//! the data only it needs), its unanswered input ([`Framer`]) and its unsent
//! replies. It owns no socket, poll or timer. In the rustls model (not
//! quinn-proto's fully sans-IO one), the loop hands it something to read and
//! write ([`Io`]: the socket, or a script in tests), the loop's buffers
//! ([`Scratch`]) and the time ([`Cx`]), and the connection does its own
//! `read`/`write` calls on it, then answers questions. So it is tested with
//! scripted byte streams and a clock the test moves (the tests at the bottom
//! are grouped by the state they start in).
//!
//! # Vocabulary (after quinn-proto's `Connection`)
//! - "this happened": [`Conn::handle_io`] (the socket may be ready),
//!   [`Conn::handle_timeout`] (a deadline may have passed),
//!   [`Conn::handle_shutdown`] (the server is stopping). Each returns
//!   [`Next`]: wait, serve me again next turn, or close for a
//!   [`CloseReason`].
//! - "what do you want now": [`Conn::interest`] (readiness to wait for) and
//!   [`Conn::deadline`] (when to be woken).
//!
//! # One switch
//! `Conn::drive` is the machine (memcached's `drive_machine`): a loop around
//! one `match` on the state. Each arm does one step with helpers that return
//! named outcomes (`Read`, [`Framed`](crate::line::Framed), `Wrote`) and
//! says where to go next; only the arms change the state, through
//! `Conn::set_state`, which logs each real change at `trace` (the one
//! exception: the `Lingering` arm counts down its own byte allowance).
//!
//! # Invariants
//! - In [`State::Open`] the framer holds at most one partial line of at most
//!   `max_line + 1` bytes. In [`State::Paused`] it may also hold whole lines
//!   not answered yet (at most one read's worth more).
//! - Lines are only answered while unsent output is below
//!   `max_pending_output`, so it exceeds that by at most one reply.
//! - Both buffers are released when empty: an idle connection owns no heap.
//! - Only a completed line moves `last_line` (slowloris: trickled bytes do
//!   not keep a connection alive).
//! - One `write` phase per turn, after the reads: all replies of a turn's
//!   reads leave together (a paused connection that drains below half
//!   answers the lines that waited and writes them in a second phase).
//! - A connection with replies to deliver is closed only once its client's
//!   EOF has been read, or after lingering: closing with unread input would
//!   send an RST that can destroy the last reply (SPEC.md §1). Those with
//!   nothing to deliver (no valid PROXY header, a shutdown before the
//!   header or request was in, a reset) close at once.

use crate::admission::Kind;
use crate::config::Config;
use crate::line::{self, Framer, Rules, Stop};
use crate::metrics::{self, Counters};
use crate::proxy;
use crate::timer::{Clock, Span, Tick};
use bytes::{Buf, BytesMut};
use log::{debug, trace};
use std::fmt;
use std::io::{self, Write};
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use crate::metrics::CloseReason;

/// What a connection is doing, with what only that state needs. Closed is
/// not a state: a [`Next::Close`] makes the loop release the socket, the
/// slab slot at once (its timer entry is not searched for: it is dropped
/// when it fires, its generation no longer matching).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// `--proxy-protocol`: collecting the PROXY header (in the buffers'
    /// `head`); nothing is answered until it parses. Invalid, EOF or `until`
    /// closes.
    ProxyHeader {
        /// The `--proxy-header-timeout` deadline.
        until: Tick,
    },
    /// A `--metrics` client: collecting its HTTP request head (in the
    /// buffers' `head`).
    Request {
        /// The request timeout: answered and gone by then.
        until: Tick,
    },
    /// Reading input, answering each complete line.
    Open {
        /// The client's FIN has arrived (EPOLLRDHUP) though maybe not been
        /// read: a short read no longer proves the socket drained.
        fin: bool,
    },
    /// Unsent replies reached `max_pending_output`: no reading or framing
    /// until they drain below half (the client is not reading).
    Paused {
        /// As in [`State::Open`].
        fin: bool,
        /// Where to go once the backlog allows the waiting lines through.
        then: Resume,
    },
    /// No more input is read; the queued replies are written out, then the
    /// connection closes for `reason` or lingers.
    Flushing {
        /// Why the connection is closing.
        reason: CloseReason,
        /// What to do once everything is written.
        then: AfterFlush,
        /// A one-answer connection (busy, metrics) is gone by then, idle
        /// timeout or not; `None`: the idle timeout applies.
        until: Option<Tick>,
    },
    /// Everything was sent and the write side shut down; input is read and
    /// discarded until EOF, `allowance` bytes or `until`, so that closing
    /// with unread input does not RST away the last reply (SPEC.md §1).
    Lingering {
        /// Why the connection is closing.
        reason: CloseReason,
        /// When to stop waiting for the client's EOF.
        until: Tick,
        /// Bytes the client may still send before we close anyway.
        allowance: u32,
    },
}

/// Where a paused connection goes when its backlog drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Back to [`State::Open`].
    Read,
    /// The server is shutting down: answer the lines already read, then
    /// flush and close (`shutdown`).
    Finish,
}

/// What a flushing connection does once its output is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFlush {
    /// The client's EOF was read: nothing unread can cause an RST.
    Close,
    /// Shut down the write side and linger.
    Linger,
}

/// The verdict of a `handle_*` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Next {
    /// Keep the connection; wait for its next event or deadline.
    Keep,
    /// Keep it, and serve it again next turn: input may still wait in the
    /// kernel (the read budget ran out, or reading just resumed after a
    /// pause), and with edge-triggered readiness no event will say so.
    Again,
    /// Close it now, counting it under this reason.
    Close(CloseReason),
}

/// A byte stream the connection can drive: a socket, or a script in tests.
pub trait Io: io::Read + Write {
    /// Shuts down the write side (TCP FIN), keeping the read side open.
    fn shutdown_write(&mut self) -> io::Result<()>;
    /// The address at the other end (asked only when a log line names it).
    fn peer_addr(&self) -> io::Result<SocketAddr>;
}

impl Io for mio::net::TcpStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        mio::net::TcpStream::peer_addr(self)
    }
}

/// Names a connection's client in a log line: the client a PROXY header
/// named, else the socket's peer. The address is not kept in the slot (it
/// is 32 bytes, and only logs need it): `getpeername` is called only when
/// a log line at an enabled level is formatted.
pub struct Peer<'a, S: ?Sized> {
    io: &'a S,
    client: Option<&'a SocketAddr>,
}

impl<S: Io + ?Sized> fmt::Display for Peer<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self
            .client
            .copied()
            .map(Ok)
            .unwrap_or_else(|| self.io.peer_addr())
        {
            Ok(addr) => addr.fmt(f),
            Err(_) => f.write_str("(peer gone)"),
        }
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

/// What a connection holds only while it has something in hand: input not
/// answered yet, replies not written yet, a request or PROXY header being
/// collected, the client a PROXY header named. Behind one pointer in
/// [`Conn`] that is null when there is nothing, so an idle connection costs
/// its slot and no heap (a connection behind a PROXY header keeps this box
/// for the named client).
#[derive(Debug, Default)]
pub struct Buffers {
    /// Input read but not answered yet.
    framer: Framer,
    /// Replies not written yet.
    out: BytesMut,
    /// A PROXY header or an HTTP request head being collected.
    head: BytesMut,
    /// The client a PROXY header named.
    client: Option<SocketAddr>,
}

impl Buffers {
    /// Holds nothing a connection must keep.
    fn is_idle(&self) -> bool {
        self.framer.is_empty()
            && self.out.is_empty()
            && self.head.is_empty()
            && self.client.is_none()
    }

    /// Heap bytes held, the box included.
    fn capacity(&self) -> usize {
        mem::size_of::<Buffers>()
            + self.framer.capacity()
            + self.out.capacity()
            + self.head.capacity()
    }
}

/// The loop's spare [`Buffers`]: lent to a connection that holds none for
/// the length of a turn, and taken back if it holds nothing afterwards. So
/// a ping-pong client, whose replies always leave in the same turn, never
/// allocates, and an idle one holds no heap. An output allocation bigger
/// than [`SPARE_MAX`] (left by a client that made the server queue a
/// backlog) is freed rather than kept.
#[derive(Debug, Default)]
pub struct Spare(Option<Box<Buffers>>);

impl Spare {
    /// Heap bytes held by the spare.
    pub fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.capacity())
    }

    /// Buffers for a connection that holds none.
    fn lend(&mut self) -> Box<Buffers> {
        self.0.take().unwrap_or_default()
    }

    /// What a connection keeps after its turn: its buffers, or nothing if
    /// they hold nothing (then the bigger output allocation stays here).
    fn take_back(&mut self, mut bufs: Box<Buffers>) -> Option<Box<Buffers>> {
        if !bufs.is_idle() {
            return Some(bufs);
        }
        // Written bytes were `advance`d past: asking for one byte more than
        // the capacity left reclaims all of them, without ever allocating.
        let _ = bufs.out.try_reclaim(bufs.out.capacity() + 1);
        let room = bufs.out.capacity();
        if room <= SPARE_MAX && self.0.as_ref().is_none_or(|s| room > s.out.capacity()) {
            self.0 = Some(bufs);
        }
        None
    }
}

/// The largest output allocation the spare keeps.
pub const SPARE_MAX: usize = 64 * 1024;

/// The loop's buffers, lent to the connection being served. Every read
/// lands in `input` first, so a connection keeps only the bytes it could
/// not answer yet.
pub struct Scratch<'a> {
    /// The read buffer (one read's worth).
    pub input: &'a mut [u8],
    /// The buffers lent to a connection that holds none.
    pub spare: &'a mut Spare,
}

/// The connection timeouts in ticks of the loop's [`Clock`], computed once
/// per loop (a deadline is then one addition).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// One tick (to say in a log how long a count of ticks was).
    pub tick: Duration,
    /// `--idle-timeout`, if any.
    pub idle: Option<Span>,
    /// How long a closing connection lingers.
    pub linger: Span,
    /// How long a metrics or busy client may take.
    pub request: Span,
    /// `--proxy-header-timeout`, with `--proxy-protocol`.
    pub proxy_header: Option<Span>,
}

impl Timeouts {
    /// The configuration's timeouts in `clock`'s ticks.
    pub fn new(cfg: &Config, clock: &Clock) -> Timeouts {
        Timeouts {
            tick: clock.tick(),
            idle: cfg.idle_timeout.map(|d| clock.span(d)),
            linger: clock.span(cfg.linger_time),
            request: clock.span(cfg.request_timeout),
            proxy_header: cfg.proxy_header_timeout.map(|d| clock.span(d)),
        }
    }
}

/// What the loop tells the connection it is serving, and what it collects.
pub struct Cx<'a> {
    /// Limits and mode.
    pub cfg: &'a Config,
    /// The timeouts in ticks.
    pub timeouts: &'a Timeouts,
    /// The tick of this turn of the loop.
    pub now: Tick,
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

/// One client connection. Call order: `handle_*`, then ask [`Conn::interest`]
/// and [`Conn::deadline`] (and act on the [`Next`] it returned).
///
/// An idle connection is this and nothing more (the loop's slot adds the
/// socket and its bookkeeping): the state, one tick, one null pointer.
#[derive(Debug)]
pub struct Conn {
    /// What it is doing.
    state: State,
    /// The tick of the last complete line (or of the opening).
    last_line: Tick,
    /// Buffers while it holds anything; `None` when idle.
    bufs: Option<Box<Buffers>>,
}

/// A connection's whole state as plain data: what a live upgrade hands to
/// the new process, and what [`Conn::restore`] rebuilds the same
/// connection from (its socket travels beside it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// What it was doing (its ticks are the loop clock's, which the new
    /// process keeps).
    pub state: State,
    /// The tick of its last complete line.
    pub last_line: Tick,
    /// Input read but not answered yet (an unfinished line; while paused,
    /// whole lines too).
    pub unanswered: Vec<u8>,
    /// Replies not written yet.
    pub unsent: Vec<u8>,
    /// A PROXY header or HTTP request head being collected.
    pub head: Vec<u8>,
    /// The client a PROXY header named.
    pub client: Option<SocketAddr>,
}

/// The reply to a client over `--max-connections`.
pub const BUSY_REPLY: &[u8] = b"error: server busy\n";

impl Conn {
    /// A new connection of `kind`, opened at tick `now`. An echo client
    /// starts by waiting for a PROXY header when the configuration asks for
    /// one; a busy client starts with `error: server busy` queued.
    pub fn new(kind: Kind, now: Tick, timeouts: &Timeouts) -> Conn {
        let mut bufs = None;
        let state = match kind {
            Kind::Client => match timeouts.proxy_header {
                Some(timeout) => State::ProxyHeader {
                    until: now.after(timeout),
                },
                None => State::Open { fin: false },
            },
            Kind::Metrics => State::Request {
                until: now.after(timeouts.request),
            },
            Kind::Busy => {
                let mut busy = Box::<Buffers>::default();
                busy.out.extend_from_slice(BUSY_REPLY);
                bufs = Some(busy);
                State::Flushing {
                    reason: CloseReason::Busy,
                    then: AfterFlush::Linger,
                    until: Some(now.after(timeouts.request)),
                }
            }
        };
        Conn {
            state,
            last_line: now,
            bufs,
        }
    }

    /// Everything the connection holds, copied out (the connection is left
    /// as it was: a failed upgrade goes on serving it).
    pub fn save(&self) -> Saved {
        let bufs = self.bufs.as_deref();
        Saved {
            state: self.state,
            last_line: self.last_line,
            unanswered: bufs.map_or_else(Vec::new, |b| b.framer.pending().to_vec()),
            unsent: bufs.map_or_else(Vec::new, |b| b.out.to_vec()),
            head: bufs.map_or_else(Vec::new, |b| b.head.to_vec()),
            client: bufs.and_then(|b| b.client),
        }
    }

    /// The connection [`Conn::save`] described, holding buffers only if it
    /// has something in them.
    pub fn restore(saved: Saved) -> Conn {
        let bufs = Buffers {
            framer: Framer::holding(&saved.unanswered),
            out: BytesMut::from(&saved.unsent[..]),
            head: BytesMut::from(&saved.head[..]),
            client: saved.client,
        };
        Conn {
            state: saved.state,
            last_line: saved.last_line,
            bufs: (!bufs.is_idle()).then(|| Box::new(bufs)),
        }
    }

    /// What the connection is doing.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Names the client in a log line (the real client when the PROXY
    /// protocol said so), given the connection's socket.
    pub fn peer<'a, S: Io + ?Sized>(&'a self, io: &'a S) -> Peer<'a, S> {
        Peer {
            io,
            client: self.bufs.as_ref().and_then(|b| b.client.as_ref()),
        }
    }

    /// Unsent reply bytes.
    pub fn pending_output(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.out.len())
    }

    /// Input bytes read but not answered yet (a PROXY or request head, or
    /// unanswered lines).
    pub fn pending_input(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b.head.len() + b.framer.len())
    }

    /// Heap bytes held by the connection's buffers.
    pub fn buffered_capacity(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.capacity())
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
        let budget = cx.cfg.read_budget;
        self.turn(io, hints, budget, false, scratch, cx)
    }

    /// The server is stopping (SIGINT/SIGTERM): read what the client has
    /// already sent (up to `shutdown_read_limit`), answer its complete
    /// lines, flush and close. The output bound still holds: a connection
    /// that pauses answers the rest of what it read as its backlog drains
    /// (then [`Resume::Finish`]), and the shutdown timeout bounds the wait.
    pub fn handle_shutdown(
        &mut self,
        io: &mut impl Io,
        scratch: &mut Scratch,
        cx: &mut Cx,
    ) -> Next {
        let hints = Hints {
            readable: true,
            read_closed: false,
        };
        let budget = cx.cfg.shutdown_read_limit;
        self.turn(io, hints, budget, true, scratch, cx)
    }

    /// A deadline this connection asked for may have passed. Spurious calls
    /// (early, or for a deadline since moved) are no-ops.
    pub fn handle_timeout(&mut self, now: Tick, timeouts: &Timeouts) -> Next {
        match self.deadline(timeouts) {
            Some(due) if due <= now => Next::Close(match self.state {
                State::Lingering { reason, .. } => reason,
                State::ProxyHeader { .. } => {
                    debug!("no complete PROXY header in time");
                    CloseReason::Proxy
                }
                State::Request { .. } | State::Flushing { until: Some(_), .. } => {
                    debug!("request timeout (a metrics or busy client not done in time)");
                    CloseReason::Idle
                }
                _ => {
                    let ticks = u32::try_from(now.since(self.last_line)).unwrap_or(u32::MAX);
                    debug!("idle for {:?} (to the tick)", timeouts.tick * ticks);
                    CloseReason::Idle
                }
            }),
            _ => Next::Keep,
        }
    }

    // ----- "what do you want now" -------------------------------------------

    /// The readiness to wait for, from the state and the buffers alone (like
    /// rustls's `event_set`); the loop re-registers only when it changes.
    pub fn interest(&self) -> Want {
        match self.state {
            State::ProxyHeader { .. } | State::Request { .. } | State::Lingering { .. } => {
                Want::Read
            }
            State::Open { .. } if self.pending_output() == 0 => Want::Read,
            State::Open { .. } => Want::ReadWrite,
            State::Paused { .. } | State::Flushing { .. } => Want::Write,
        }
    }

    /// The tick at which [`Conn::handle_timeout`] should next be called, if
    /// ever.
    pub fn deadline(&self, timeouts: &Timeouts) -> Option<Tick> {
        match self.state {
            State::ProxyHeader { until, .. }
            | State::Request { until, .. }
            | State::Lingering { until, .. }
            | State::Flushing {
                until: Some(until), ..
            } => Some(until),
            State::Open { .. } | State::Paused { .. } | State::Flushing { until: None, .. } => {
                timeouts.idle.map(|idle| self.last_line.after(idle))
            }
        }
    }

    // ----- the machine ---------------------------------------------------------

    /// One turn: borrow the spare buffers if it holds none, drive the
    /// machine, give them back if it holds nothing, count the bytes read.
    fn turn(
        &mut self,
        io: &mut impl Io,
        hints: Hints,
        budget: usize,
        shutdown: bool,
        scratch: &mut Scratch,
        cx: &mut Cx,
    ) -> Next {
        let mut bufs = self.bufs.take().unwrap_or_else(|| scratch.spare.lend());
        let mut reader = Reader::new(scratch.input, hints, budget);
        let next = self.drive(io, &mut reader, shutdown, &mut bufs, cx);
        cx.tally.received += reader.received as u64;
        self.bufs = scratch.spare.take_back(bufs);
        next
    }

    /// The state machine: the only place the state changes. Each arm takes
    /// one step and says where to go; the turn ends when an arm is done.
    /// `shutdown`: this is the server's shutdown turn.
    fn drive(
        &mut self,
        io: &mut impl Io,
        reader: &mut Reader,
        shutdown: bool,
        bufs: &mut Buffers,
        cx: &mut Cx,
    ) -> Next {
        let rules = Rules {
            mode: cx.cfg.mode,
            max_line: cx.cfg.max_line,
            max_output: cx.cfg.max_pending_output,
        };
        loop {
            let step = match self.state {
                // ProxyHeader: collect the header; the bytes after it are
                // handed back to the reader as the client's first input.
                State::ProxyHeader { .. } => match reader.read(io, reader.fin) {
                    Read::Data(data) => match take_header(&mut bufs.head, data, &mut bufs.client) {
                        Header::Incomplete => Step::Stay,
                        Header::Invalid => Step::Done(Next::Close(CloseReason::Proxy)),
                        Header::Done { rest } => {
                            bufs.head = BytesMut::new();
                            reader.unread(rest);
                            Step::Go(State::Open { fin: false })
                        }
                    },
                    // Shutdown: a client whose header is not all in goes;
                    // one whose header (and lines) came is answered in Open.
                    Read::Dry | Read::Later if shutdown => {
                        Step::Done(Next::Close(CloseReason::Shutdown))
                    }
                    Read::Dry => Step::Done(Next::Keep),
                    Read::Later => Step::Done(Next::Again),
                    Read::Eof => {
                        debug!("{}: EOF before a PROXY header", who(io, bufs));
                        Step::Done(Next::Close(CloseReason::Proxy))
                    }
                    Read::Failed(reason) => Step::Done(Next::Close(reason)),
                },

                // Request: collect the head, queue the page (or an error).
                State::Request { .. } if shutdown => Step::Done(Next::Close(CloseReason::Shutdown)),
                State::Request { until } => match reader.read(io, reader.fin) {
                    Read::Data(data) => {
                        bufs.head.extend_from_slice(data);
                        match metrics::response(metrics::parse_request(&bufs.head), cx.metrics) {
                            None => Step::Stay,
                            Some(response) => {
                                bufs.head = BytesMut::new();
                                bufs.out.extend_from_slice(&response);
                                Step::Go(State::Flushing {
                                    reason: CloseReason::Eof,
                                    then: AfterFlush::Linger,
                                    until: Some(until),
                                })
                            }
                        }
                    }
                    Read::Dry => Step::Done(Next::Keep),
                    Read::Later => Step::Done(Next::Again),
                    Read::Eof => Step::Done(Next::Close(CloseReason::Eof)),
                    Read::Failed(reason) => Step::Done(Next::Close(reason)),
                },

                // Open: read and answer until the socket is dry or the budget
                // is spent, then write everything in one go.
                State::Open { fin: false } if reader.fin => Step::Go(State::Open { fin: true }),
                State::Open { fin } => match reader.read(io, fin) {
                    Read::Data(data) => {
                        let framed = bufs.framer.push(data, rules, &mut bufs.out);
                        self.count_lines(framed.lines, cx);
                        match framed.stop {
                            Stop::Incomplete => Step::Stay,
                            Stop::Full => Step::Go(State::Paused {
                                fin,
                                then: Resume::Read,
                            }),
                            Stop::TooLong => {
                                bufs.out
                                    .extend_from_slice(&line::too_long_error(rules.max_line));
                                Step::Go(closing(CloseReason::TooLong))
                            }
                        }
                    }
                    Read::Eof => {
                        let lines = bufs.framer.finish(rules.mode, &mut bufs.out);
                        cx.tally.lines += lines as u64;
                        Step::Go(State::Flushing {
                            reason: CloseReason::Eof,
                            then: AfterFlush::Close,
                            until: None,
                        })
                    }
                    Read::Failed(reason) => Step::Done(Next::Close(reason)),
                    // Shutdown: an unfinished line is not a line yet.
                    Read::Dry | Read::Later if shutdown => {
                        bufs.framer.clear();
                        Step::Go(closing(CloseReason::Shutdown))
                    }
                    // The reads are done: all their replies leave in one go.
                    read @ (Read::Dry | Read::Later) => {
                        let next = if matches!(read, Read::Later) {
                            Next::Again
                        } else {
                            Next::Keep
                        };
                        match write_out(io, &mut bufs.out, cx.tally, bufs.client) {
                            Wrote::Failed(reason) => Step::Done(Next::Close(reason)),
                            Wrote::All | Wrote::Blocked => Step::Done(next),
                        }
                    }
                },

                // Paused: write; below half, answer the lines that waited.
                State::Paused { fin: false, then } if reader.fin => {
                    Step::Go(State::Paused { fin: true, then })
                }
                State::Paused {
                    fin,
                    then: Resume::Read,
                } if shutdown => Step::Go(State::Paused {
                    fin,
                    then: Resume::Finish,
                }),
                State::Paused { fin, then } => {
                    match write_out(io, &mut bufs.out, cx.tally, bufs.client) {
                        Wrote::Failed(reason) => Step::Done(Next::Close(reason)),
                        _ if bufs.out.len() >= rules.max_output.div_ceil(2) => {
                            Step::Done(Next::Keep)
                        }
                        _ => {
                            let framed = bufs.framer.resume(rules, &mut bufs.out);
                            self.count_lines(framed.lines, cx);
                            match (framed.stop, then) {
                                (Stop::Full, _) => Step::Stay,
                                (Stop::TooLong, _) => {
                                    bufs.out
                                        .extend_from_slice(&line::too_long_error(rules.max_line));
                                    Step::Go(closing(CloseReason::TooLong))
                                }
                                (Stop::Incomplete, Resume::Read) => {
                                    reader.stop_for_now();
                                    Step::Go(State::Open { fin })
                                }
                                (Stop::Incomplete, Resume::Finish) => {
                                    bufs.framer.clear();
                                    Step::Go(closing(CloseReason::Shutdown))
                                }
                            }
                        }
                    }
                }

                // Flushing: write; once empty, close or linger.
                State::Flushing { reason, then, .. } => {
                    match write_out(io, &mut bufs.out, cx.tally, bufs.client) {
                        Wrote::Failed(reason) => Step::Done(Next::Close(reason)),
                        Wrote::Blocked => Step::Done(Next::Keep),
                        Wrote::All if then == AfterFlush::Close => Step::Done(Next::Close(reason)),
                        Wrote::All => match io.shutdown_write() {
                            Ok(()) => Step::Go(State::Lingering {
                                reason,
                                until: cx.now.after(cx.timeouts.linger),
                                allowance: u32::try_from(cx.cfg.linger_bytes).unwrap_or(u32::MAX),
                            }),
                            Err(_) => Step::Done(Next::Close(reason)),
                        },
                    }
                }

                // Lingering: drop input (whatever the hints say: input may
                // already wait when this state is entered) until EOF or the
                // allowance is spent.
                State::Lingering {
                    reason,
                    ref mut allowance,
                    ..
                } => match discard(io, reader.buf, *allowance) {
                    Discarded::Waiting(left) => {
                        *allowance = left;
                        Step::Done(Next::Keep)
                    }
                    Discarded::Finished => Step::Done(Next::Close(reason)),
                },
            };
            match step {
                Step::Stay => {}
                Step::Go(next) => self.set_state(next, who(io, bufs)),
                Step::Done(next) => return next,
            }
        }
    }

    /// The only writer of `state`; logs each real change.
    fn set_state(&mut self, new: State, who: impl fmt::Display) {
        if new != self.state {
            trace!("{who}: {:?} -> {:?}", self.state, new);
        }
        self.state = new;
    }

    /// Counts answered lines; a complete line restarts the idle clock.
    fn count_lines(&mut self, lines: usize, cx: &mut Cx) {
        if lines > 0 {
            cx.tally.lines += lines as u64;
            self.last_line = cx.now;
        }
    }
}

/// What one arm of [`Conn::drive`] decided.
enum Step {
    /// Same state, next step.
    Stay,
    /// Enter this state and keep going.
    Go(State),
    /// The turn is over.
    Done(Next),
}

/// Names the client of the connection being driven, for a log line.
fn who<'a, S: Io>(io: &'a S, bufs: &'a Buffers) -> Peer<'a, S> {
    Peer {
        io,
        client: bufs.client.as_ref(),
    }
}

/// The state after an error line or a shutdown: flush, then linger.
fn closing(reason: CloseReason) -> State {
    State::Flushing {
        reason,
        then: AfterFlush::Linger,
        until: None,
    }
}

// ----- the helpers the arms call: each does one thing, with a named outcome ----

/// The outcome of [`take_header`].
enum Header {
    /// More bytes are needed.
    Incomplete,
    /// Not a PROXY header.
    Invalid,
    /// Parsed; the last `rest` bytes read are the client's first input.
    Done { rest: usize },
}

/// Collects PROXY header bytes (headers may arrive split over any number
/// of reads) and, once parsed, keeps the real client in `client`.
fn take_header(head: &mut BytesMut, data: &[u8], client: &mut Option<SocketAddr>) -> Header {
    head.extend_from_slice(data);
    match proxy::parse(head) {
        proxy::Parsed::Incomplete => Header::Incomplete,
        proxy::Parsed::Invalid(why) => {
            debug!("invalid PROXY header: {why}");
            Header::Invalid
        }
        proxy::Parsed::Done { len, source } => {
            match source {
                Some(named) => {
                    debug!("PROXY header names client {named}");
                    *client = Some(named);
                }
                None => debug!("PROXY health check (LOCAL/UNKNOWN)"),
            }
            Header::Done {
                rest: head.len() - len,
            }
        }
    }
}

/// The reading side of one turn: the loop's read buffer, how much this turn
/// may still read, and what the last read proved.
struct Reader<'a> {
    buf: &'a mut [u8],
    /// Bytes this turn may still read.
    budget: usize,
    /// Nothing more to read this turn: the event was not for reading, or a
    /// read came back short or `WouldBlock` (an edge will come for more).
    dry: bool,
    /// The poller saw the client's FIN.
    fin: bool,
    /// `buf[replay..end]` was handed back by [`Reader::unread`].
    replay: usize,
    /// The end of the last read's bytes in `buf`.
    end: usize,
    /// Bytes read from the socket this turn.
    received: usize,
}

/// The outcome of [`Reader::read`], mapped from `io::Result` where the call is.
enum Read<'a> {
    /// Bytes to handle.
    Data(&'a [u8]),
    /// Nothing more this turn; an event will come when there is.
    Dry,
    /// Nothing more this turn, but input may wait with no event to say so.
    Later,
    /// The client half-closed.
    Eof,
    /// The connection is broken (`reset` or `error`).
    Failed(CloseReason),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a mut [u8], hints: Hints, budget: usize) -> Reader<'a> {
        Reader {
            buf,
            budget,
            dry: !hints.readable,
            fin: hints.read_closed,
            replay: 0,
            end: 0,
            received: 0,
        }
    }

    /// Reads once, unless this turn is known to be over. A short read means
    /// the socket is drained, so the read that would only say `WouldBlock`
    /// is skipped, except after a FIN (`fin`), whose edge may be consumed.
    fn read(&mut self, io: &mut impl Io, fin: bool) -> Read<'_> {
        if self.replay < self.end {
            let start = mem::replace(&mut self.replay, self.end);
            return Read::Data(&self.buf[start..self.end]);
        }
        if self.dry {
            return Read::Dry;
        }
        if self.budget == 0 {
            return Read::Later;
        }
        let want = self.budget.min(self.buf.len());
        loop {
            return match io.read(&mut self.buf[..want]) {
                Ok(0) => Read::Eof,
                Ok(n) => {
                    self.budget -= n;
                    self.received += n;
                    self.dry = n < want && !fin;
                    (self.replay, self.end) = (n, n);
                    Read::Data(&self.buf[..n])
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.dry = true;
                    Read::Dry
                }
                Err(e) if is_reset(&e) => Read::Failed(CloseReason::Reset),
                Err(e) => {
                    debug!("read failed: {e}");
                    Read::Failed(CloseReason::Error)
                }
            };
        }
    }

    /// Hands the last `n` bytes of the last read back: the next `read`
    /// returns them again.
    fn unread(&mut self, n: usize) {
        debug_assert!(n <= self.end);
        self.replay = self.end - n;
    }

    /// No more reading this turn; `read` answers [`Read::Later`].
    fn stop_for_now(&mut self) {
        self.budget = 0;
        self.dry = false;
    }
}

/// The peer went away: not worth more than debug.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// The outcome of [`write_out`].
enum Wrote {
    /// Nothing is left to write.
    All,
    /// The socket is full; the rest waits for WRITABLE.
    Blocked,
    /// The connection is broken (`reset` or `error`).
    Failed(CloseReason),
}

/// Writes queued replies until none are left or the socket is full.
fn write_out(
    io: &mut impl Io,
    out: &mut BytesMut,
    tally: &mut Tally,
    client: Option<SocketAddr>,
) -> Wrote {
    while !out.is_empty() {
        match io.write(out) {
            Ok(0) => return Wrote::Failed(CloseReason::Error),
            Ok(n) => {
                tally.sent += n as u64;
                out.advance(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Wrote::Blocked,
            Err(e) if is_reset(&e) => return Wrote::Failed(CloseReason::Reset),
            Err(e) => {
                let peer = Peer {
                    io: &*io,
                    client: client.as_ref(),
                };
                debug!("{peer}: write failed: {e}");
                return Wrote::Failed(CloseReason::Error);
            }
        }
    }
    Wrote::All
}

/// The outcome of [`discard`].
enum Discarded {
    /// The socket is drained for now; this many bytes may still come.
    Waiting(u32),
    /// EOF, an error, or the allowance is spent: time to close.
    Finished,
}

/// Reads and drops input until `WouldBlock`, EOF or `allowance` bytes.
fn discard(io: &mut impl Io, buf: &mut [u8], allowance: u32) -> Discarded {
    let mut allowance = allowance as usize;
    loop {
        let want = buf.len().min(allowance.max(1));
        match io.read(&mut buf[..want]) {
            Ok(0) => return Discarded::Finished,
            Ok(n) if n >= allowance => return Discarded::Finished,
            Ok(n) => allowance -= n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Discarded::Waiting(allowance as u32);
            }
            Err(_) => return Discarded::Finished,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Tests grouped by the state the connection starts in, each with its
    //! fixture (`conn_open()`, `conn_paused()` …, after smoltcp's socket
    //! tests). Every `handle_*` verdict is asserted.
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
        fn more(&mut self, bytes: &[u8]) {
            self.reads.push_back(Ok(bytes.to_vec()));
        }
    }

    impl io::Read for Script {
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
        fn peer_addr(&self) -> io::Result<SocketAddr> {
            Ok(peer())
        }
    }

    /// The loop's side of a test: config, clock, buffers.
    struct Harness {
        cfg: Config,
        clock: Clock,
        timeouts: Timeouts,
        now: Tick,
        input: Vec<u8>,
        spare: Spare,
        tally: Tally,
    }

    impl Harness {
        fn new() -> Harness {
            Harness::with(Config::default())
        }
        fn with(cfg: Config) -> Harness {
            let clock = Clock::new(cfg.timer_tick(), std::time::Instant::now());
            Harness {
                timeouts: Timeouts::new(&cfg, &clock),
                cfg,
                clock,
                now: Tick::FIRST,
                input: vec![0; 4096],
                spare: Spare::default(),
                tally: Tally::default(),
            }
        }
        /// The first tick by which `d` has surely passed since any moment
        /// of the current tick.
        fn later(&self, d: Duration) -> Tick {
            self.now.after(self.clock.span(d))
        }
        fn new_conn(&self, kind: Kind) -> Conn {
            Conn::new(kind, self.now, &self.timeouts)
        }
        fn deadline(&self, conn: &Conn) -> Option<Tick> {
            conn.deadline(&self.timeouts)
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
        fn timeout(&mut self, conn: &mut Conn) -> Next {
            conn.handle_timeout(self.now, &self.timeouts)
        }
        fn parts(&mut self) -> (Scratch<'_>, Cx<'_>) {
            let scratch = Scratch {
                input: &mut self.input,
                spare: &mut self.spare,
            };
            let cx = Cx {
                cfg: &self.cfg,
                timeouts: &self.timeouts,
                now: self.now,
                tally: &mut self.tally,
                metrics: &[],
            };
            (scratch, cx)
        }
        /// Moves the clock on until `by` has surely passed.
        fn advance(&mut self, by: Duration) {
            self.now = self.later(by);
        }
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn said(content: &[u8]) -> Vec<u8> {
        [line::PREFIX, content, line::SUFFIX].concat()
    }

    fn small_output() -> Config {
        Config {
            max_pending_output: 8,
            mode: line::Mode::Raw,
            ..Config::default()
        }
    }

    fn proxy_config() -> Config {
        Config {
            proxy_header_timeout: Some(Duration::from_secs(5)),
            ..Config::default()
        }
    }

    fn conn_open(h: &Harness) -> Conn {
        let conn = h.new_conn(Kind::Client);
        assert_eq!(conn.state(), &State::Open { fin: false });
        conn
    }

    fn conn_proxy_header(h: &Harness) -> Conn {
        let conn = h.new_conn(Kind::Client);
        assert!(matches!(conn.state(), State::ProxyHeader { .. }));
        conn
    }

    fn conn_request(h: &Harness) -> Conn {
        let conn = h.new_conn(Kind::Metrics);
        assert!(matches!(conn.state(), State::Request { .. }));
        conn
    }

    /// A connection paused behind `max_pending_output` = 8 with a client
    /// that reads nothing: 9 bytes of replies queued, `c\n` unanswered.
    fn conn_paused(h: &mut Harness) -> (Conn, Script) {
        let mut conn = conn_open(h);
        let mut io = Script::new().data(b"aaaa\nbbb\nc\n").room(0);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(matches!(
            conn.state(),
            State::Paused {
                then: Resume::Read,
                ..
            }
        ));
        (conn, io)
    }

    /// A connection whose client sent `bye\n` and its EOF but reads only 4
    /// bytes: the reply is half written.
    fn conn_flushing(h: &mut Harness) -> (Conn, Script) {
        let mut conn = conn_open(h);
        let mut io = Script::new().data(b"bye\n").eof().room(4);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(matches!(
            conn.state(),
            State::Flushing {
                reason: CloseReason::Eof,
                then: AfterFlush::Close,
                ..
            }
        ));
        (conn, io)
    }

    /// A connection that sent a line over `max_line` = 2 and got its error.
    fn conn_lingering(h: &mut Harness) -> (Conn, Script) {
        let mut conn = conn_open(h);
        let mut io = Script::new().data(b"toolong\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, b"error: line too long (max 2 bytes)\n");
        assert!(io.shut, "write side shut down before lingering");
        assert!(matches!(
            conn.state(),
            State::Lingering {
                reason: CloseReason::TooLong,
                ..
            }
        ));
        (conn, io)
    }

    fn max_line_2() -> Config {
        Config {
            max_line: 2,
            ..Config::default()
        }
    }

    // ----- ProxyHeader ----------------------------------------------------

    #[test]
    fn proxy_header_then_lines_in_the_same_read() {
        let mut h = Harness::with(proxy_config());
        let mut conn = conn_proxy_header(&h);
        let mut io = Script::new().data(b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 80\r\nhi\nthere");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(conn.peer(&io).to_string(), "10.0.0.1:5000");
        assert_eq!(io.written, said(b"hi"));
        assert_eq!(
            h.tally.received, 46,
            "the bytes after the header count once"
        );
        assert_eq!(conn.state(), &State::Open { fin: false });
    }

    #[test]
    fn proxy_header_split_over_reads() {
        let mut h = Harness::with(proxy_config());
        let mut conn = conn_proxy_header(&h);
        let mut io = Script::new().data(b"PROXY TCP4 10.0.0.1 1");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        io.more(b"0.0.0.2 5000 80\r\nx\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, said(b"x"));
    }

    #[test]
    fn proxy_header_invalid_closes() {
        let mut h = Harness::with(proxy_config());
        let mut conn = conn_proxy_header(&h);
        let mut io = Script::new().data(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Proxy));
        assert!(
            io.written.is_empty(),
            "nothing is answered before the header"
        );
    }

    #[test]
    fn proxy_header_late_or_cut_short_closes() {
        let mut h = Harness::with(proxy_config());
        let mut conn = conn_proxy_header(&h);
        assert_eq!(h.deadline(&conn), Some(h.later(Duration::from_secs(5))));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.timeout(&mut conn), Next::Close(CloseReason::Proxy));
        let mut conn = conn_proxy_header(&h);
        let mut io = Script::new().data(b"PROXY TCP4").eof();
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Proxy));
    }

    #[test]
    fn proxy_header_shutdown_closes_at_once() {
        let mut h = Harness::with(proxy_config());
        let mut conn = conn_proxy_header(&h);
        let mut io = Script::new().data(b"PROXY TCP4 10.0.0.1");
        assert_eq!(
            h.shutdown(&mut conn, &mut io),
            Next::Close(CloseReason::Shutdown)
        );
    }

    #[test]
    fn proxy_header_shutdown_answers_the_lines_already_sent() {
        let mut h = Harness::with(proxy_config());
        let mut conn = conn_proxy_header(&h);
        let mut io = Script::new().data(b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 80\r\nhi\nhal");
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, said(b"hi"), "the unfinished line is not a line");
        assert!(matches!(
            conn.state(),
            State::Lingering {
                reason: CloseReason::Shutdown,
                ..
            }
        ));
    }

    // ----- Request ----------------------------------------------------------

    #[test]
    fn request_gets_a_page_and_lingers() {
        let mut h = Harness::new();
        let mut conn = conn_request(&h);
        let mut io = Script::new().data(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(io.written.starts_with(b"HTTP/1.1 200"));
        assert!(io.shut);
        assert_eq!(h.deadline(&conn), Some(h.later(h.cfg.linger_time)));
        io.more(b"");
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
    }

    #[test]
    fn request_is_bounded_in_time() {
        let mut h = Harness::new();
        let mut conn = conn_request(&h);
        let mut io = Script::new().data(b"GET /met");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        h.advance(h.cfg.request_timeout);
        assert_eq!(h.timeout(&mut conn), Next::Close(CloseReason::Idle));
    }

    // ----- Open -------------------------------------------------------------

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
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(io.written.is_empty());
        io.more(b"lo\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
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
        assert_eq!(h.tally.lines, 2);
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
    fn open_write_reset_closes_as_reset() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"x\n").room(0);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        /// A socket whose peer is gone: every write fails with EPIPE.
        struct Broken;
        impl io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl Io for Broken {
            fn shutdown_write(&mut self) -> io::Result<()> {
                Ok(())
            }
            fn peer_addr(&self) -> io::Result<SocketAddr> {
                Err(io::ErrorKind::NotConnected.into())
            }
        }
        let (mut scratch, mut cx) = h.parts();
        let next = conn.handle_io(&mut Broken, Hints::default(), &mut scratch, &mut cx);
        assert_eq!(next, Next::Close(CloseReason::Reset));
    }

    #[test]
    fn open_interrupted_read_is_retried() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().err(io::ErrorKind::Interrupted).data(b"x\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, b"you said: x!\n");
    }

    #[test]
    fn open_short_read_skips_the_read_that_would_block() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        // A short read, then bytes that arrived after it: they get their
        // own edge, so this turn does not read them.
        let mut io = Script::new().data(b"a\n").data(b"b\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, said(b"a"));
        assert_eq!(io.reads.len(), 1);
    }

    #[test]
    fn open_fin_makes_it_read_to_the_end() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\n").data(b"b\n").eof();
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
        assert_eq!(io.written, [said(b"a"), said(b"b")].concat());
    }

    #[test]
    fn open_read_budget_asks_to_be_served_again() {
        let mut h = Harness::with(Config {
            read_budget: 4,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\nb\nc\nd\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Again);
        assert_eq!(h.tally.received, 4);
        assert_eq!(h.io(&mut conn, &mut io), Next::Again);
        assert_eq!(h.tally.lines, 4);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
    }

    #[test]
    fn open_idle_timeout_counts_from_the_last_complete_line() {
        let mut h = Harness::new();
        let idle = h.cfg.idle_timeout.unwrap();
        let mut conn = conn_open(&h);
        h.advance(idle / 2);
        let mut io = Script::new().data(b"line\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        h.advance(idle / 2);
        // Trickled bytes do not count.
        io.more(b"x");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(h.timeout(&mut conn), Next::Keep);
        h.advance(idle / 2);
        assert_eq!(h.timeout(&mut conn), Next::Close(CloseReason::Idle));
    }

    #[test]
    fn open_slow_writer_gets_writable_interest() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"hello\n").room(3);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(conn.interest(), Want::ReadWrite);
        io.room = usize::MAX;
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, b"you said: hello!\n");
        assert_eq!(conn.interest(), Want::Read);
    }

    #[test]
    fn open_ping_pong_reuses_the_loops_spare_buffer() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"first\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        let lent = h.spare.capacity();
        assert!(lent > 0, "the spare keeps the allocation");
        assert_eq!(conn.buffered_capacity(), 0);
        io.more(b"again\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(h.spare.capacity(), lent, "written bytes are reclaimed");
    }

    #[test]
    fn open_a_drained_backlog_is_freed_not_kept_as_the_spare() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        // 104 KiB of replies queue up while the client reads nothing…
        let mut io = Script::new().data(&b"x\n".repeat(8 * 1024)).room(0);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(conn.pending_output(), 8 * 1024 * said(b"x").len());
        assert!(conn.buffered_capacity() > SPARE_MAX);
        // …then it reads them all: the big allocation is not kept.
        io.room = usize::MAX;
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written.len(), 8 * 1024 * said(b"x").len());
        assert_eq!(conn.buffered_capacity(), 0);
        assert!(
            h.spare.capacity() <= SPARE_MAX + mem::size_of::<Buffers>(),
            "spare holds {} bytes",
            h.spare.capacity()
        );
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
    fn open_shutdown_answers_everything_already_sent() {
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
    fn open_shutdown_drops_an_unfinished_line() {
        let mut h = Harness::new();
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"done\nhalf");
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, said(b"done"));
        assert!(matches!(
            conn.state(),
            State::Lingering {
                reason: CloseReason::Shutdown,
                ..
            }
        ));
    }

    #[test]
    fn open_shutdown_keeps_the_output_bound_for_a_client_that_does_not_read() {
        let mut h = Harness::with(Config {
            max_pending_output: 1024,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        // 64 KiB of empty lines would be 768 KiB of replies.
        let mut io = Script::new().data(&[b'\n'; 65536]).room(0);
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
        assert!(conn.pending_output() <= 1024 + said(b"").len());
        assert!(matches!(
            conn.state(),
            State::Paused {
                then: Resume::Finish,
                ..
            }
        ));
        // As the client reads, the rest of what was read (one read of the
        // harness's 4 KiB buffer) is answered, then the close; what it sent
        // after is not read once shutting down.
        io.room = usize::MAX;
        for _ in 0..1000 {
            assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
            if !matches!(conn.state(), State::Paused { .. }) {
                break;
            }
        }
        assert!(matches!(conn.state(), State::Lingering { .. }));
        assert_eq!(io.written.len(), 4096 * said(b"").len());
    }

    // ----- Paused -----------------------------------------------------------

    #[test]
    fn paused_with_a_one_byte_bound_still_resumes() {
        let mut h = Harness::with(Config {
            max_pending_output: 1,
            ..Config::default()
        });
        let mut conn = conn_open(&h);
        let mut io = Script::new().data(b"a\nb\nc\n");
        // Each turn answers one line, writes it, answers the next …
        assert_eq!(h.io(&mut conn, &mut io), Next::Again);
        assert_eq!(io.written, [said(b"a"), said(b"b"), said(b"c")].concat());
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
    }

    #[test]
    fn paused_neither_reads_nor_answers() {
        let mut h = Harness::with(small_output());
        let (mut conn, mut io) = conn_paused(&mut h);
        assert_eq!(conn.pending_output(), 9);
        io.more(b"more\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.reads.len(), 1, "no read while paused");
        assert_eq!(conn.interest(), Want::Write);
    }

    #[test]
    fn paused_resumes_below_half_and_answers_buffered_lines() {
        let mut h = Harness::with(small_output());
        let (mut conn, mut io) = conn_paused(&mut h);
        io.room = usize::MAX;
        assert_eq!(
            h.io(&mut conn, &mut io),
            Next::Again,
            "input may wait in the kernel"
        );
        assert_eq!(io.written, b"aaaa\nbbb\nc\n");
        assert_eq!(conn.state(), &State::Open { fin: false });
    }

    #[test]
    fn paused_remembers_the_fin() {
        let mut h = Harness::with(small_output());
        let (mut conn, mut io) = conn_paused(&mut h);
        io.more(b"d\n");
        io.more(b"");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(matches!(conn.state(), State::Paused { fin: true, .. }));
        io.room = usize::MAX;
        assert_eq!(h.io(&mut conn, &mut io), Next::Again);
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
        assert_eq!(io.written, b"aaaa\nbbb\nc\nd\n");
    }

    #[test]
    fn paused_still_times_out() {
        let mut h = Harness::with(small_output());
        let (mut conn, _io) = conn_paused(&mut h);
        h.advance(h.cfg.idle_timeout.unwrap());
        assert_eq!(h.timeout(&mut conn), Next::Close(CloseReason::Idle));
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

    // ----- Flushing ---------------------------------------------------------

    #[test]
    fn flushing_after_eof_waits_for_the_reader() {
        let mut h = Harness::new();
        let (mut conn, mut io) = conn_flushing(&mut h);
        assert_eq!(conn.interest(), Want::Write);
        io.room = usize::MAX;
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Eof));
        assert_eq!(io.written, b"you said: bye!\n");
        assert!(!io.shut, "the EOF was read: no need to linger");
    }

    #[test]
    fn flushing_still_times_out() {
        let mut h = Harness::new();
        let (mut conn, _io) = conn_flushing(&mut h);
        h.advance(h.cfg.idle_timeout.unwrap());
        assert_eq!(h.timeout(&mut conn), Next::Close(CloseReason::Idle));
    }

    #[test]
    fn flushing_busy_sends_its_line_then_lingers_until_eof() {
        let mut h = Harness::new();
        let mut conn = h.new_conn(Kind::Busy);
        let mut io = Script::new().data(b"hello\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(io.written, BUSY_REPLY);
        assert!(io.shut);
        io.more(b"");
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::Busy));
    }

    #[test]
    fn flushing_busy_is_bounded_in_time_even_without_an_idle_timeout() {
        let mut h = Harness::with(Config {
            idle_timeout: None,
            ..Config::default()
        });
        let mut conn = h.new_conn(Kind::Busy);
        let mut io = Script::new().room(0);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert_eq!(h.deadline(&conn), Some(h.later(h.cfg.request_timeout)));
    }

    // ----- Lingering --------------------------------------------------------

    #[test]
    fn lingering_discards_input_until_eof() {
        let mut h = Harness::with(max_line_2());
        let (mut conn, mut io) = conn_lingering(&mut h);
        io.more(b"still sending\n");
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        assert!(io.reads.is_empty(), "read and dropped");
        io.more(b"");
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::TooLong));
    }

    #[test]
    fn lingering_is_bounded_in_time() {
        let mut h = Harness::with(max_line_2());
        let (mut conn, _io) = conn_lingering(&mut h);
        assert_eq!(h.deadline(&conn), Some(h.later(h.cfg.linger_time)));
        h.advance(h.cfg.linger_time);
        assert_eq!(h.timeout(&mut conn), Next::Close(CloseReason::TooLong));
    }

    #[test]
    fn lingering_is_bounded_in_bytes() {
        let mut h = Harness::with(Config {
            linger_bytes: 10,
            ..max_line_2()
        });
        let (mut conn, mut io) = conn_lingering(&mut h);
        io.more(&[b'x'; 6]);
        assert_eq!(h.io(&mut conn, &mut io), Next::Keep);
        io.more(&[b'x'; 6]);
        assert_eq!(h.io(&mut conn, &mut io), Next::Close(CloseReason::TooLong));
    }

    #[test]
    fn lingering_survives_a_shutdown() {
        let mut h = Harness::with(max_line_2());
        let (mut conn, mut io) = conn_lingering(&mut h);
        assert_eq!(h.shutdown(&mut conn, &mut io), Next::Keep);
        assert!(matches!(conn.state(), State::Lingering { .. }));
    }
}
