//! The machinery of one load thread: its own mio `Poll`, its connections
//! in slots indexed by token, and the steps every mode is made of (start a
//! connection, handle an event, judge replies, close and account). The
//! modes themselves are sequences of these steps in `traffic` and `churn`.

use crate::alarm::Alarm;
use crate::check::{InFlight, Verdict};
use crate::conn::{Conn, ReadEnd};
use crate::line::{LineFormat, show};
use crate::net;
use crate::tally::{ErrorKind, Tally, record, record_n_ns, record_ns};
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Reads per connection per turn of the loop; a connection with more input
/// is served again on the next turn (fairness, and a bound on the loop).
const READ_BUDGET: usize = 16;
/// Size of the shared read buffer.
const READ_BUF: usize = 64 * 1024;
/// Longest single wait in `poll`, so deadlines are noticed promptly.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
/// Events per `poll` call.
const EVENTS: usize = 1024;
/// How much reading an event calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    No,
    /// New data: a read shorter than the buffer emptied the socket, and
    /// the next data will raise a new edge, so stop there (one `recv`
    /// instead of two per event, as tokio does).
    Data,
    /// The peer closed or an error is pending, or the read budget ran out
    /// last turn: read until `WouldBlock` or EOF, since no new edge may come.
    ToTheEnd,
}

/// The token of the precise wake-up timer (slots never reach it).
const ALARM: Token = Token(usize::MAX);

/// Fixed facts of a run, the same for every thread.
#[derive(Clone, Debug)]
pub struct Settings {
    pub target: SocketAddr,
    /// Source addresses, round robin by connection id; empty: no bind.
    pub sources: Vec<Ipv4Addr>,
    pub format: LineFormat,
    /// Lines in flight per connection in the traffic phase.
    pub depth: usize,
    /// Rate mode: lines/s each connection sends (`--rate / --conns`).
    pub rate_per_conn: Option<f64>,
    /// Connections in progress at once, for this thread.
    pub concurrency: usize,
    pub connect_timeout: Duration,
    /// How long replies still outstanding at the end may take.
    pub grace: Duration,
    /// Start of the run: error timestamps are relative to it.
    pub t0: Instant,
}

/// What the threads share while they run: counters the main thread reads
/// for the progress line, and the flag that stops every thread at once.
#[derive(Debug, Default)]
pub struct Progress {
    pub connected: AtomicU64,
    pub replies: AtomicU64,
    /// Set by the first thread that finds the run pointless (the server
    /// answers in the other protocol); every loop ends at its next turn.
    pub halt: AtomicBool,
}

impl Progress {
    /// Has some thread asked every thread to stop?
    pub fn halted(&self) -> bool {
        self.halt.load(Ordering::Relaxed)
    }
}

/// The measured window: replies that arrive inside it are counted in the
/// rate and the latency histogram.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub from: Instant,
    pub to: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        self.from <= t && t < self.to
    }
}

/// Why a connection is being closed, for the accounting in `close`.
#[derive(Debug)]
pub enum Close {
    /// Its job is over; lines still outstanding are `missing`.
    Done,
    /// The run hit its time limit; nothing is counted.
    Abandon,
    /// The server closed the connection (`closed_early`).
    Eof,
    /// A socket error on an established connection.
    Failed(io::Error),
    /// The connection could not be established.
    ConnectFailed(String),
}

/// One thread's loop state. Invariants: `slots[i]` holds the connection
/// registered with `Token(i)`; a slot is only reused at the top of a loop
/// turn (never while a batch of events is handled), so no stale event can
/// reach a new connection; `connecting` counts slots whose connection is in
/// progress, `live` all occupied slots.
pub struct Worker {
    pub settings: Settings,
    poll: Poll,
    events: Events,
    pub slots: Vec<Option<Conn>>,
    /// Free slots (used by the connect mode, which reuses them).
    pub free: Vec<usize>,
    buf: Vec<u8>,
    /// Connections whose read budget ran out: served again next turn.
    again: Vec<usize>,
    /// This turn's events as (slot, readable, writable), kept to reuse its
    /// allocation.
    ready: Vec<(usize, Read, bool)>,
    /// Connect deadlines in start order: (slot, connection id, deadline).
    deadlines: VecDeque<(usize, u32, Instant)>,
    pub tally: Tally,
    /// Replies in this window count toward rate and latency.
    pub window: Window,
    /// Send a new line for every reply received (traffic phase).
    pub refill: bool,
    /// Send one line as soon as a connection is established.
    pub greet: bool,
    /// Close a connection once all its lines are answered (connect mode).
    pub close_when_answered: bool,
    /// Rate mode: a reply counts in the window when its line was *due*
    /// inside it, and latency is measured from the due time as well as
    /// from the send time.
    pub open_loop: bool,
    pub connecting: usize,
    pub live: usize,
    progress: Arc<Progress>,
    reported_replies: u64,
    /// Rate mode: wakes `poll` at the exact `until` of each turn.
    alarm: Option<Alarm>,
}

