//! Micro-benchmark of the idle-timeout wheel (`echoloop::timer::Timer`):
//! what 10,000 connections cost it.
//!
//! - `insert`: schedule 10,000 deadlines spread over one idle timeout (the
//!   default 10 s, in the default 200 ms ticks), as a burst of new
//!   connections does;
//! - `expire_all`: one `expired(now)` call that fires all 10,000 (a loop
//!   catching up after a long sleep);
//! - `expire_by_tick`: the loop's real pattern, `next_wakeup()` then
//!   `expired(that instant)` tick after tick until all 10,000 have fired;
//! - `next_wakeup`: the question the loop asks before every poll.
//!
//! Run: `cargo bench --bench timer`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use echoloop::timer::Timer;
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
fn deadline(origin: Instant, i: u64) -> Instant {
    let spread = IDLE_TIMEOUT.as_millis() as u64 * i / ENTRIES;
    origin + IDLE_TIMEOUT + Duration::from_millis(spread)
}

/// A timer holding all the entries.
fn full_timer(origin: Instant) -> Timer<u64> {
    let mut timer = Timer::new(TICK, origin);
    for i in 0..ENTRIES {
        timer.schedule(i, deadline(origin, i));
    }
    timer
}

fn insert(c: &mut Criterion) {
    let origin = Instant::now();
    let mut group = c.benchmark_group("timer");
    group.throughput(Throughput::Elements(ENTRIES));
    group.bench_function("insert 10k", |b| {
        b.iter_batched(
            || Timer::new(TICK, origin),
            |mut timer| {
                for i in 0..ENTRIES {
                    timer.schedule(black_box(i), deadline(origin, i));
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
    let end = origin + 3 * IDLE_TIMEOUT;
    let mut group = c.benchmark_group("timer");
    group.throughput(Throughput::Elements(ENTRIES));
    group.bench_function("expire_all 10k", |b| {
        b.iter_batched(
            || full_timer(origin),
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
            || full_timer(origin),
            |mut timer| {
                let mut fired = 0;
                // Bounded: one step per tick of the covered span, and more.
                let max_steps = (3 * IDLE_TIMEOUT).as_millis() / TICK.as_millis() + 10;
                for _ in 0..max_steps {
                    let Some(at) = timer.next_wakeup() else { break };
                    fired += timer.expired(at).len() as u64;
                }
                assert_eq!(fired, ENTRIES);
                timer
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();

    let timer = full_timer(origin);
    c.bench_function("timer/next_wakeup (10k entries)", |b| {
        b.iter(|| black_box(&timer).next_wakeup());
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
