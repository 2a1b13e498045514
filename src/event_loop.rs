//! The readiness loop: one thread, one `mio::Poll`, one slab of connections.
//!
//! Two rules of mio's edge-triggered readiness shape everything here:
//!
//! - **Spurious events.** `poll` may report readiness that is not there, and
//!   an event's flags are hints. Every handler therefore just tries the
//!   syscall and treats `WouldBlock` as "nothing after all"; no event is
//!   trusted to mean data, and none is needed to mean an error.
//! - **Draining readiness.** An edge is reported once. After an event the
//!   handler reads (or accepts, or writes) until `WouldBlock`, or until a
//!   budget is spent, and then the loop itself remembers that work is left
//!   (the ready list, the accept pause timer): no new event will come for
//!   bytes already in the kernel.
//!
//! One turn of [`EventLoop::run`]: compute the timeout (zero with work on
//! the ready list, else the start of the next tick that holds a deadline,
//! else sleep: an idle server does not wake), poll, dispatch each event by
//! its token, serve the ready list, fire expired timers, and after a burst
//! of closes hand freed memory back to the system. This file
//! is mechanism: what a connection does is `conn.rs`, what a new connection
//! becomes is `admission.rs`, the limits are `config.rs`. The public surface
//! is [`EventLoop::new`] (or [`EventLoop::take_over`], for what a live
//! upgrade handed over), [`EventLoop::run`] and a [`LoopHandle`].
//! (`main.rs` runs a second, tiny `Poll` of its own for signals.)
//!
//! A live upgrade freezes a loop between two turns ([`LoopHandle::freeze`]):
//! it describes every listener and connection ([`Frozen`]) and then waits,
//! reading and writing nothing, for the verdict: [`Verdict::HandedOver`]
//! (the new process holds the sockets now: `run` returns and the loop's
//! copies of the descriptors are closed, which ends no connection) or
//! [`Verdict::Resume`] (the upgrade failed: it serves on as if nothing had
//! happened, since nothing had).
//!
//! Stale tokens: a connection's token carries its slab key *and* a
//! generation ([`ConnId`]), and so do timer entries and the ready list. A
//! slot freed and reused in the same turn can never be reached through the
//! old owner's token (mio#172, mio#219).

use crate::admission::{self, Counts, Decision, Kind, Limits, Service};
use crate::config::{Config, MAX_LINGERING_BUSY, MAX_METRICS_CONNS};
use crate::conn::{
    BUSY_REPLY, CloseReason, Conn, Cx, Hints, Next, Saved, Scratch, Spare, Tally, Timeouts, Want,
};
use crate::listener::{self, Accepted};
use crate::metrics::{self, Counters, Snapshot};
use crate::timer::{Clock, Tick, Timer};
use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("echoloop packs a slab key and a generation into a 64-bit token");

/// A connection's identity: its slab key and the generation of the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    key: u32,
    generation: u32,
}

/// `key.generation`: names a connection in the logs, so that its close
/// line can be matched with its accept line once the peer is gone (the
/// address is not kept, and a reset socket no longer knows it).
impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.key, self.generation)
    }
}

impl ConnId {
    /// Generations stay below 2^31 so a connection token stays below 2^63,
    /// out of the range of the fixed tokens.
    const GEN_MASK: u32 = 0x7fff_ffff;

    fn token(self) -> Token {
        Token(((self.generation as usize) << 32) | self.key as usize)
    }
}

/// Fixed tokens sit at the top of the `usize` range.
const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1; // listener i is LISTENER_BASE - i

/// What a token names, decoded in one place.
enum Source {
    Waker,
    Listener(usize),
    Conn(ConnId),
}

fn source(token: Token) -> Source {
    match token {
        WAKER => Source::Waker,
        Token(t) if t > (1 << 63) => Source::Listener(LISTENER_BASE - t),
        Token(t) => Source::Conn(ConnId {
            key: t as u32,
            generation: (t >> 32) as u32,
        }),
    }
}

/// The accept queue is retried after this long when descriptors run out,
/// doubling while the episode lasts (memcached 10 ms … Netty 1 s).
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Events taken from the kernel per `poll`.
const EVENTS_CAPACITY: usize = 1024;

