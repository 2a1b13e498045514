//! A wake-up at an exact instant for the poll loop: a `timerfd` registered
//! with mio. `poll` timeouts are whole milliseconds (mio rounds them up),
//! so rate mode, whose sends are due every few microseconds, would send up
//! to a millisecond late; the timer wakes `epoll_wait` to the microsecond.

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use std::io;
use std::time::{Duration, Instant};

/// A one-shot timer whose expiry makes its token readable.
#[derive(Debug)]
pub struct Alarm {
    fd: OwnedFd,
}

impl Alarm {
    /// A disarmed alarm registered with `registry` under `token`, on the
    /// monotonic clock that `Instant` reads.
    pub fn new(registry: &Registry, token: Token) -> io::Result<Alarm> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(Alarm { fd })
    }

    /// Arms the alarm for `at` (at once if it has passed), replacing any
    /// earlier setting. Re-arming also clears an expiry not yet read, so the
    /// next expiry is a new edge for the edge-triggered poll.
    pub fn set(&self, at: Instant) -> io::Result<()> {
        // Zero would disarm the timer: an instant already past rings now.
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let value = Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        };
        timerfd_settime(
            &self.fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};

    #[test]
    fn rings_between_milliseconds() {
        let mut poll = Poll::new().unwrap();
        let alarm = Alarm::new(poll.registry(), Token(7)).unwrap();
        let mut events = Events::with_capacity(4);
        let start = Instant::now();
        alarm.set(start + Duration::from_micros(300)).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(1)))
            .unwrap();
        let woke = start.elapsed();
        assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(7)));
        assert!(woke >= Duration::from_micros(300), "{woke:?}");
        assert!(woke < Duration::from_millis(500), "{woke:?}");
        // Re-armed, it rings again (a new edge).
        alarm.set(Instant::now()).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(1)))
            .unwrap();
        assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(7)));
    }
}
