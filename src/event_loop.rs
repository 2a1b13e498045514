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
//! the ready list, else the next timer, else sleep), poll, dispatch each
//! event by its token, serve the ready list, fire expired timers. The
//! connection logic lives in `conn.rs`; this file is mechanism only, and the
//! only one that touches `Poll` and `Registry`.
//!
//! Stale tokens: a connection's token carries its slab key *and* a
//! generation ([`ConnId`]), and so do timer entries and the ready list. A
//! slot freed and reused in the same turn can never be reached through the
//! old owner's token (mio#172, mio#219).

use crate::config::{Config, MAX_LINGERING_BUSY, MAX_METRICS_CONNS};
use crate::conn::{CloseReason, Conn, Cx, Hints, Next, Scratch, Tally, Want};
use crate::listener::{self, Accepted};
use crate::metrics::{self, Counters};
use crate::timer::Timer;
use bytes::BytesMut;
use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("echoloop packs a slab key and a generation into a 64-bit token");

/// A connection's identity: its slab key and the generation of the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    key: u32,
    generation: u32,
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

/// Asks a running loop to shut down gracefully, from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    waker: Arc<Waker>,
    requested: Arc<AtomicBool>,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown of the loop (idempotent).
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake an event loop for shutdown: {e}");
        }
    }
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
    /// Live connections in the whole process (for `--max-connections`).
    pub live: Arc<AtomicUsize>,
}

/// What a connection is to the server, which decides how it is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A line-echo client: counted in the metrics and against
    /// `--max-connections`.
    Client,
    /// A client over `--max-connections`, being told `error: server busy`
    /// and lingering until it has read it; at most [`MAX_LINGERING_BUSY`].
    Busy,
    /// A `--metrics` scrape; at most [`MAX_METRICS_CONNS`], not counted.
    Metrics,
}

/// What the loop tells a connection in [`EventLoop::drive`].
#[derive(Clone, Copy, Debug)]
enum Happened {
    /// Its socket may be ready (or it is served from the ready list).
    Io(Hints),
    /// The server is shutting down.
    Shutdown,
}

/// What a listening socket accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Line-echo clients.
    Echo,
    /// `--metrics` HTTP clients.
    Metrics,
}

/// A listening socket and what it accepts.
struct Listener {
    socket: TcpListener,
    kind: Kind,
}

/// A connection in the slab with the loop's bookkeeping for it.
struct Slot {
    /// The socket; dropping the slot closes it.
    socket: TcpStream,
    /// The protocol state machine.
    conn: Conn,
    /// Distinguishes this owner of the slab key from earlier ones.
    generation: u32,
    /// The interest currently registered with the poll.
    registered: Want,
    /// The deadline of this connection's live timer entry, if one is
    /// armed; entries for another deadline are stale and ignored when they
    /// fire.
    armed: Option<Instant>,
    /// On the ready list already.
    queued: bool,
    /// What the connection is to the server (how it is counted).
    role: Role,
}