/// Freed buffer memory is handed back to the system once this much of it
/// has been freed by closing connections…
const TRIM_AFTER: usize = 1 << 20;
/// …and at most this often.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Slab slots reserved up front (address space only): enough for a
/// million connections per loop.
const MAX_RESERVED_SLOTS: usize = 1 << 20;

/// Asks a running loop, from any thread, to shut down or to hand over.
#[derive(Clone)]
pub struct LoopHandle {
    waker: Arc<Waker>,
    requests: mpsc::Sender<Request>,
}

/// What a [`LoopHandle`] asks; the loop reads them when its waker fires.
enum Request {
    Shutdown,
    Freeze(mpsc::Sender<Frozen>),
}

impl LoopHandle {
    /// Starts the graceful shutdown of the loop (idempotent).
    pub fn shutdown(&self) {
        self.ask(Request::Shutdown);
    }

    /// Asks the loop to stop at the end of its turn and describe what it
    /// serves; the [`Frozen`] arrives on the returned channel (nothing
    /// arrives if the loop has already ended).
    pub fn freeze(&self) -> mpsc::Receiver<Frozen> {
        let (tx, rx) = mpsc::channel();
        self.ask(Request::Freeze(tx));
        rx
    }

    fn ask(&self, request: Request) {
        // A loop that has ended dropped its receiver: nothing to ask.
        if self.requests.send(request).is_ok()
            && let Err(e) = self.waker.wake()
        {
            error!("cannot wake an event loop: {e}");
        }
    }
}

/// A loop stopped between two turns for a live upgrade: everything it
/// serves, and where to send the [`Verdict`] it waits for. The descriptors
/// stay open (and untouched) until the verdict is sent or this is dropped,
/// which counts as [`Verdict::Resume`].
pub struct Frozen {
    /// Each listening socket and what it serves.
    pub listeners: Vec<HandedListener<RawFd>>,
    /// Each connection's socket, how it is counted, and its state.
    pub conns: Vec<HandedConn<RawFd>>,
    /// The loop's counters (its last turn's traffic included).
    pub counters: Snapshot,
    /// The clock its ticks count on.
    pub clock: Clock,
    /// When it froze.
    pub since: Instant,
    /// Where the verdict goes.
    pub verdict: mpsc::Sender<Verdict>,
}

/// What a frozen loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Another process serves everything now: return from `run`, closing
    /// this process's descriptors (the sockets live on in the other).
    HandedOver,
    /// The upgrade failed: go on serving.
    Resume,
}

/// A listening socket in a hand-over (`S`: the descriptor of a frozen
/// loop, or the socket once received) and what it serves.
pub struct HandedListener<S> {
    /// The socket.
    pub socket: S,
    /// What its connections become.
    pub service: Service,
}

/// A connection in a hand-over (`S` as in [`HandedListener`]).
pub struct HandedConn<S> {
    /// The socket.
    pub socket: S,
    /// How it is counted.
    pub kind: Kind,
    /// Its state machine's data.
    pub saved: Saved,
}

/// What a loop of the old process handed over, its sockets open here.
pub struct Handed {
    /// Its listening sockets.
    pub listeners: Vec<HandedListener<std::net::TcpListener>>,
    /// Its connections.
    pub conns: Vec<HandedConn<std::net::TcpStream>>,
    /// Its clock (the connections' ticks count on it).
    pub clock: Clock,
}

/// What is handed to every loop: the configuration and the few things
/// shared across loops, none of them touched per line.
#[derive(Clone)]
pub struct Shared {
    /// Limits and mode.
    pub cfg: Arc<Config>,
    /// Every loop's counters (a `/metrics` page sums them); loop `i` writes
    /// only `counters[i]`.
    pub counters: Arc<[Arc<Counters>]>,
    /// Live echo clients in the whole process (for `--max-connections`).
    pub live: Arc<AtomicUsize>,
}

/// What the loop tells a connection in [`EventLoop::drive`].
#[derive(Clone, Copy, Debug)]
enum Happened {
    /// Its socket may be ready (or it is served from the ready list).
    Io(Hints),
    /// The server is shutting down.
    Shutdown,
}

/// A listening socket and what it serves.
struct Listener {
    socket: TcpListener,
    service: Service,
}

