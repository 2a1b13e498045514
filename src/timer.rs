//! Deadlines on a hashed timer wheel, in whole ticks of a coarse clock.
//!
//! Time here is a [`Tick`]: a count of `tick`-long units (by default 1/50
//! of the idle timeout, 200 ms for the default 10 s) read from a [`Clock`].
//! Eight bytes instead of an `Instant`'s sixteen, and whole ticks are all a
//! deadline needs: the tick *is* the slack. Every deadline is rounded up to
//! a tick boundary, so an entry never fires early, and all deadlines that
//! fall within the same tick share one wakeup.
//!
//! [`Timer`] wraps `hierarchical_hash_wheel_timer`'s `QuadWheelWithOverflow`
//! (one wheel unit = one tick) and adds what the crate does not have: the
//! earliest occupied tick. The crate's `can_skip()` answers "nothing to
//! skip" whenever its finest level holds *any* entry, however far away, so a
//! loop that asked it would wake every tick while connections exist. The
//! timer keeps `occupied`, the set of ticks that hold at least one entry
//! (like the Linux wheel's `next_expiry` or Kafka's queue of non-empty
//! buckets), and the loop sleeps until its first element:
//!
//! - **schedule**: one wheel insert (O(1)) plus one `BTreeSet` insert,
//!   O(log D) for D occupied ticks. D is bounded by the longest timeout in
//!   ticks (51 for the default idle timeout), not by the number of entries,
//!   and a burst of connections mostly finds its tick already there.
//! - **fire**: the wheel hands out each due entry in O(1); each fired tick
//!   leaves the set once (`pop_first`, O(log D)), however many entries it
//!   held. Catching up runs the wheel one tick at a time over the ticks it
//!   cannot skip, which is at most the longest timeout in ticks per wakeup.
//! - **next due**: `first()`, O(log D), asked once per turn of the loop.
//!
//! The wheel only holds [`Entry`]s (a connection id and the tick it was
//! scheduled for). It never cancels anything: an entry whose connection is
//! gone, was replaced, or re-armed is ignored by the caller when it fires
//! (spurious expiries are no-ops, as in quinn-proto's `handle_timeout`).
//!
//! Time is passed in, never read here, so tests drive it by hand.

use hierarchical_hash_wheel_timer::wheels::Skip;
use hierarchical_hash_wheel_timer::wheels::quad_wheel::QuadWheelWithOverflow;
use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// A moment in whole ticks of a [`Clock`]: the tick during which it falls.
///
/// Ticks count from 1 (the clock's origin lies one tick before the loop
/// starts), so an `Option<Tick>` is as small as a `Tick`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(NonZeroU64);

impl Tick {
    /// The first tick of a clock.
    pub const FIRST: Tick = Tick(NonZeroU64::MIN);

    /// The number of this tick.
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// `span` ticks later (a span from [`Clock::span`]).
    pub fn after(self, span: Span) -> Tick {
        Tick(self.0.saturating_add(span.0))
    }

    /// Ticks from `earlier` to `self` (0 if `earlier` is not earlier).
    pub fn since(self, earlier: Tick) -> u64 {
        self.get().saturating_sub(earlier.get())
    }
}

/// The tick numbered `n` (as [`Tick::get`] returned it).
impl From<NonZeroU64> for Tick {
    fn from(n: NonZeroU64) -> Tick {
        Tick(n)
    }
}

/// A timeout as a number of ticks, made by [`Clock::span`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(u64);

/// Reads real time as [`Tick`]s.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// The start of tick 0 (one tick before the instant the clock was made).
    origin: Instant,
    /// The length of one tick.
    tick: Duration,
}

impl Clock {
    /// A clock of `tick`-long ticks (at least 1 ms) whose first tick starts
    /// at `start`.
    pub fn new(tick: Duration, start: Instant) -> Clock {
        let tick = tick.max(Duration::from_millis(1));
        let origin = start.checked_sub(tick).unwrap_or(start);
        Clock { origin, tick }
    }

