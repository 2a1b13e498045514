//! Deadlines on a hashed timer wheel, ticked in coarse units of real time.
//!
//! [`Timer`] wraps `hierarchical_hash_wheel_timer`'s `QuadWheelWithOverflow`.
//! The wheel counts abstract "milliseconds"; here one wheel unit is one
//! `tick` of real time (by default 1/50 of the idle timeout, 200 ms for the
//! default 10 s). That matters twice over:
//!
//! - the wheel's `can_skip()` answers "nothing to skip" whenever its finest
//!   level holds *any* entry, so the loop wakes once per unit while
//!   connections exist: a 1 ms unit would mean 1000 wakeups per second, a
//!   200 ms unit means 5;
//! - an entry never fires early: a deadline is rounded *up* to a whole tick.
//!
//! The wheel only holds [`Entry`]s (a connection id and the deadline it was
//! scheduled for). It never cancels anything: an entry whose connection is
//! gone, was replaced, or re-armed is ignored by the caller when it fires
//! (spurious expiries are no-ops, as in quinn-proto's `handle_timeout`).
//!
//! Time is passed in (`now`), never read here, so tests drive it by hand.

use hierarchical_hash_wheel_timer::wheels::Skip;
use hierarchical_hash_wheel_timer::wheels::quad_wheel::QuadWheelWithOverflow;
use std::time::{Duration, Instant};

/// One scheduled wake-up: whom it is for and the deadline it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<K> {
    /// Whose deadline this is (a connection id with its generation).
    pub key: K,
    /// The deadline it was scheduled for; the owner compares it with the
    /// deadline it remembers to tell a live entry from a superseded one.
    pub at: Instant,
}

/// A hashed wheel of [`Entry`]s driven by real time in units of `tick`.
pub struct Timer<K: Copy + std::fmt::Debug> {
    wheel: QuadWheelWithOverflow<Entry<K>>,
    /// The length of one wheel unit.
    tick: Duration,
    /// Instant of tick 0.
    origin: Instant,
    /// Ticks the wheel has advanced so far.
    now_tick: u64,
}

impl<K: Copy + std::fmt::Debug> Timer<K> {
    /// A timer whose unit is `tick` (at least 1 ms), starting at `origin`.
    pub fn new(tick: Duration, origin: Instant) -> Self {
        Timer {
            wheel: QuadWheelWithOverflow::default(),
            tick: tick.max(Duration::from_millis(1)),
            origin,
            now_tick: 0,
        }
    }

    /// The first tick at or after `at` (rounding up, so nothing fires early).
    fn tick_of(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        let unit = self.tick.as_nanos();
        since.div_ceil(unit) as u64
    }

    /// Schedules `key` to fire at the first tick at or after `at` (at the
    /// earliest the next tick: a deadline already due fires then).
    pub fn schedule(&mut self, key: K, at: Instant) {
        let tick = self.tick_of(at).max(self.now_tick + 1);
        let delay = Duration::from_millis(tick - self.now_tick);
        // The delay is at least one unit, so the wheel never answers
        // `Expired`; if it ever did, the entry would be lost, so fail loudly
        // in debug builds rather than silently.
        let inserted = self.wheel.insert_with_delay(Entry { key, at }, delay);
        debug_assert!(inserted.is_ok(), "wheel rejected a future entry");
    }

    /// Advances the wheel to `now` and returns the entries that fired.
    ///
    /// Runs of empty ticks are skipped in one step (`can_skip`), so catching
    /// up after a long sleep costs little.
    pub fn expired(&mut self, now: Instant) -> Vec<Entry<K>> {
        let target =
            (now.saturating_duration_since(self.origin).as_nanos() / self.tick.as_nanos()) as u64;
        let mut fired = Vec::new();
        while self.now_tick < target {
            match self.wheel.can_skip() {
                Skip::Empty => {
                    // Nothing to fire: jump straight to `target`.
                    self.skip(target - self.now_tick);
                }
                Skip::Millis(n) => {
                    let step = u64::from(n).min(target - self.now_tick);
                    self.skip(step);
                }
                Skip::None => {
                    fired.extend(self.wheel.tick());
                    self.now_tick += 1;
                }
            }
        }
        fired
    }

    fn skip(&mut self, ticks: u64) {
        // The wheel skips at most u32::MAX units at a time.
        let mut left = ticks;
        while left > 0 {
            let step = left.min(u64::from(u32::MAX)) as u32;
            self.wheel.skip(step);
            left -= u64::from(step);
        }
        self.now_tick += ticks;
    }

    /// When the loop must wake to fire the next entry, or `None` when the
    /// wheel is empty (an idle server sleeps until an event).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let ticks_ahead = match self.wheel.can_skip() {
            Skip::Empty => return None,
            Skip::None => 1,
            Skip::Millis(n) => u64::from(n) + 1,
        };
        let nanos = self.tick.as_nanos() * u128::from(self.now_tick + ticks_ahead);
        self.origin
            .checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timer() -> (Timer<u32>, Instant) {
        let t0 = Instant::now();
        (Timer::new(100 * MS, t0), t0)
    }

    #[test]
    fn empty_wheel_sleeps() {
        let (t, _) = timer();
        assert_eq!(t.next_wakeup(), None);
    }

    #[test]
    fn entry_fires_at_its_tick_never_early() {
        let (mut t, t0) = timer();
        t.schedule(7, t0 + 250 * MS);
        assert!(t.expired(t0 + 299 * MS).is_empty());
        let fired = t.expired(t0 + 300 * MS);
        assert_eq!(
            fired,
            vec![Entry {
                key: 7,
                at: t0 + 250 * MS
            }]
        );
        // Nothing left: the wheel answers "empty" and the loop may sleep.
        assert_eq!(t.next_wakeup(), None);
    }

    #[test]
    fn due_deadline_fires_next_tick() {
        let (mut t, t0) = timer();
        t.schedule(1, t0);
        assert!(t.expired(t0 + 99 * MS).is_empty());
        assert_eq!(t.expired(t0 + 100 * MS).len(), 1);
    }

    #[test]
    fn next_wakeup_skips_empty_ticks() {
        let (mut t, t0) = timer();
        // 1000 ticks ahead: lands beyond the finest wheel (256 units), so
        // the loop may sleep past the empty ticks.
        t.schedule(1, t0 + 100 * 1000 * MS);
        let wake = t.next_wakeup().unwrap();
        assert!(wake > t0 + 100 * MS, "{:?}", wake - t0);
        assert!(wake <= t0 + 100 * 1000 * MS);
    }

    #[test]
    fn catches_up_after_a_long_sleep() {
        let (mut t, t0) = timer();
        for k in 0..100u32 {
            t.schedule(k, t0 + Duration::from_secs(u64::from(k) * 60));
        }
        let fired = t.expired(t0 + Duration::from_secs(3 * 3600));
        assert_eq!(fired.len(), 100);
        let mut keys: Vec<u32> = fired.iter().map(|e| e.key).collect();
        keys.sort_unstable();
        assert_eq!(keys, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn wakeups_per_second_are_bounded_by_the_tick() {
        let (mut t, t0) = timer();
        // 10,000 deadlines spread over 10 s: every tick has work, so the
        // loop wakes once per tick, 10 times a second at a 100 ms unit.
        for k in 0..10_000u32 {
            t.schedule(k, t0 + MS * k);
        }
        let mut now = t0;
        let mut wakeups = 0;
        while let Some(wake) = t.next_wakeup() {
            assert!(wake > now);
            now = wake;
            wakeups += 1;
            t.expired(now);
        }
        assert_eq!(wakeups, 100);
    }
}