/// One single-threaded event loop. Build it with [`EventLoop::new`], take a
/// [`ShutdownHandle`], then [`EventLoop::run`] it on its own thread.
pub struct EventLoop {
    /// The poller; only this file touches it.
    poll: Poll,
    /// Listening sockets (token `LISTENER_BASE - index`); emptied at shutdown.
    listeners: Vec<Listener>,
    /// Live connections, keyed by the low half of their token.
    conns: Slab<Slot>,
    /// Idle and linger deadlines.
    timer: Timer<ConnId>,
    /// Connections whose read budget ran out with input left: served next
    /// turn, since no edge will come for bytes already in the kernel.
    ready: Vec<ConnId>,
    /// The read buffer every connection reads into.
    input: Box<[u8]>,
    /// An output buffer lent to the connection being served.
    spare: BytesMut,
    /// Traffic counted since the last turn, added to `counters` once a turn.
    tally: Tally,
    /// Limits and mode.
    cfg: Arc<Config>,
    /// The generation given to the next connection.
    next_generation: u32,
    /// Set while accepting is paused for lack of descriptors: when to retry.
    accept_paused_until: Option<Instant>,
    /// The next pause, doubled while descriptors stay exhausted.
    accept_backoff: Duration,
    /// Set by a [`ShutdownHandle`]; read after the waker fires.
    shutdown_requested: Arc<AtomicBool>,
    /// Once shutting down: when to drop whatever has not finished.
    shutdown_deadline: Option<Instant>,
    /// This loop's metrics (written only here).
    counters: Arc<Counters>,
    /// Every loop's metrics, for `/metrics` pages.
    all_counters: Arc<[Arc<Counters>]>,
    /// Live connections in the whole process (for `--max-connections`).
    live: Arc<AtomicUsize>,
    /// Wakes the loop from another thread.
    waker: Arc<Waker>,
    /// This loop's number, for logs.
    index: usize,
    /// Connections in [`Role::Busy`] now.
    busy_conns: usize,
    /// Connections in [`Role::Metrics`] now.
    metrics_conns: usize,
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
        let Shared {
            cfg,
            counters: all_counters,
            live,
        } = shared;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let kinds = echo
            .into_iter()
            .map(|l| (l, Kind::Echo))
            .chain(metrics.map(|l| (l, Kind::Metrics)));
        let mut listeners = Vec::new();
        for (i, (l, kind)) in kinds.enumerate() {
            let mut socket = TcpListener::from_std(l);
            poll.registry()
                .register(&mut socket, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push(Listener { socket, kind });
        }
        Ok(EventLoop {
            poll,
            listeners,
            conns: Slab::new(),
            timer: Timer::new(cfg.timer_tick(), Instant::now()),
            ready: Vec::new(),
            input: vec![0; cfg.read_budget.max(1)].into_boxed_slice(),
            spare: BytesMut::new(),
            tally: Tally::default(),
            next_generation: 0,
            accept_paused_until: None,
            accept_backoff: ACCEPT_PAUSE_MIN,
            shutdown_requested: Arc::new(AtomicBool::new(false)),
            shutdown_deadline: None,
            counters: all_counters[index].clone(),
            index,
            busy_conns: 0,
            metrics_conns: 0,
            all_counters,
            live,
            waker,
            cfg,
        })
    }

