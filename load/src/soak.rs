//! `soak` mode: good ping-pong clients (every reply checked, by the
//! ordinary traffic machinery) run while abusive clients (`abuse`) hammer
//! the same server, and afterwards the promises that only the server's
//! side shows are checked: with `--server-pid`, its memory stayed within
//! what the SPEC bounds, its descriptors came back to where they were, and
//! it sleeps once the load is gone; and the good clients were never
//! starved behind the firehoses.

use crate::abuse::{self, Ctx, FIRST_ID, Kind, Limits, Outcome};
use crate::line::Proto;
use echoloop_load::procfs;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the server's memory and descriptors are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Memory a server may grow by beyond its per-connection bound (code
/// pages touched, allocator slack, the slab).
const RSS_SLACK: u64 = 16 << 20;
/// How long the server has after the soak to be back to its descriptors.
const SETTLE: Duration = Duration::from_secs(3);
/// The quiet time after the soak over which the server's CPU is measured.
const QUIET: Duration = Duration::from_secs(1);
/// Share of one core above which a server with no clients counts as
/// spinning.
const SPIN_SHARE: f64 = 0.05;
/// A good client waiting this long for one reply was starved.
pub const STARVED: Duration = Duration::from_secs(1);

/// One abuse kind in the report.
#[derive(Debug, Serialize)]
pub struct AbuseRow {
    pub kind: &'static str,
    pub clients: usize,
    pub attempts: u64,
    pub broken: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
}

/// The server's side of the soak (`--server-pid`).
#[derive(Debug, Default, Serialize)]
pub struct SoakServer {
    pub fds_before: Option<usize>,
    pub fds_peak: Option<usize>,
    pub fds_after: Option<usize>,
    pub rss_before_bytes: Option<u64>,
    pub rss_peak_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    /// The growth the SPEC allows: clients × (max-line + max-pending-output)
    /// plus a fixed slack.
    pub rss_bound_bytes: u64,
    /// Its CPU over the quiet second after the soak, share of one core.
    pub quiet_cpu_share: Option<f64>,
}

/// What the soak adds to the report.
#[derive(Debug, Serialize)]
pub struct Soak {
    pub idle_timeout_secs: f64,
    pub max_line: usize,
    pub max_pending_output: usize,
    pub abuse: Vec<AbuseRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<SoakServer>,
    /// Every broken promise, one line each (abusers and server checks).
    pub broken: Vec<String>,
}

/// Peaks of the server's memory and descriptors while the soak runs.
#[derive(Debug, Default)]
struct Peaks {
    fds: Option<usize>,
    rss: Option<u64>,
}

/// A running soak: the abuser threads and the sampler.
pub struct Running {
    abusers: Vec<JoinHandle<Outcome>>,
    sampler: Option<(Arc<AtomicBool>, JoinHandle<Peaks>)>,
    pid: Option<u32>,
    limits: Limits,
    clients: usize,
    before: (Option<usize>, Option<u64>),
}

/// Starts `per_kind` abusers of every kind against `target` until `until`,
/// and (with `pid`) the sampler of the server.
pub fn start(
    target: SocketAddr,
    limits: Limits,
    proto: Proto,
    per_kind: usize,
    good_clients: usize,
    until: Instant,
    pid: Option<u32>,
) -> Running {
    let before = pid.map_or((None, None), |p| {
        (procfs::open_fds(p).ok(), procfs::rss_bytes(p).ok())
    });
    let sampler = pid.map(|p| {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || sample(p, &flag));
        (stop, handle)
    });
    let ctx = Ctx {
        target,
        limits,
        proto,
        until,
    };
    let mut abusers = Vec::new();
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        for i in 0..per_kind {
            let id = FIRST_ID + (k * per_kind + i) as u32;
            abusers.push(std::thread::spawn(move || abuse::run(kind, id, ctx)));
        }
    }
    Running {
        clients: good_clients + abusers.len(),
        abusers,
        sampler,
        pid,
        limits,
        before,
    }
}