/// A connection in the slab with the loop's bookkeeping for it: all an
/// idle connection costs in user space, besides its timer entry (see the
/// size test at the bottom).
struct Slot {
    /// The protocol state machine.
    conn: Conn,
    /// The deadline of this connection's live timer entry, if one is
    /// armed; entries for another deadline are stale and ignored when they
    /// fire.
    armed: Option<Tick>,
    /// The socket; dropping the slot closes it.
    socket: TcpStream,
    /// Distinguishes this owner of the slab key from earlier ones.
    generation: u32,
    /// What the connection is to the server (how it is counted).
    kind: Kind,
    /// The interest currently registered with the poll.
    registered: Want,
    /// On the ready list already.
    queued: bool,
}

/// The connections and what remembers work for them.
struct Conns {
    /// Live connections, keyed by the low half of their token.
    slab: Slab<Slot>,
    /// Connections to serve next turn although no event will come for them
    /// ([`Next::Again`]).
    ready: Vec<ConnId>,
    /// Idle, linger and request deadlines.
    timer: Timer<ConnId>,
    /// Real time in the timer's ticks.
    clock: Clock,
    /// The timeouts in those ticks.
    timeouts: Timeouts,
    /// The generation given to the next connection.
    next_generation: u32,
}

impl Conns {
    fn ids(&self) -> Vec<ConnId> {
        self.slab
            .iter()
            .map(|(key, slot)| ConnId {
                key: key as u32,
                generation: slot.generation,
            })
            .collect()
    }
}

/// What the loop counts, and where.
struct Counting {
    /// Traffic counted since the last turn, added to `mine` once a turn.
    tally: Tally,
    /// This loop's metrics (written only here).
    mine: Arc<Counters>,
    /// Every loop's metrics, for `/metrics` pages.
    all: Arc<[Arc<Counters>]>,
    /// Live echo clients in the whole process.
    live: Arc<AtomicUsize>,
    /// Busy connections in this loop now.
    busy: usize,
    /// Metrics connections in this loop now.
    metrics: usize,
}

impl Counting {
    /// A new connection of `kind` takes its place under its cap (an echo
    /// client's place was reserved in `live` before admission).
    fn opened(&mut self, kind: Kind) {
        match kind {
            Kind::Client => {}
            Kind::Busy => self.busy += 1,
            Kind::Metrics => self.metrics += 1,
        }
    }

    /// Counts a closed connection and frees its place under its cap.
    fn closed(&mut self, kind: Kind, reason: CloseReason) {
        match kind {
            Kind::Client => {
                self.mine.closed(reason);
                self.live.fetch_sub(1, Ordering::Relaxed);
                if reason == CloseReason::Proxy {
                    metrics::proxy_rejected(Instant::now());
                }
            }
            Kind::Busy => {
                self.mine.closed(CloseReason::Busy);
                self.busy -= 1;
            }
            Kind::Metrics => self.metrics -= 1,
        }
    }

    fn publish(&mut self) {
        let t = std::mem::take(&mut self.tally);
        if t != Tally::default() {
            self.mine.add_lines(t.lines);
            self.mine.add_received(t.received);
            self.mine.add_sent(t.sent);
        }
    }
}

/// Accepting is paused while descriptors are exhausted.
struct Accepting {
    /// Set while paused: when to retry.
    paused_until: Option<Instant>,
    /// The next pause, doubled while descriptors stay exhausted.
    backoff: Duration,
}

/// Handing freed memory back to the system after a burst.
///
/// glibc keeps what a thread frees in its arena for reuse: after 300
/// clients that each made the server hold 256 KiB of replies have gone,
/// the server would stay at its high-water mark for good. So once closes
/// have freed [`TRIM_AFTER`] bytes of buffers, the loop calls
/// `malloc_trim(0)`, which returns every free page of every arena; at most
/// once per [`TRIM_EVERY`], and never because of a line: ping-pong and
/// pipelining clients reuse the loop's spare buffers and free nothing.
struct Trimming {
    /// Buffer bytes freed by closes since the last trim.
    released: usize,
    /// When the last trim ran.
    last: Option<Instant>,
    /// A trim waiting for [`TRIM_EVERY`] to pass since the last one.
    due: Option<Instant>,
}