    /// A handle that asks this loop to shut down.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            waker: self.waker.clone(),
            requested: self.shutdown_requested.clone(),
        }
    }

    /// Runs until a requested shutdown has finished (or timed out).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let now = Instant::now();
            if let Some(deadline) = self.shutdown_deadline
                && (self.conns.is_empty() || now >= deadline)
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
                    Source::Waker => {
                        if self.shutdown_requested.load(Ordering::SeqCst) {
                            self.begin_shutdown(now);
                        }
                    }
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
            self.publish_tally();
        }
    }

    /// Zero while the ready list has work; else until the next timer, the
    /// accept retry or the shutdown deadline; `None` (sleep) when nothing
    /// is scheduled at all.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        [
            self.timer.next_wakeup(),
            self.accept_paused_until,
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
        let Some(slot) = slot_mut(&mut self.conns, id) else {
            return; // stale: the connection is gone
        };
        let mut scratch = Scratch {
            input: &mut self.input,
            spare: &mut self.spare,
        };
        let mut uncounted = Tally::default();
        let mut cx = Cx {
            cfg: &self.cfg,
            now,
            tally: tally_for(slot.role, &mut self.tally, &mut uncounted),
            metrics: &self.all_counters,
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

    /// After any `handle_*`: close, or bring the poll registration, the ready
    /// list and the timer in line with what the connection now wants.
    fn settle(&mut self, id: ConnId, next: Next) {
        if let Next::Close(reason) = next {
            self.close(id, reason);
            return;
        }
        let Some(slot) = slot_mut(&mut self.conns, id) else {
            return;
        };
        if slot.conn.read_again() && !slot.queued {
            slot.queued = true;
            self.ready.push(id);
        }
        let want = slot.conn.interest();
        if want != slot.registered {
            if let Err(e) =
                self.poll
                    .registry()
                    .reregister(&mut slot.socket, id.token(), interest(want))
            {
                warn!("{}: reregister failed: {e}", slot.conn.peer());
                self.close(id, CloseReason::Error);
                return;
            }
            slot.registered = want;
        }
        if let Some(deadline) = slot.conn.deadline(&self.cfg) {
            // Only an earlier deadline needs a new entry: a later one is
            // picked up when the armed entry fires (Netty's idle pattern),
            // so a line never touches the wheel.
            if slot.armed.is_none_or(|armed| armed > deadline) {
                self.timer.schedule(id, deadline);
                slot.armed = Some(deadline);
            }
        }
    }

    /// Releases the socket, the slab slot and (by generation) the timer.
    fn close(&mut self, id: ConnId, reason: CloseReason) {
        if slot_mut(&mut self.conns, id).is_none() {
            return;
        }
        let mut slot = self.conns.remove(id.key as usize);
        let _ = self.poll.registry().deregister(&mut slot.socket);
        debug!("{}: closed ({})", slot.conn.peer(), reason.as_str());
        self.release(slot.role, reason);
    }

    /// Counts a closed connection and frees its place under its cap.
    fn release(&mut self, role: Role, reason: CloseReason) {
        match role {
            Role::Client => {
                self.counters.closed(reason);
                self.live.fetch_sub(1, Ordering::Relaxed);
                if reason == CloseReason::Proxy {
                    metrics::proxy_rejected(Instant::now());
                }
            }
            Role::Busy => {
                self.counters.closed(CloseReason::Busy);
                self.busy_conns -= 1;
            }
            Role::Metrics => self.metrics_conns -= 1,
        }
    }

    /// Serves the connections whose budget ran out last turn.
    fn serve_ready(&mut self, now: Instant) {
        let mut ids = std::mem::take(&mut self.ready);
        for &id in &ids {
            if let Some(slot) = slot_mut(&mut self.conns, id) {
                slot.queued = false;
                let hints = Hints {
                    readable: true,
                    read_closed: false,
                };
                self.drive(id, Happened::Io(hints), now);
            }
        }
        ids.clear();
        if self.ready.is_empty() {
            self.ready = ids; // keep the allocation
        }
    }

    /// Fires due timer entries; stale ones (gone or re-armed) are ignored.
    fn expire_timers(&mut self, now: Instant) {
        for entry in self.timer.expired(now) {
            let id = entry.key;
            let Some(slot) = slot_mut(&mut self.conns, id) else {
                continue;
            };
            if slot.armed != Some(entry.at) {
                continue;
            }
            slot.armed = None;
            let next = slot.conn.handle_timeout(now, &self.cfg);
            self.settle(id, next);
        }
    }

    fn publish_tally(&mut self) {
        let t = std::mem::take(&mut self.tally);
        if t != Tally::default() {
            self.counters.add_lines(t.lines);
            self.counters.add_received(t.received);
            self.counters.add_sent(t.sent);
        }
    }

    // ----- accepting -------------------------------------------------------

    /// Accepts until the queue is empty, unless paused for descriptors.
    fn accept(&mut self, i: usize, now: Instant) {
        if self.accept_paused_until.is_some() {
            return; // the pause timer retries every listener
        }
        // `get` every time round: `admit` needs `&mut self` in between.
        while let Some(listener) = self.listeners.get(i) {
            let kind = listener.kind;
            match listener::accept(&listener.socket) {
                Accepted::Conn(stream, peer) => {
                    self.end_accept_pause_episode();
                    self.admit(stream, peer, kind, now);
                }
                Accepted::WouldBlock => {
                    self.end_accept_pause_episode();
                    return;
                }
                Accepted::Transient(e) => debug!("accept: {e} (skipped)"),
                Accepted::Exhausted(e) | Accepted::Failed(e) => {
                    if self.accept_backoff == ACCEPT_PAUSE_MIN {
                        warn!(
                            "accept: {e}; pausing accepts, retrying with backoff \
                             (open here: {}; out of descriptors? raise `ulimit -n` \
                             or lower --max-connections)",
                            self.conns.len()
                        );
                    }
                    self.accept_paused_until = Some(now + self.accept_backoff);
                    self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_PAUSE_MAX);
                    return;
                }
            }
        }
    }

    /// An accept went through after a pause: the episode is over, and the
    /// next one starts again at the shortest pause with a new warning.
    fn end_accept_pause_episode(&mut self) {
        if self.accept_backoff > ACCEPT_PAUSE_MIN {
            info!("accepting again");
            self.accept_backoff = ACCEPT_PAUSE_MIN;
        }
    }

    /// Retries accepting on every listener once the pause is over.
    fn resume_accepting(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
            for i in 0..self.listeners.len() {
                self.accept(i, now);
            }
        }
    }

    /// Takes a new connection into the slab in the role it gets: a client,
    /// a client turned away as busy, or a metrics scrape.
    fn admit(
        &mut self,
        mut stream: TcpStream,
        peer: std::net::SocketAddr,
        kind: Kind,
        now: Instant,
    ) {
        let role = match kind {
            Kind::Metrics if self.metrics_conns >= MAX_METRICS_CONNS => {
                debug!("{peer}: too many metrics connections");
                return; // dropping the stream closes it
            }
            Kind::Metrics => Role::Metrics,
            Kind::Echo => {
                self.counters.accepted();
                // Only echo clients count against --max-connections: a
                // metrics scrape must still work when the server is full.
                if self.live.fetch_add(1, Ordering::Relaxed) < self.cfg.max_connections {
                    Role::Client
                } else {
                    self.live.fetch_sub(1, Ordering::Relaxed);
                    if self.busy_conns >= MAX_LINGERING_BUSY {
                        turn_away(stream, peer);
                        self.counters.closed(CloseReason::Busy);
                        return;
                    }
                    Role::Busy
                }
            }
        };
        match role {
            Role::Client => {}
            Role::Busy => self.busy_conns += 1,
            Role::Metrics => self.metrics_conns += 1,
        }
        let entry = self.conns.vacant_entry();
        // Slab keys stay far below u32::MAX (the descriptor limit bounds
        // them), but a token must never be ambiguous.
        let Ok(key) = u32::try_from(entry.key()) else {
            self.release(role, CloseReason::Error);
            return;
        };
        let id = ConnId {
            key,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1) & ConnId::GEN_MASK;
        let _ = stream.set_nodelay(true);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, id.token(), Interest::READABLE)
        {
            warn!("{peer}: register failed: {e}");
            self.release(role, CloseReason::Error);
            return;
        }
        debug!("{peer}: accepted by loop {} ({role:?})", self.index);
        let conn = match role {
            Role::Client => Conn::new(peer, now, &self.cfg),
            Role::Busy => Conn::new_busy(peer, now),
            Role::Metrics => Conn::new_metrics(peer, now),
        };
        entry.insert(Slot {
            socket: stream,
            conn,
            role,
            generation: id.generation,
            registered: Want::Read,
            armed: None,
            queued: false,
        });
        if role == Role::Busy {
            // Its reply is ready: write it now.
            self.drive(id, Happened::Io(Hints::default()), now);
        } else {
            self.settle(id, Next::Keep);
        }
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
        self.accept_paused_until = None;
        self.shutdown_deadline = Some(now + self.cfg.shutdown_timeout);
        info!(
            "shutting down: {} connection(s) to finish within {:?}",
            self.conns.len(),
            self.cfg.shutdown_timeout
        );
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .map(|(key, slot)| ConnId {
                key: key as u32,
                generation: slot.generation,
            })
            .collect();
        for id in ids {
            self.drive(id, Happened::Shutdown, now);
        }
    }

    /// The shutdown deadline passed: drop whoever did not finish.
    fn abandon_remaining(&mut self) {
        if !self.conns.is_empty() {
            warn!(
                "shutdown timeout: dropping {} connection(s) that did not finish",
                self.conns.len()
            );
        }
        let mut conns = std::mem::take(&mut self.conns);
        for mut slot in conns.drain() {
            let _ = self.poll.registry().deregister(&mut slot.socket);
            self.release(slot.role, CloseReason::Shutdown);
        }
        self.publish_tally();
    }
}