    /// The length of one tick.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The start of tick 0: with [`Clock::tick`], all a clock is (a live
    /// upgrade hands both to the new process, so its ticks mean the same).
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The clock whose tick 0 starts at `origin` (as [`Clock::origin`]
    /// returned it, perhaps in another process).
    pub fn with_origin(origin: Instant, tick: Duration) -> Clock {
        Clock {
            origin,
            tick: tick.max(Duration::from_millis(1)),
        }
    }

    /// The tick `at` falls in (asked once per connection served: one
    /// 64-bit division).
    pub fn at(&self, at: Instant) -> Tick {
        let n = nanos(at.saturating_duration_since(self.origin)) / nanos(self.tick);
        Tick(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }

    /// The instant tick `t` starts: when a deadline of `t` is due (`None`
    /// beyond what an `Instant` can hold: never).
    pub fn start_of(&self, t: Tick) -> Option<Instant> {
        let nanos = u64::try_from(self.tick.as_nanos() * u128::from(t.get())).ok()?;
        self.origin.checked_add(Duration::from_nanos(nanos))
    }

    /// The span that takes a moment anywhere in its tick to a tick boundary
    /// at least `d` later: `d` rounded up to whole ticks, plus the tick the
    /// moment is in (we only know it is somewhere in that tick). So a
    /// deadline `now.after(clock.span(d))` is never early, and at most one
    /// tick late when `d` is a whole number of ticks.
    pub fn span(&self, d: Duration) -> Span {
        let ticks = d.as_nanos().div_ceil(self.tick.as_nanos());
        Span(
            u64::try_from(ticks)
                .unwrap_or(u64::MAX / 2)
                .saturating_add(1),
        )
    }
}

/// `d` in nanoseconds, saturating (after 584 years).
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// One scheduled wake-up: whom it is for and the deadline it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<K> {
    /// Whose deadline this is (a connection id with its generation).
    pub key: K,
    /// The deadline it was scheduled for; the owner compares it with the
    /// deadline it remembers to tell a live entry from a superseded one.
    pub at: Tick,
}

/// A hashed wheel of [`Entry`]s that knows its earliest occupied tick.
pub struct Timer<K: Copy + std::fmt::Debug> {
    wheel: QuadWheelWithOverflow<Entry<K>>,
    /// The last tick the wheel has run.
    now: u64,
    /// Every tick that holds at least one entry (entries are never
    /// cancelled, so a tick leaves the set only when it fires).
    occupied: BTreeSet<u64>,
}

impl<K: Copy + std::fmt::Debug> Timer<K> {
    /// An empty timer whose wheel has run up to `now`.
    pub fn new(now: Tick) -> Self {
        Timer {
            wheel: QuadWheelWithOverflow::default(),
            now: now.get(),
            occupied: BTreeSet::new(),
        }
    }

    /// Schedules `key` to fire at tick `at` (at the earliest the next tick
    /// the wheel runs: a deadline already due fires then).
    pub fn schedule(&mut self, key: K, at: Tick) {
        let tick = at.get().max(self.now + 1);
        let delay = Duration::from_millis(tick - self.now);
        // The delay is at least one unit, so the wheel never answers
        // `Expired`; if it ever did, the entry would be lost, so fail loudly
        // in debug builds rather than silently.
        let inserted = self.wheel.insert_with_delay(Entry { key, at }, delay);
        debug_assert!(inserted.is_ok(), "wheel rejected a future entry");
        self.occupied.insert(tick);
    }