/// One single-threaded event loop. Build it with [`EventLoop::new`], take a
/// [`LoopHandle`], then [`EventLoop::run`] it on its own thread.
pub struct EventLoop {
    /// The poller; only this file touches it.
    poll: Poll,
    /// Listening sockets (token `LISTENER_BASE - index`); emptied at shutdown.
    listeners: Vec<Listener>,
    /// Wakes the loop from another thread (a [`LoopHandle`] request).
    waker: Arc<Waker>,
    /// What [`LoopHandle`]s ask, read when the waker fires.
    requests: mpsc::Receiver<Request>,
    /// Its sender, cloned into every handle.
    handle_tx: mpsc::Sender<Request>,
    /// A freeze asked for, done at the end of the turn.
    freeze_asked: Option<mpsc::Sender<Frozen>>,
    /// The connections, the ready list and the timer wheel.
    conns: Conns,
    /// The read buffer every connection reads into.
    input: Box<[u8]>,
    /// Buffers lent to the connection being served (see [`Spare`]).
    spare: Spare,
    /// Counters and the counts admission looks at.
    counting: Counting,
    /// The accept pause.
    accepting: Accepting,
    /// Returning freed memory.
    trimming: Trimming,
    /// Once shutting down: when to drop whatever has not finished.
    shutdown_deadline: Option<Instant>,
    /// Limits and mode.
    cfg: Arc<Config>,
    /// This loop's number, for logs.
    index: usize,
}

impl EventLoop {
    /// Loop number `index`, serving line-echo clients on `echo` and metrics
    /// clients on `metrics` (all non-blocking listeners).
    pub fn new(
        shared: Shared,
        index: usize,
        echo: Vec<std::net::TcpListener>,
        metrics: Option<std::net::TcpListener>,
    ) -> io::Result<EventLoop> {
        let clock = Clock::new(shared.cfg.timer_tick(), Instant::now());
        let services = echo
            .into_iter()
            .map(|l| (l, Service::Echo))
            .chain(metrics.map(|l| (l, Service::Metrics)));
        EventLoop::build(shared, index, services.collect(), clock)
    }

    /// Loop number `index`, serving what a loop of the old process handed
    /// over in a live upgrade: its listeners, and its connections resumed
    /// where they were, each served once at the first turn.
    pub fn take_over(shared: Shared, index: usize, handed: Handed) -> io::Result<EventLoop> {
        let listeners = (handed.listeners.into_iter())
            .map(|l| (l.socket, l.service))
            .collect();
        let mut event_loop = EventLoop::build(shared, index, listeners, handed.clock)?;
        for c in handed.conns {
            event_loop.adopt(TcpStream::from_std(c.socket), c.kind, c.saved);
        }
        Ok(event_loop)
    }

