//! The thread body of the `connect` mode: open this thread's share of the
//! connections, at most `concurrency` in progress at once; each does one
//! exchange (one line, its reply) and is closed, freeing its slot.

use crate::tally::{ErrorKind, Tally};
use crate::worker::{Close, Progress, Settings, Window, Worker};
use std::sync::Arc;
use std::time::Instant;

/// Runs the connections `ids` until all are done or `deadline` passes
/// (connections still in progress then are abandoned, not counted as errors).
pub fn run(settings: Settings, ids: Vec<u32>, progress: Arc<Progress>, deadline: Instant) -> Tally {
    let t0 = settings.t0;
    let slots = settings.concurrency.min(ids.len()).max(1);
    // Each connection gets connect_timeout to connect plus grace for its
    // exchange before it is given up.
    let budget = settings.connect_timeout + settings.grace;
    let mut w = match Worker::new(settings, progress, slots) {
        Ok(w) => w,
        Err(e) => {
            let mut tally = Tally::default();
            tally.error(ErrorKind::Io, 1, t0.elapsed(), || {
                format!("creating poll: {e}")
            });
            return tally;
        }
    };
    w.greet = true;
    w.close_when_answered = true;
    // Every exchange counts toward latency.
    w.window = Window {
        from: t0,
        to: deadline,
    };
    // Every connection of the first round failed: another round would
    // only fail the same way.
    let hopeless = |w: &Worker| {
        w.live == 0 && w.tally.connects_ok == 0 && w.tally.connects_attempted >= slots as u64
    };
    let mut next = 0;
    let mut now = Instant::now();
    while now < deadline && !hopeless(&w) {
        // Slots freed in the last turn are reused only here, between turns.
        while next < ids.len() && !hopeless(&w) {
            let Some(slot) = w.free.pop() else { break };
            w.begin_connect(slot, ids[next], now, budget);
            next += 1;
        }
        w.expire(now);
        if next == ids.len() && w.live == 0 || w.halted() {
            break;
        }
        let until = w.next_deadline().map_or(deadline, |d| d.min(deadline));
        now = w.turn(until);
    }
    w.close_all(|| Close::Abandon, now);
    w.tally
}