    /// Runs the wheel up to tick `now` and returns the entries that fired.
    ///
    /// Runs of empty ticks are skipped in one step where the wheel allows it
    /// (`can_skip`), so catching up after a long sleep costs little.
    pub fn expired(&mut self, now: Tick) -> Vec<Entry<K>> {
        let target = now.get();
        let mut fired = Vec::new();
        while self.now < target {
            match self.wheel.can_skip() {
                Skip::Empty => self.skip(target - self.now),
                Skip::Millis(n) => self.skip(u64::from(n).min(target - self.now)),
                Skip::None => {
                    fired.extend(self.wheel.tick());
                    self.now += 1;
                }
            }
        }
        while self.occupied.first().is_some_and(|&t| t <= target) {
            self.occupied.pop_first();
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
        self.now += ticks;
    }

    /// The earliest tick that holds an entry: when the loop must next wake,
    /// or `None` when the wheel is empty (an idle server sleeps until an
    /// event).
    pub fn next_due(&self) -> Option<Tick> {
        self.occupied
            .first()
            .and_then(|&t| NonZeroU64::new(t))
            .map(Tick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn tick(n: u64) -> Tick {
        Tick(NonZeroU64::new(n).unwrap())
    }

    fn timer() -> Timer<u32> {
        Timer::new(Tick::FIRST)
    }

    #[test]
    fn empty_wheel_sleeps() {
        assert_eq!(timer().next_due(), None);
    }

    #[test]
    fn entry_fires_at_its_tick_never_early() {
        let mut t = timer();
        t.schedule(7, tick(4));
        assert_eq!(t.next_due(), Some(tick(4)));
        assert!(t.expired(tick(3)).is_empty());
        assert_eq!(
            t.expired(tick(4)),
            vec![Entry {
                key: 7,
                at: tick(4)
            }]
        );
        // Nothing left: the loop may sleep.
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn due_deadline_fires_next_tick() {
        let mut t = timer();
        t.expired(tick(10));
        t.schedule(1, tick(5));
        assert_eq!(t.next_due(), Some(tick(11)));
        assert!(t.expired(tick(10)).is_empty());
        assert_eq!(t.expired(tick(11)).len(), 1);
    }

    #[test]
    fn next_due_is_the_earliest_occupied_tick_even_in_the_finest_wheel() {
        // 50 ticks ahead sits in the finest wheel, where the crate's
        // `can_skip` would say "tick every unit".
        let mut t = timer();
        t.schedule(1, tick(51));
        t.schedule(2, tick(40));
        t.schedule(3, tick(40));
        assert_eq!(t.next_due(), Some(tick(40)));
        assert!(t.expired(tick(39)).is_empty());
        let mut keys: Vec<u32> = t.expired(tick(40)).iter().map(|e| e.key).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![2, 3], "deadlines in one tick share a wakeup");
        assert_eq!(t.next_due(), Some(tick(51)));
        assert_eq!(t.expired(tick(51)).len(), 1);
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn entries_across_wheel_levels_fire_on_their_tick() {
        // Beyond the finest wheel (256 units) and beyond the second (65,536):
        // the wheel cascades them down while it is advanced past empty ticks.
        let mut t = timer();
        let far = [300u64, 70_000, 1_000_000];
        for (k, &at) in far.iter().enumerate() {
            t.schedule(k as u32, tick(at));
        }
        for (k, &at) in far.iter().enumerate() {
            assert_eq!(t.next_due(), Some(tick(at)));
            assert!(t.expired(tick(at - 1)).is_empty(), "early at {at}");
            assert_eq!(
                t.expired(tick(at))
                    .iter()
                    .map(|e| e.key)
                    .collect::<Vec<_>>(),
                vec![k as u32]
            );
        }
    }

    #[test]
    fn catches_up_after_a_long_sleep() {
        let mut t = timer();
        for k in 0..100u32 {
            t.schedule(k, tick(2 + u64::from(k) * 300));
        }
        let fired = t.expired(tick(100_000));
        let mut keys: Vec<u32> = fired.iter().map(|e| e.key).collect();
        keys.sort_unstable();
        assert_eq!(keys, (0..100).collect::<Vec<_>>());
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn a_wakeup_per_occupied_tick_and_none_between() {
        // 10,000 deadlines in the last 10 of 60 ticks: 10 wakeups, and the
        // first one only at tick 50.
        let mut t = timer();
        for k in 0..10_000u32 {
            t.schedule(k, tick(51 + u64::from(k % 10)));
        }
        let mut wakeups = Vec::new();
        let mut fired = 0;
        while let Some(due) = t.next_due() {
            wakeups.push(due.get());
            fired += t.expired(due).len();
        }
        assert_eq!(wakeups, (51..61).collect::<Vec<_>>());
        assert_eq!(fired, 10_000);
    }

    #[test]
    fn clock_rounds_spans_so_nothing_is_early() {
        let t0 = Instant::now();
        let clock = Clock::new(20 * MS, t0);
        assert_eq!(clock.at(t0), Tick::FIRST);
        assert_eq!(clock.at(t0 + 19 * MS), Tick::FIRST);
        assert_eq!(clock.at(t0 + 20 * MS), tick(2));
        // 1 s is 50 ticks; from anywhere in tick 1 the first boundary at
        // least 1 s later is the start of tick 52 (t0 + 1020 ms at worst
        // from a moment at t0 + 19 ms, which is 1001 ms later).
        let span = clock.span(Duration::from_secs(1));
        assert_eq!(span, Span(51));
        let due = Tick::FIRST.after(span);
        assert_eq!(clock.start_of(due), Some(t0 + 1020 * MS));
        assert!(clock.start_of(due).unwrap() >= t0 + 19 * MS + Duration::from_secs(1));
        // A span that is not a whole number of ticks rounds up.
        assert_eq!(clock.span(21 * MS), Span(3));
    }
}