    fn build(
        shared: Shared,
        index: usize,
        services: Vec<(std::net::TcpListener, Service)>,
        clock: Clock,
    ) -> io::Result<EventLoop> {
        let Shared {
            cfg,
            counters,
            live,
        } = shared;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listeners = Vec::new();
        for (i, (l, service)) in services.into_iter().enumerate() {
            let mut socket = TcpListener::from_std(l);
            poll.registry()
                .register(&mut socket, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push(Listener { socket, service });
        }
        let (handle_tx, requests) = mpsc::channel();
        Ok(EventLoop {
            poll,
            listeners,
            waker,
            requests,
            handle_tx,
            freeze_asked: None,
            conns: Conns {
                // Reserved, not touched: the slab never moves or doubles its
                // resident memory on the way up to the cap (pages are only
                // resident once a slot on them is used).
                slab: Slab::with_capacity(cfg.max_connections.min(MAX_RESERVED_SLOTS)),
                ready: Vec::new(),
                timer: Timer::new(clock.at(Instant::now())),
                timeouts: Timeouts::new(&cfg, &clock),
                clock,
                next_generation: 0,
            },
            input: vec![0; cfg.read_budget.max(1)].into_boxed_slice(),
            spare: Spare::default(),
            counting: Counting {
                tally: Tally::default(),
                mine: counters[index].clone(),
                all: counters,
                live,
                busy: 0,
                metrics: 0,
            },
            accepting: Accepting {
                paused_until: None,
                backoff: ACCEPT_PAUSE_MIN,
            },
            trimming: Trimming {
                released: 0,
                last: None,
                due: None,
            },
            shutdown_deadline: None,
            cfg,
            index,
        })
    }

    /// A handle that asks this loop to shut down or to freeze.
    pub fn handle(&self) -> LoopHandle {
        LoopHandle {
            waker: self.waker.clone(),
            requests: self.handle_tx.clone(),
        }
    }

    /// Runs until a requested shutdown has finished (or timed out), or
    /// until a freeze ended in [`Verdict::HandedOver`].
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let now = Instant::now();
            if let Some(deadline) = self.shutdown_deadline
                && (self.conns.slab.is_empty() || now >= deadline)
            {
                self.abandon_remaining();
                return Ok(());
            }
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for event in events.iter() {
                match source(event.token()) {
                    Source::Waker => self.take_requests(now),
                    Source::Listener(i) => self.accept(i, now),
                    Source::Conn(id) => {
                        let hints = Hints {
                            readable: event.is_readable()
                                || event.is_read_closed()
                                || event.is_error(),
                            read_closed: event.is_read_closed(),
                        };
                        self.drive(id, Happened::Io(hints), now);
                    }
                }
            }
            self.serve_ready(now);
            self.expire_timers(now);
            self.resume_accepting(now);
            self.return_memory(now);
            self.counting.publish();
            if let Some(reply) = self.freeze_asked.take()
                && self.freeze(reply) == Verdict::HandedOver
            {
                return Ok(());
            }
        }
    }

    /// Reads what [`LoopHandle`]s asked: a shutdown starts at once, a
    /// freeze waits for the end of the turn.
    fn take_requests(&mut self, now: Instant) {
        while let Ok(request) = self.requests.try_recv() {
            match request {
                Request::Shutdown => self.begin_shutdown(now),
                Request::Freeze(reply) => self.freeze_asked = Some(reply),
            }
        }
    }

    /// Describes everything this loop serves to the upgrade and waits for
    /// its verdict, touching no socket meanwhile.
    fn freeze(&mut self, reply: mpsc::Sender<Frozen>) -> Verdict {
        let (verdict, wait) = mpsc::channel();
        let frozen = Frozen {
            listeners: (self.listeners.iter())
                .map(|l| HandedListener {
                    socket: l.socket.as_raw_fd(),
                    service: l.service,
                })
                .collect(),
            conns: (self.conns.slab.iter())
                .map(|(_, s)| HandedConn {
                    socket: s.socket.as_raw_fd(),
                    kind: s.kind,
                    saved: s.conn.save(),
                })
                .collect(),
            counters: self.counting.mine.snapshot(),
            clock: self.conns.clock,
            since: Instant::now(),
            verdict,
        };
        debug!(
            "loop {}: frozen for an upgrade with {} connection(s)",
            self.index,
            frozen.conns.len()
        );
        if reply.send(frozen).is_err() {
            return Verdict::Resume;
        }
        let verdict = wait.recv().unwrap_or(Verdict::Resume);
        debug!("loop {}: {verdict:?}", self.index);
        verdict
    }

    /// Zero while the ready list has work; else until the next timer, the
    /// accept retry or the shutdown deadline; `None` (sleep) when nothing
    /// is scheduled at all.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.conns.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let timer = self.conns.timer.next_due();
        [
            timer.and_then(|due| self.conns.clock.start_of(due)),
            self.accepting.paused_until,
            self.trimming.due,
            self.shutdown_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    // ----- connections --------------------------------------------------

    /// Tells connection `id` what happened, lending it the loop's buffers,
    /// then settles the verdict.
    fn drive(&mut self, id: ConnId, event: Happened, now: Instant) {
        let Some(slot) = slot_mut(&mut self.conns.slab, id) else {
            return; // stale: the connection is gone
        };
        let mut scratch = Scratch {
            input: &mut self.input,
            spare: &mut self.spare,
        };
        // A metrics scrape is not echo traffic: its bytes go to a tally
        // nobody reads.
        let mut uncounted = Tally::default();
        let mut cx = Cx {
            cfg: &self.cfg,
            timeouts: &self.conns.timeouts,
            now: self.conns.clock.at(now),
            tally: match slot.kind {
                Kind::Metrics => &mut uncounted,
                Kind::Client | Kind::Busy => &mut self.counting.tally,
            },
            metrics: &self.counting.all,
        };
        let next = match event {
            Happened::Io(mut hints) => {
                if slot.queued {
                    // Its read is coming from the ready list this very turn.
                    hints.readable = false;
                }
                let socket = &mut slot.socket;
                slot.conn.handle_io(socket, hints, &mut scratch, &mut cx)
            }
            Happened::Shutdown => {
                let socket = &mut slot.socket;
                slot.conn.handle_shutdown(socket, &mut scratch, &mut cx)
            }
        };
        self.settle(id, next);
    }

    /// After any `handle_*`: close, or bring the ready list, the poll
    /// registration and the timer in line with what the connection wants.
    fn settle(&mut self, id: ConnId, next: Next) {
        if let Next::Close(reason) = next {
            return self.close(id, reason);
        }
        let Conns {
            slab,
            ready,
            timer,
            timeouts,
            ..
        } = &mut self.conns;
        let Some(slot) = slot_mut(slab, id) else {
            return;
        };
        if next == Next::Again && !slot.queued {
            slot.queued = true;
            ready.push(id);
        }
        let want = slot.conn.interest();
        if want != slot.registered {
            let registry = self.poll.registry();
            if let Err(e) = registry.reregister(&mut slot.socket, id.token(), interest(want)) {
                warn!("{}: reregister failed: {e}", slot.conn.peer(&slot.socket));
                self.close(id, CloseReason::Error);
                return;
            }
            slot.registered = want;
        }
        if let Some(deadline) = slot.conn.deadline(timeouts) {
            // Only an earlier deadline needs a new entry: a later one is
            // picked up when the armed entry fires (Netty's idle pattern),
            // so a line never touches the wheel.
            if slot.armed.is_none_or(|armed| armed > deadline) {
                timer.schedule(id, deadline);
                slot.armed = Some(deadline);
            }
        }
    }

    /// Releases the socket and the slab slot. The timer entry is not
    /// searched for: when it fires its generation no longer matches.
    fn close(&mut self, id: ConnId, reason: CloseReason) {
        if slot_mut(&mut self.conns.slab, id).is_none() {
            return;
        }
        let mut slot = self.conns.slab.remove(id.key as usize);
        let _ = self.poll.registry().deregister(&mut slot.socket);
        self.trimming.released += slot.conn.buffered_capacity();
        debug!(
            "{} (conn {id}): closed ({})",
            slot.conn.peer(&slot.socket),
            reason.as_str()
        );
        self.counting.closed(slot.kind, reason);
    }

    /// Serves the connections that asked to be served again.
    fn serve_ready(&mut self, now: Instant) {
        let mut ids = std::mem::take(&mut self.conns.ready);
        for &id in &ids {
            if let Some(slot) = slot_mut(&mut self.conns.slab, id) {
                slot.queued = false;
                let hints = Hints {
                    readable: true,
                    read_closed: false,
                };
                self.drive(id, Happened::Io(hints), now);
            }
        }
        ids.clear();
        if self.conns.ready.is_empty() {
            self.conns.ready = ids; // keep the allocation
        }
    }

    /// Fires due timer entries; stale ones (gone or re-armed) are ignored.
    fn expire_timers(&mut self, now: Instant) {
        let now = self.conns.clock.at(now);
        for entry in self.conns.timer.expired(now) {
            let id = entry.key;
            let Some(slot) = slot_mut(&mut self.conns.slab, id) else {
                continue;
            };
            if slot.armed != Some(entry.at) {
                continue;
            }
            slot.armed = None;
            let next = slot.conn.handle_timeout(now, &self.conns.timeouts);
            self.settle(id, next);
        }
    }

    /// Trims the allocator once closes have freed enough (see [`Trimming`]).
    fn return_memory(&mut self, now: Instant) {
        let t = &mut self.trimming;
        if t.released < TRIM_AFTER {
            return;
        }
        if let Some(next) = t.last.map(|last| last + TRIM_EVERY)
            && now < next
        {
            t.due = Some(next);
            return;
        }
        let started = Instant::now();
        trim_allocator();
        debug!(
            "returned free memory to the system after {} KiB of buffers were freed ({:?})",
            t.released >> 10,
            started.elapsed()
        );
        t.released = 0;
        t.last = Some(now);
        t.due = None;
    }

    // ----- accepting -------------------------------------------------------

    /// Accepts until the queue is empty, unless paused for descriptors.
    fn accept(&mut self, i: usize, now: Instant) {
        if self.accepting.paused_until.is_some() {
            return; // the pause timer retries every listener
        }
        // `get` every time round: `admit` needs `&mut self` in between.
        while let Some(listener) = self.listeners.get(i) {
            let service = listener.service;
            match listener::accept(&listener.socket) {
                Accepted::Conn(stream, peer) => {
                    self.end_accept_pause_episode();
                    self.admit(stream, peer, service, now);
                }
                Accepted::WouldBlock => {
                    self.end_accept_pause_episode();
                    return;
                }
                Accepted::Transient(e) => debug!("accept: {e} (skipped)"),
                Accepted::Exhausted(e) | Accepted::Failed(e) => {
                    let a = &mut self.accepting;
                    if a.backoff == ACCEPT_PAUSE_MIN {
                        warn!(
                            "accept: {e}; pausing accepts, retrying with backoff \
                             (open here: {}; out of descriptors? raise `ulimit -n` \
                             or lower --max-connections)",
                            self.conns.slab.len()
                        );
                    }
                    a.paused_until = Some(now + a.backoff);
                    a.backoff = (a.backoff * 2).min(ACCEPT_PAUSE_MAX);
                    return;
                }
            }
        }
    }

    /// An accept went through after a pause: the episode is over, and the
    /// next one starts again at the shortest pause with a new warning.
    fn end_accept_pause_episode(&mut self) {
        if self.accepting.backoff > ACCEPT_PAUSE_MIN {
            info!("accepting again");
            self.accepting.backoff = ACCEPT_PAUSE_MIN;
        }
    }

    /// Retries accepting on every listener once the pause is over.
    fn resume_accepting(&mut self, now: Instant) {
        if self
            .accepting
            .paused_until
            .is_some_and(|until| until <= now)
        {
            self.accepting.paused_until = None;
            for i in 0..self.listeners.len() {
                self.accept(i, now);
            }
        }
    }

    /// Applies [`admission::decide`] to a new connection. An echo client's
    /// place under the process-wide cap is reserved first (`fetch_add`), so
    /// two loops racing for the last place cannot both win.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr, service: Service, now: Instant) {
        let c = &mut self.counting;
        let clients = match service {
            Service::Echo => {
                c.mine.accepted();
                c.live.fetch_add(1, Ordering::Relaxed)
            }
            Service::Metrics => 0,
        };
        let counts = Counts {
            clients,
            busy: c.busy,
            metrics: c.metrics,
        };
        let limits = Limits {
            max_clients: self.cfg.max_connections,
            max_busy: MAX_LINGERING_BUSY,
            max_metrics: MAX_METRICS_CONNS,
        };
        let decision = admission::decide(service, counts, limits);
        if service == Service::Echo && decision != Decision::Admit(Kind::Client) {
            c.live.fetch_sub(1, Ordering::Relaxed);
        }
        match decision {
            Decision::Admit(kind) => self.insert(stream, peer, kind, now),
            Decision::TurnAway => {
                turn_away(stream, peer);
                c.mine.closed(CloseReason::Busy);
            }
            Decision::Refuse => debug!("{peer}: too many metrics connections"),
        }
    }

    /// Takes an admitted connection into the slab and registers it.
    fn insert(&mut self, stream: TcpStream, peer: SocketAddr, kind: Kind, now: Instant) {
        let conn = Conn::new(kind, self.conns.clock.at(now), &self.conns.timeouts);
        let Some(id) = self.place(stream, kind, conn) else {
            return;
        };
        debug!(
            "{peer} (conn {id}): accepted by loop {} ({kind:?})",
            self.index
        );
        if kind == Kind::Busy {
            // Its reply is ready: write it now.
            self.drive(id, Happened::Io(Hints::default()), now);
        } else {
            self.settle(id, Next::Keep);
        }
    }

    /// Takes a connection the old process handed over: it is counted (its
    /// accept was counted there), registered for what its state wants and
    /// served at the first turn (bytes may have arrived meanwhile).
    fn adopt(&mut self, stream: TcpStream, kind: Kind, saved: Saved) {
        if kind == Kind::Client {
            self.counting.live.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(id) = self.place(stream, kind, Conn::restore(saved)) {
            self.settle(id, Next::Again);
        }
    }

    /// Puts a connection in a slot of its own, registered for reading.
    fn place(&mut self, mut stream: TcpStream, kind: Kind, conn: Conn) -> Option<ConnId> {
        self.counting.opened(kind);
        let entry = self.conns.slab.vacant_entry();
        // Slab keys stay far below u32::MAX (the descriptor limit bounds
        // them), but a token must never be ambiguous.
        let Ok(key) = u32::try_from(entry.key()) else {
            self.counting.closed(kind, CloseReason::Error);
            return None;
        };
        let id = ConnId {
            key,
            generation: self.conns.next_generation,
        };
        self.conns.next_generation = self.conns.next_generation.wrapping_add(1) & ConnId::GEN_MASK;
        let _ = stream.set_nodelay(true);
        let registry = self.poll.registry();
        if let Err(e) = registry.register(&mut stream, id.token(), Interest::READABLE) {
            warn!("{}: register failed: {e}", conn.peer(&stream));
            self.counting.closed(kind, CloseReason::Error);
            return None;
        }
        entry.insert(Slot {
            conn,
            armed: None,
            socket: stream,
            generation: id.generation,
            kind,
            registered: Want::Read,
            queued: false,
        });
        Some(id)
    }

    // ----- shutdown ------------------------------------------------------------

    /// SIGINT/SIGTERM: close the listeners at once (with SO_REUSEPORT, what
    /// is still queued on this loop's listener is reset by the kernel), then
    /// let every connection answer what it has and finish.
    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        self.accepting.paused_until = None;
        self.shutdown_deadline = Some(now + self.cfg.shutdown_timeout);
        info!(
            "shutting down: {} connection(s) to finish within {:?}",
            self.conns.slab.len(),
            self.cfg.shutdown_timeout
        );
        for id in self.conns.ids() {
            self.drive(id, Happened::Shutdown, now);
        }
    }

    /// The shutdown deadline passed: drop whoever did not finish.
    fn abandon_remaining(&mut self) {
        if !self.conns.slab.is_empty() {
            warn!(
                "shutdown timeout: dropping {} connection(s) that did not finish",
                self.conns.slab.len()
            );
        }
        let mut slab = std::mem::take(&mut self.conns.slab);
        for mut slot in slab.drain() {
            let _ = self.poll.registry().deregister(&mut slot.socket);
            self.counting.closed(slot.kind, CloseReason::Shutdown);
        }
        self.counting.publish();
    }
}