impl Worker {
    /// A worker with `slots` empty connection slots.
    pub fn new(settings: Settings, progress: Arc<Progress>, slots: usize) -> io::Result<Worker> {
        let t0 = settings.t0;
        Ok(Worker {
            settings,
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS),
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            buf: vec![0; READ_BUF],
            again: Vec::new(),
            ready: Vec::with_capacity(EVENTS),
            deadlines: VecDeque::new(),
            tally: Tally::default(),
            window: Window { from: t0, to: t0 },
            refill: false,
            greet: false,
            close_when_answered: false,
            open_loop: false,
            connecting: 0,
            live: 0,
            progress,
            reported_replies: 0,
            alarm: None,
        })
    }

    fn since_start(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.settings.t0)
    }

    /// Has some thread asked every thread to stop?
    pub fn halted(&self) -> bool {
        self.progress.halted()
    }

    /// How the replies of this worker are judged.
    fn judge_ctx(&self, id: u32, now: Instant) -> Judge {
        Judge::new(id, now, self.settings.t0, self.window, self.open_loop)
    }

    /// Starts connection `id` in empty slot `slot`; its deadline is
    /// `now + timeout`.
    pub fn begin_connect(&mut self, slot: usize, id: u32, now: Instant, timeout: Duration) {
        debug_assert!(self.slots[slot].is_none());
        self.tally.connects_attempted += 1;
        let sources = &self.settings.sources;
        let source = (!sources.is_empty()).then(|| sources[id as usize % sources.len()]);
        let at = self.since_start(now);
        let mut stream = match net::start_connect(self.settings.target, source) {
            Ok(s) => s,
            Err(e) => {
                let src = source.map(|s| format!(" from {s}")).unwrap_or_default();
                self.tally.error(ErrorKind::Connect, 1, at, || {
                    format!("c{id}: connect{src}: {e}")
                });
                self.free.push(slot);
                return;
            }
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(slot), interest)
        {
            self.tally
                .error(ErrorKind::Io, 1, at, || format!("c{id}: register: {e}"));
            self.free.push(slot);
            return;
        }
        // The clock is read per connection, not per turn: connect latency
        // is the time of this connection alone.
        let started = Instant::now();
        self.slots[slot] = Some(Conn::new(id, stream, self.settings.format, started));
        self.connecting += 1;
        self.live += 1;
        self.deadlines.push_back((slot, id, now + timeout));
    }

    /// Handles deadlines that have passed: a connection still in progress
    /// fails to connect; in connect mode (`close_when_answered`) an
    /// established one whose exchange is not over is closed as `Done`, so
    /// its outstanding line counts as missing.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(slot, id, deadline)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(conn) = self.slots[slot].as_ref().filter(|c| c.id == id) else {
                continue;
            };
            if conn.connecting_since.is_some() {
                let timeout = self.settings.connect_timeout;
                self.close(
                    slot,
                    Close::ConnectFailed(format!("timed out after {timeout:?}")),
                    now,
                );
            } else if self.close_when_answered {
                self.close(slot, Close::Done, now);
            }
        }
    }

    /// The earliest pending connect deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|d| d.2)
    }

    /// From now on, wake each turn at its `until` to the microsecond
    /// instead of the millisecond (rate mode's schedule).
    pub fn wake_precisely(&mut self) -> io::Result<()> {
        self.alarm = Some(Alarm::new(self.poll.registry(), ALARM)?);
        Ok(())
    }

    /// Waits for events until at most `until` and handles them. Returns the
    /// time after handling.
    pub fn turn(&mut self, until: Instant) -> Instant {
        let now = Instant::now();
        let wait = if self.again.is_empty() {
            until.saturating_duration_since(now).min(MAX_POLL_WAIT)
        } else {
            Duration::ZERO
        };
        if let Some(alarm) = &self.alarm
            && !wait.is_zero()
            && let Err(e) = alarm.set(now + wait)
        {
            let at = self.since_start(now);
            self.tally
                .error(ErrorKind::Io, 1, at, || format!("timerfd: {e}"));
            self.alarm = None;
        }
        if let Err(e) = self.poll.poll(&mut self.events, Some(wait))
            && e.kind() != io::ErrorKind::Interrupted
        {
            let at = self.since_start(now);
            self.tally
                .error(ErrorKind::Io, 1, at, || format!("poll: {e}"));
            // Don't spin on a broken poll: the caller's deadline ends the run.
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        let mut ready = std::mem::take(&mut self.ready);
        ready.extend(
            self.events
                .iter()
                .filter(|ev| ev.token() != ALARM)
                .map(|ev| {
                    let read = if ev.is_read_closed() || ev.is_error() {
                        Read::ToTheEnd
                    } else if ev.is_readable() {
                        Read::Data
                    } else {
                        Read::No
                    };
                    let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                    (ev.token().0, read, writable)
                }),
        );
        let again = std::mem::take(&mut self.again);
        for &(slot, read, writable) in &ready {
            self.on_event(slot, read, writable, now);
        }
        ready.clear();
        self.ready = ready;
        for slot in again {
            self.service(slot, Read::ToTheEnd, false, now);
        }
        let replies = self.tally.replies;
        self.progress
            .replies
            .fetch_add(replies - self.reported_replies, Ordering::Relaxed);
        self.reported_replies = replies;
        now
    }

    /// Handles readiness of the connection in `slot`.
    fn on_event(&mut self, slot: usize, read: Read, writable: bool, now: Instant) {
        let Some(conn) = self.slots[slot].as_mut() else {
            return;
        };
        if let Some(since) = conn.connecting_since {
            match net::connect_result(&conn.stream) {
                None => return,
                Some(Err(e)) => {
                    self.close(slot, Close::ConnectFailed(e.to_string()), now);
                    return;
                }
                Some(Ok(())) => {
                    conn.connecting_since = None;
                    self.connecting -= 1;
                    self.tally.connects_ok += 1;
                    let established = Instant::now();
                    record(&mut self.tally.connect_latency, established - since);
                    self.progress.connected.fetch_add(1, Ordering::Relaxed);
                    if self.greet {
                        let at = nanos(self.settings.t0, now);
                        conn.queue_lines(1, at, at);
                    }
                }
            }
        }
        self.service(slot, read, writable, now);
    }

    /// Queues `n` lines on the connection in `slot` and writes them.
    pub fn send_lines(&mut self, slot: usize, n: usize, now: Instant) {
        let Some(conn) = self.slots[slot].as_mut() else {
            return;
        };
        let at = nanos(self.settings.t0, now);
        conn.queue_lines(n, at, at);
        self.service(slot, Read::No, true, now);
    }

    /// Rate mode: queues the line due at `due` on the connection in `slot`
    /// and writes it; counts how late it went out when it is due inside
    /// the window.
    pub fn send_due(&mut self, slot: usize, due: Instant) {
        let Some(conn) = self.slots[slot].as_mut() else {
            return;
        };
        let now = Instant::now();
        let t0 = self.settings.t0;
        conn.queue_lines(1, nanos(t0, due), nanos(t0, now));
        if self.window.contains(due) {
            self.tally.window_sent += 1;
            record(&mut self.tally.lateness, now.saturating_duration_since(due));
        }
        self.service(slot, Read::No, true, now);
    }

    /// Reads and judges replies, queues refills, writes, and closes the
    /// connection when it ended or its job is done.
    fn service(&mut self, slot: usize, read: Read, writable: bool, now: Instant) {
        let Some(conn) = self.slots[slot].as_mut() else {
            return;
        };
        let mut answered = 0usize;
        // When the replies arrived, as `InFlight` counts (refills are sent
        // then too).
        let mut replied_at = 0;
        let mut end = ReadEnd::Drained;
        if read != Read::No {
            let t0 = self.settings.t0;
            let mut ctx = Judge::new(conn.id, now, t0, self.window, self.open_loop);
            replied_at = ctx.now;
            let tally = &mut self.tally;
            let short_read_drains = read == Read::Data;
            end = conn.read_some(&mut self.buf, READ_BUDGET, short_read_drains, |v| {
                if ctx.judge(v, tally) {
                    answered += 1;
                }
            });
            ctx.finish(&mut self.tally);
            if self.tally.wrong_proto.is_some() {
                self.progress.halt.store(true, Ordering::Relaxed);
            }
        }
        if self.refill {
            conn.queue_lines(answered, replied_at, replied_at);
        }
        let written = if writable || conn.has_output() {
            conn.flush()
        } else {
            Ok(true)
        };
        let done = self.close_when_answered
            && conn.lines_sent() > 0
            && conn.checker.outstanding() == 0
            && conn.checker.partial().is_empty();
        match (end, written) {
            (ReadEnd::Failed(e), _) | (_, Err(e)) => self.close(slot, Close::Failed(e), now),
            (ReadEnd::Eof, _) => self.close(slot, Close::Eof, now),
            (_, Ok(_)) if done => {
                self.tally.completed += 1;
                self.close(slot, Close::Done, now);
            }
            (ReadEnd::Budget, _) => self.again.push(slot),
            (ReadEnd::Drained, _) => {}
        }
    }

    /// Closes the connection in `slot` and accounts for how it ended.
    pub fn close(&mut self, slot: usize, how: Close, now: Instant) {
        let Some(mut conn) = self.slots[slot].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.free.push(slot);
        self.live -= 1;
        if conn.connecting_since.is_some() {
            self.connecting -= 1;
        }
        let at = self.since_start(now);
        let id = conn.id;
        if !matches!(how, Close::Abandon) {
            let mut ctx = self.judge_ctx(id, now);
            let tally = &mut self.tally;
            conn.checker.finish(|v| {
                ctx.judge(v, tally);
            });
            ctx.finish(&mut self.tally);
        }
        let seqs = conn.checker.outstanding_seqs();
        let partial = conn.checker.partial();
        let why = match &how {
            Close::Abandon => return,
            Close::Done => "no reply within the grace period",
            Close::Eof => {
                self.tally.error(ErrorKind::ClosedEarly, 1, at, || {
                    format!(
                        "c{id}: server closed the connection, {} line(s) outstanding",
                        seqs.len()
                    )
                });
                "connection closed by the server"
            }
            Close::Failed(e) => {
                self.tally
                    .error(ErrorKind::of_io(e), 1, at, || format!("c{id}: {e}"));
                "socket error"
            }
            Close::ConnectFailed(e) => {
                let target = self.settings.target;
                self.tally.error(ErrorKind::Connect, 1, at, || {
                    format!("c{id}: connect to {target}: {e}")
                });
                return;
            }
        };
        if let Some(first) = seqs.first() {
            self.tally
                .error(ErrorKind::Missing, seqs.len() as u64, at, || {
                    format!(
                        "c{id}: {why}: no reply for {} line(s), first s{first}; partial reply `{}`",
                        seqs.len(),
                        show(partial, 80)
                    )
                });
        } else if !partial.is_empty() {
            self.tally.error(ErrorKind::Extra, 1, at, || {
                format!("c{id}: unrequested bytes `{}`", show(partial, 80))
            });
        }
    }

    /// Closes every connection with the same reason.
    pub fn close_all(&mut self, how: impl Fn() -> Close, now: Instant) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                self.close(slot, how(), now);
            }
        }
    }

    /// Lines without a reply over all connections.
    pub fn outstanding(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .map(|c| c.checker.outstanding())
            .sum()
    }
}