/// Where a connection's traffic is counted: a metrics scrape is not echo
/// traffic, so its bytes go to a tally nobody reads.
fn tally_for<'a>(role: Role, tally: &'a mut Tally, uncounted: &'a mut Tally) -> &'a mut Tally {
    match role {
        Role::Metrics => uncounted,
        Role::Client | Role::Busy => tally,
    }
}

/// The slot of `id`, if that connection still lives (generation checked).
fn slot_mut(conns: &mut Slab<Slot>, id: ConnId) -> Option<&mut Slot> {
    conns
        .get_mut(id.key as usize)
        .filter(|s| s.generation == id.generation)
}

fn interest(want: Want) -> Interest {
    match want {
        Want::Read => Interest::READABLE,
        Want::Write => Interest::WRITABLE,
        Want::ReadWrite => Interest::READABLE | Interest::WRITABLE,
    }
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// Over `--max-connections` while [`MAX_LINGERING_BUSY`] busy clients are
/// already lingering: one best-effort `error: server busy` and a close. A
/// client that is still sending may then lose the line to an RST; the
/// bound keeps a connection flood from costing unbounded descriptors.
fn turn_away(mut stream: TcpStream, peer: std::net::SocketAddr) {
    debug!("{peer}: server busy (not lingering)");
    let _ = stream.write(crate::conn::BUSY_REPLY);
}
