//! The traffic phase of `rate` mode, open loop: lines go out on a fixed
//! schedule whether or not earlier replies have come back, so a server that
//! falls behind gets lines pipelined at it instead of a pause in the load
//! (no coordinated omission).
//!
//! A thread sends `rate` lines/s over its connections in turn: line `n` of
//! the thread is due at `start + n / rate` on connection `n mod conns`, so
//! every connection has its own evenly spaced schedule, offset from its
//! neighbours'. Between sends the loop sleeps in `poll` until the next line
//! is due (at least `MIN_SLEEP`), woken on time by a timer (`alarm`); the
//! report shows how late the sends still were.

use crate::worker::{Close, Window, Worker};
use std::time::{Duration, Instant};

/// The shortest sleep between two rounds of sends: a line due sooner than
/// this after the last round waits for the next one (so it may go out up
/// to this late, which the lateness figures show). Waking for every line
/// at tens of thousands of lines/s would spend the tool's core switching
/// contexts; this bounds the timer's wake-ups to 10,000 a second.
const MIN_SLEEP: Duration = Duration::from_micros(100);

/// When line `n` of a schedule of `rate` lines/s starting at `start` is due.
fn due(start: Instant, rate: f64, n: u64) -> Instant {
    start + Duration::from_secs_f64(n as f64 / rate)
}

/// Sends `rate` lines/s (this thread's share) from now until
/// `stop_sending`, counts the lines due inside `window`, then waits for the
/// outstanding replies until `deadline` (they are `missing` after it).
pub fn traffic(
    w: &mut Worker,
    rate: f64,
    window: Window,
    stop_sending: Instant,
    deadline: Instant,
) {
    w.window = window;
    w.open_loop = true;
    if let Err(e) = w.wake_precisely() {
        // Still correct, only coarser; the lateness figures will show it.
        eprintln!("warning: no timerfd ({e}): sends may go out up to 1 ms late");
    }
    let conns = w.slots.len() as u64;
    let start = Instant::now();
    let mut n = 0u64;
    let mut now = start;
    loop {
        loop {
            let at = due(start, rate, n);
            if at > now || at >= stop_sending {
                break;
            }
            w.send_due((n % conns) as usize, at);
            n += 1;
        }
        if w.halted() {
            w.close_all(|| Close::Abandon, now);
            return;
        }
        let next = due(start, rate, n);
        let sending = next < stop_sending;
        if w.live == 0 || (!sending && (now >= deadline || w.outstanding() == 0)) {
            break;
        }
        now = w.turn(if sending {
            next.max(now + MIN_SLEEP)
        } else {
            deadline
        });
    }
    w.close_all(|| Close::Done, now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_evenly_spaced() {
        let t = Instant::now();
        assert_eq!(due(t, 1000.0, 0), t);
        assert_eq!(due(t, 1000.0, 3) - t, Duration::from_millis(3));
        assert_eq!(due(t, 4.0, 2) - t, Duration::from_millis(500));
    }
}