/// Nanoseconds from `t0` to `t` (0 before it): the clock of `InFlight`.
fn nanos(t0: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(t0).as_nanos()).unwrap_or(u64::MAX)
}

/// What judging the replies of one connection at one moment needs, and the
/// closed-loop replies judged but not yet counted. Times are nanoseconds
/// since the run's start, as in `InFlight`. Call `finish` when done.
struct Judge {
    /// The connection.
    id: u32,
    /// When the replies arrived.
    now: u64,
    /// The measured window, `from <= t < to`.
    from: u64,
    to: u64,
    /// Rate mode: count by due time and measure from it (see `Worker`).
    open_loop: bool,
    /// Closed loop: (latency, count) of the last replies judged, all
    /// with that latency, not yet counted. The replies of one read share
    /// `now`, and lines sent together share their send time, so a batch is
    /// mostly a single run, recorded as one value with a count: the same
    /// histogram as one record per reply, for a fraction of the work.
    run: (u64, u64),
}

impl Judge {
    /// Judging replies of connection `id` that arrived at `now`.
    fn new(id: u32, now: Instant, t0: Instant, window: Window, open_loop: bool) -> Judge {
        Judge {
            id,
            now: nanos(t0, now),
            from: nanos(t0, window.from),
            to: nanos(t0, window.to),
            open_loop,
            run: (0, 0),
        }
    }

