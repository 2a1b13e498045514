//! The thread body of the `pingpong`, `pipeline`, `rate` and `idle` modes:
//! open this thread's connections, report to the main thread, then (on its
//! schedule) either keep `depth` lines in flight per connection, send on
//! the open-loop schedule of `rate`, or hold them idle, and finally close
//! everything and account for what is still missing.

use crate::rate;
use crate::tally::{ErrorKind, Tally};
use crate::worker::{Close, Progress, Settings, Window, Worker};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

/// What the main thread tells the workers once every thread has opened its
/// connections.
#[derive(Clone, Copy, Debug)]
pub enum Schedule {
    /// Keep lines in flight until `stop_sending`, count replies inside
    /// `window`, then wait for the last replies until `deadline`.
    Traffic {
        window: Window,
        stop_sending: Instant,
        deadline: Instant,
    },
    /// Keep the connections open and idle until `until`.
    Hold { until: Instant },
    /// Something went wrong elsewhere: close at once.
    Abort,
}

/// The longest the whole open phase may take for `conns` connections at
/// `concurrency` at a time (each connect may take `connect_timeout`; an
/// exchange after it `grace`).
pub fn open_phase_cap(
    conns: usize,
    concurrency: usize,
    connect_timeout: Duration,
    grace: Duration,
) -> Duration {
    let rounds = conns.div_ceil(concurrency.max(1)).max(1) as u32;
    connect_timeout.saturating_mul(rounds) + grace
}

/// Runs one thread of a traffic or idle run over connection ids `ids`.
/// `exchange_first` (idle mode) sends one line on every connection as soon
/// as it is established, and the open phase ends once all are answered.
/// Sends this thread's index on `opened` when the open phase is over, then
/// waits for its schedule on `schedule`.
pub fn run(
    settings: Settings,
    ids: Vec<u32>,
    exchange_first: bool,
    progress: Arc<Progress>,
    opened: Sender<usize>,
    thread: usize,
    schedule: Receiver<Schedule>,
) -> Tally {
    let t0 = settings.t0;
    let mut w = match Worker::new(settings, progress, ids.len()) {
        Ok(w) => w,
        Err(e) => {
            let mut tally = Tally::default();
            tally.error(ErrorKind::Io, 1, t0.elapsed(), || {
                format!("thread {thread}: creating poll: {e}")
            });
            let _ = opened.send(thread);
            return tally;
        }
    };
    w.greet = exchange_first;
    open_all(&mut w, &ids);
    let cap = open_phase_cap(
        ids.len(),
        w.settings.concurrency,
        w.settings.connect_timeout,
        w.settings.grace,
    );
    // The main thread waits for every thread: it cannot take longer than
    // the slowest open phase, plus a margin.
    let wait = cap + Duration::from_secs(30);
    let _ = opened.send(thread);
    match schedule.recv_timeout(wait) {
        Ok(Schedule::Traffic {
            window,
            stop_sending,
            deadline,
        }) => match w.settings.rate_per_conn {
            Some(r) => {
                let rate = r * w.slots.len() as f64;
                rate::traffic(&mut w, rate, window, stop_sending, deadline);
            }
            None => traffic(&mut w, window, stop_sending, deadline),
        },
        Ok(Schedule::Hold { until }) => hold(&mut w, until),
        Ok(Schedule::Abort) | Err(_) => w.close_all(|| Close::Abandon, Instant::now()),
    }
    w.tally
}

/// Opens every connection in `ids` (slot i holds ids[i]), at most
/// `concurrency` in progress at once, and with `greet` waits for the reply
/// to each first line. Bounded by `open_phase_cap`.
fn open_all(w: &mut Worker, ids: &[u32]) {
    let start = Instant::now();
    let cap = start
        + open_phase_cap(
            ids.len(),
            w.settings.concurrency,
            w.settings.connect_timeout,
            w.settings.grace,
        );
    let mut next = 0;
    let mut now = start;
    loop {
        if w.halted() {
            return;
        }
        while w.connecting < w.settings.concurrency && next < ids.len() {
            w.begin_connect(next, ids[next], now, w.settings.connect_timeout);
            next += 1;
        }
        w.expire(now);
        if next == ids.len() && w.connecting == 0 && (!w.greet || w.outstanding() == 0) {
            return;
        }
        if now >= cap {
            break;
        }
        let until = w.next_deadline().map_or(cap, |d| d.min(cap));
        now = w.turn(until);
    }
    // Out of time: whatever is still connecting failed; unanswered first
    // lines are missing.
    let timeout = w.settings.connect_timeout;
    for slot in 0..w.slots.len() {
        match w.slots[slot].as_ref() {
            Some(c) if c.connecting_since.is_some() => {
                w.close(
                    slot,
                    Close::ConnectFailed(format!("open phase over ({timeout:?} per connect)")),
                    now,
                );
            }
            Some(c) if c.checker.outstanding() > 0 => w.close(slot, Close::Done, now),
            _ => {}
        }
    }
}

/// The traffic phase: `depth` lines in flight on every connection, a new
/// line for each reply until `stop_sending`, then wait for the outstanding
/// replies until `deadline` (they are `missing` after it).
fn traffic(w: &mut Worker, window: Window, stop_sending: Instant, deadline: Instant) {
    w.window = window;
    w.refill = true;
    let now = Instant::now();
    let depth = w.settings.depth;
    for slot in 0..w.slots.len() {
        w.send_lines(slot, depth, now);
    }
    let mut now = Instant::now();
    loop {
        if w.refill && now >= stop_sending {
            w.refill = false;
        }
        if now >= deadline || w.live == 0 || (!w.refill && w.outstanding() == 0) {
            break;
        }
        if w.halted() {
            w.close_all(|| Close::Abandon, now);
            return;
        }
        let until = if w.refill { stop_sending } else { deadline };
        now = w.turn(until);
    }
    w.close_all(|| Close::Done, now);
}

/// The idle phase: no traffic until `until`, but input and closes by the
/// server are still noticed (as `extra` and `closed_early`).
fn hold(w: &mut Worker, until: Instant) {
    let mut now = Instant::now();
    while now < until && w.live > 0 && !w.halted() {
        now = w.turn(until);
    }
    // Wait out the rest of the hold even if every connection is gone, so
    // the server's wake-ups are measured over the whole hold.
    if !w.halted() {
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
    w.close_all(|| Close::Done, Instant::now());
}