/// Samples the server's descriptors and memory until `stop`.
fn sample(pid: u32, stop: &AtomicBool) -> Peaks {
    let mut peaks = Peaks::default();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = procfs::open_fds(pid) {
            peaks.fds = Some(peaks.fds.map_or(n, |p| p.max(n)));
        }
        if let Ok(b) = procfs::rss_bytes(pid) {
            peaks.rss = Some(peaks.rss.map_or(b, |p| p.max(b)));
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    peaks
}

/// Waits for the abusers, then checks the server's side; `good_max` is
/// the longest wait of a good client for a reply that came, `unanswered`
/// the good clients' lines that got none.
pub fn finish(run: Running, good_max: Duration, unanswered: u64) -> Soak {
    let mut per_kind: Vec<AbuseRow> = Kind::ALL
        .iter()
        .map(|k| AbuseRow {
            kind: k.name(),
            clients: 0,
            attempts: 0,
            broken: 0,
            first: None,
        })
        .collect();
    let mut broken = Vec::new();
    for h in run.abusers {
        let o = h.join().unwrap_or_else(|_| Outcome {
            kind: Kind::Vanish,
            attempts: 0,
            broken: 1,
            first: Some("an abuser thread panicked".into()),
        });
        let row = &mut per_kind[o.kind as usize];
        row.clients += 1;
        row.attempts += o.attempts;
        row.broken += o.broken;
        if row.first.is_none() {
            row.first = o.first;
        }
    }
    for row in &per_kind {
        if let Some(first) = &row.first {
            broken.push(format!(
                "{} ({} of {}): {first}",
                row.kind, row.broken, row.attempts
            ));
        }
    }
    if good_max > STARVED || unanswered > 0 {
        broken.push(format!(
            "starved: good clients waited up to {:.2} s for a reply (allowed {} s), \
             {unanswered} line(s) never answered",
            good_max.as_secs_f64(),
            STARVED.as_secs()
        ));
    }
    let server = run.sampler.map(|(stop, handle)| {
        stop.store(true, Ordering::Relaxed);
        let peaks = handle.join().unwrap_or_default();
        let pid = run.pid.unwrap_or_default();
        check_server(pid, run.before, peaks, run.clients, run.limits, &mut broken)
    });
    Soak {
        idle_timeout_secs: run.limits.idle_timeout.as_secs_f64(),
        max_line: run.limits.max_line,
        max_pending_output: run.limits.max_pending_output,
        abuse: per_kind,
        server,
        broken,
    }
}

/// The server-side checks after the load is gone.
fn check_server(
    pid: u32,
    before: (Option<usize>, Option<u64>),
    peaks: Peaks,
    clients: usize,
    limits: Limits,
    broken: &mut Vec<String>,
) -> SoakServer {
    let per_client = (limits.max_line + limits.max_pending_output) as u64;
    let mut s = SoakServer {
        fds_before: before.0,
        fds_peak: peaks.fds,
        rss_before_bytes: before.1,
        rss_peak_bytes: peaks.rss,
        rss_bound_bytes: clients as u64 * per_client + RSS_SLACK,
        ..SoakServer::default()
    };
    if let (Some(b), Some(p)) = (before.1, peaks.rss)
        && p.saturating_sub(b) > s.rss_bound_bytes
    {
        broken.push(format!(
            "memory: the server grew by {} MiB, more than {} clients x (max-line + max-pending-output) + {} MiB = {} MiB",
            p.saturating_sub(b) >> 20,
            clients,
            RSS_SLACK >> 20,
            s.rss_bound_bytes >> 20
        ));
    }
    // Descriptors back to the baseline once every connection is gone.
    let settle_end = Instant::now() + SETTLE;
    loop {
        s.fds_after = procfs::open_fds(pid).ok();
        let back = matches!((s.fds_after, before.0), (Some(a), Some(b)) if a <= b);
        if back || Instant::now() >= settle_end {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    if let (Some(a), Some(b)) = (s.fds_after, before.0)
        && a > b
    {
        broken.push(format!(
            "descriptors: the server holds {a} descriptors {} s after the soak, {b} before it",
            SETTLE.as_secs()
        ));
    }
    s.rss_after_bytes = procfs::rss_bytes(pid).ok();
    let cpu0 = procfs::cpu_seconds(pid).ok();
    std::thread::sleep(QUIET);
    if let (Some(a), Ok(b)) = (cpu0, procfs::cpu_seconds(pid)) {
        let share = (b - a) / QUIET.as_secs_f64();
        s.quiet_cpu_share = Some(share);
        if share > SPIN_SHARE {
            broken.push(format!(
                "spin: with no client left the server used {:.0}% of a core",
                share * 100.0
            ));
        }
    }
    s
}