    fn in_window(&self, t: u64) -> bool {
        self.from <= t && t < self.to
    }

    /// Counts the closed-loop replies of the run so far into `tally`.
    fn count_run(&mut self, tally: &mut Tally) {
        let (wait, n) = std::mem::take(&mut self.run);
        if n == 0 {
            return;
        }
        tally.longest_wait = tally.longest_wait.max(Duration::from_nanos(wait));
        if self.in_window(self.now) {
            tally.window_replies += n;
            record_n_ns(&mut tally.latency, wait, n);
        }
    }

    /// Counts what is still pending into `tally`: the end of judging.
    fn finish(mut self, tally: &mut Tally) {
        self.count_run(tally);
    }

    /// Counts one reply verdict into `tally`; true when it settled a line (so
    /// a refill may be sent).
    #[inline]
    fn judge(&mut self, v: Verdict, tally: &mut Tally) -> bool {
        match v {
            Verdict::Answered(line) => {
                self.answered(line, tally);
                true
            }
            v => self.fault(v, tally),
        }
    }

    /// Counts a correct reply: what runs for nearly every reply, kept apart
    /// from the faults so that it stays small enough to be inlined.
    #[inline]
    fn answered(&mut self, line: InFlight, tally: &mut Tally) {
        let now = self.now;
        tally.replies += 1;
        if self.open_loop {
            if self.in_window(line.intended) {
                tally.window_replies += 1;
                record_ns(&mut tally.latency, now.saturating_sub(line.intended));
                record_ns(
                    &mut tally.latency_uncorrected,
                    now.saturating_sub(line.sent),
                );
            }
            return;
        }
        let wait = now.saturating_sub(line.sent);
        if self.run.1 > 0 && self.run.0 != wait {
            self.count_run(tally);
        }
        self.run = (wait, self.run.1 + 1);
    }

