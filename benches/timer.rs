//! Micro-benchmark of the idle-timeout wheel (`echoloop::timer::Timer`):
//! what 10,000 connections cost it.
//!
//! - `insert`: schedule 10,000 deadlines spread over one idle timeout (the
//!   default 10 s, in the default 200 ms ticks), as a burst of new
//!   connections does;
//! - `expire_all`: one `expired(now)` call that fires all 10,000 (a loop
//!   catching up after a long sleep);
//! - `expire_by_tick`: the loop's real pattern, `next_due()` then
//!   `expired(that tick)` until all 10,000 have fired (one wakeup per
//!   occupied tick);
//! - `next_due`: the question the loop asks before every poll.
//!
//! Run: `cargo bench --bench timer`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use echoloop::timer::{Clock, Tick, Timer};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Entries per iteration.
const ENTRIES: u64 = 10_000;
/// The server's default idle timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The server's default tick: 1/50 of the idle timeout.
const TICK: Duration = Duration::from_millis(200);

/// The deadline of entry `i`: one idle timeout after its connection's last
/// line, the lines spread evenly over the first timeout.
fn deadline(clock: &Clock, origin: Instant, i: u64) -> Tick {
    let spread = IDLE_TIMEOUT.as_millis() as u64 * i / ENTRIES;
    clock
        .at(origin + Duration::from_millis(spread))
        .after(clock.span(IDLE_TIMEOUT))
}

/// A timer holding all the entries.
fn full_timer(clock: &Clock, origin: Instant) -> Timer<u64> {
    let mut timer = Timer::new(clock.at(origin));
    for i in 0..ENTRIES {
        timer.schedule(i, deadline(clock, origin, i));
    }
    timer
}

fn insert(c: &mut Criterion) {
    let origin = Instant::now();
    let clock = Clock::new(TICK, origin);
    let mut group = c.benchmark_group("timer");
    group.throughput(Throughput::Elements(ENTRIES));
    group.bench_function("insert 10k", |b| {
        b.iter_batched(
            || Timer::new(clock.at(origin)),
            |mut timer| {
                for i in 0..ENTRIES {
                    timer.schedule(black_box(i), deadline(&clock, origin, i));
                }
                timer
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn expire(c: &mut Criterion) {
    let origin = Instant::now();
    let clock = Clock::new(TICK, origin);
    let end = clock.at(origin + 3 * IDLE_TIMEOUT);
    let mut group = c.benchmark_group("timer");
    group.throughput(Throughput::Elements(ENTRIES));
    group.bench_function("expire_all 10k", |b| {
        b.iter_batched(
            || full_timer(&clock, origin),
            |mut timer| {
                let fired = timer.expired(end);
                assert_eq!(fired.len() as u64, ENTRIES);
                timer
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("expire_by_tick 10k", |b| {
        b.iter_batched(
            || full_timer(&clock, origin),
            |mut timer| {
                let mut fired = 0;
                // Bounded: one step per tick of the covered span, and more.
                let max_steps = (3 * IDLE_TIMEOUT).as_millis() / TICK.as_millis() + 10;
                for _ in 0..max_steps {
                    let Some(at) = timer.next_due() else { break };
                    fired += timer.expired(at).len() as u64;
                }
                assert_eq!(fired, ENTRIES);
                timer
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();

    let timer = full_timer(&clock, origin);
    c.bench_function("timer/next_due (10k entries)", |b| {
        b.iter(|| black_box(&timer).next_due());
    });
}

/// Short enough that `cargo bench` stays quick, long enough to be stable.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = timer;
    config = config();
    targets = insert, expire
}
criterion_main!(timer);