/// The slot of `id`, if that connection still lives (generation checked).
fn slot_mut(slab: &mut Slab<Slot>, id: ConnId) -> Option<&mut Slot> {
    slab.get_mut(id.key as usize)
        .filter(|s| s.generation == id.generation)
}

fn interest(want: Want) -> Interest {
    match want {
        Want::Read => Interest::READABLE,
        Want::Write => Interest::WRITABLE,
        Want::ReadWrite => Interest::READABLE | Interest::WRITABLE,
    }
}

/// Returns the allocator's free pages to the system (glibc: every arena).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_allocator() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_allocator() {}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// Over `--max-connections` while [`MAX_LINGERING_BUSY`] busy clients are
/// already lingering: one best-effort `error: server busy` and a close. A
/// client that is still sending may then lose the line to an RST; the
/// bound keeps a connection flood from costing unbounded descriptors.
fn turn_away(mut stream: TcpStream, peer: SocketAddr) {
    debug!("{peer}: server busy (not lingering)");
    let _ = stream.write(BUSY_REPLY);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// What an idle connection costs the loop, byte by byte; a field added
    /// to the slot shows up here first. The state machine (32 bytes: the
    /// state with its deadline tick, 16; the last line's tick, 8; a null
    /// buffers pointer, 8), the armed deadline (8), the socket's descriptor
    /// (4), the generation (4) and three one-byte fields, padded to 8.
    #[test]
    fn an_idle_connection_fits_in_56_bytes() {
        assert_eq!(size_of::<Tick>(), 8);
        assert_eq!(size_of::<Option<Tick>>(), 8, "a tick counts from 1");
        assert_eq!(size_of::<crate::conn::State>(), 16);
        assert_eq!(size_of::<Conn>(), 32);
        assert_eq!(size_of::<Slot>(), 56);
        // The slab's vacant/occupied tag finds room in the slot's niches.
        assert_eq!(size_of::<Option<Slot>>(), 56);
        // A timer entry: the connection id and the deadline it stands for.
        assert_eq!(size_of::<crate::timer::Entry<ConnId>>(), 16);
    }
}