    /// Counts any other verdict, as an error; true when it settled a line.
    #[cold]
    fn fault(&self, v: Verdict, tally: &mut Tally) -> bool {
        let (id, now) = (self.id, self.now);
        let at = || Duration::from_nanos(now);
        match v {
            // Taken by `judge` before it comes here.
            Verdict::Answered(_) => true,
            Verdict::OtherProto { seq, answers_in } => {
                tally.wrong_proto = Some(answers_in);
                tally.error(ErrorKind::WrongProto, 1, at(), || {
                    format!("c{id}: reply to s{seq} is the {} reply", answers_in.name())
                });
                true
            }
            Verdict::Reordered(line) => {
                tally.error(ErrorKind::Reordered, 1, at(), || {
                    format!(
                        "c{id}: reply to s{} arrived after the reply to a later line",
                        line.seq
                    )
                });
                true
            }
            Verdict::Duplicated { seq } => {
                tally.error(ErrorKind::Duplicated, 1, at(), || {
                    format!("c{id}: reply to s{seq} received twice")
                });
                false
            }
            Verdict::Altered { seq, expected, got } => {
                tally.error(ErrorKind::Altered, 1, at(), || {
                    let pos = expected.iter().zip(&got).position(|(a, b)| a != b);
                    let pos = pos.unwrap_or(expected.len().min(got.len()));
                    format!(
                        "c{id}: reply to s{seq} differs at byte {pos}: expected `{}`, got `{}`",
                        show(&expected, 80),
                        show(&got, 80)
                    )
                });
                true
            }
            Verdict::Extra { got } => {
                tally.error(ErrorKind::Extra, 1, at(), || {
                    format!(
                        "c{id}: reply `{}` while no line was outstanding",
                        show(&got, 80)
                    )
                });
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(sent: u64) -> Verdict {
        Verdict::Answered(InFlight {
            seq: 0,
            intended: sent,
            sent,
        })
    }

    #[test]
    fn replies_judged_in_runs_count_one_sample_each() {
        let t0 = Instant::now();
        let window = Window {
            from: t0,
            to: t0 + Duration::from_secs(1),
        };
        let mut tally = Tally::default();
        let mut judge = Judge::new(1, t0 + Duration::from_millis(10), t0, window, false);
        let now = judge.now;
        for wait in [1_000, 1_000, 5_000, 1_000, 1_000] {
            assert!(judge.judge(answered(now - wait), &mut tally));
        }
        judge.finish(&mut tally);
        assert_eq!((tally.replies, tally.window_replies), (5, 5));
        assert_eq!(tally.latency.len(), 5);
        assert_eq!(tally.latency.count_at(1_000), 4);
        assert_eq!(tally.latency.count_at(5_000), 1);
        assert_eq!(tally.longest_wait, Duration::from_nanos(5_000));

        // Outside the window: counted as replies and in the longest wait,
        // not in the window's rate and latency.
        let mut judge = Judge::new(1, t0 + Duration::from_secs(2), t0, window, false);
        judge.judge(answered(0), &mut tally);
        judge.finish(&mut tally);
        assert_eq!((tally.replies, tally.window_replies), (6, 5));
        assert_eq!(tally.latency.len(), 5);
        assert_eq!(tally.longest_wait, Duration::from_secs(2));
    }
}
