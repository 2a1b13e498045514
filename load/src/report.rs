//! The final report: one plain data structure, printed either as a
//! human-readable table or as exactly one JSON object (`--json`), plus the
//! first few error descriptions on stderr.

use crate::cli::Mode;
use crate::line::Proto;
use crate::tally::{ErrorKind, Tally};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write;

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Latency {
    /// From a nanosecond histogram.
    pub fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Latency {
                samples: 0,
                p50: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                max: 0.0,
            };
        }
        Latency {
            samples: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// Connection establishment.
#[derive(Debug, Serialize)]
pub struct Connects {
    pub attempted: u64,
    pub established: u64,
    /// Connections that finished their job (connect mode: exchange + close).
    pub completed: u64,
    /// Established connections per second of the connect phase.
    pub per_sec: f64,
    pub latency_us: Latency,
}

/// What was measured on the server process (`--server-pid`).
#[derive(Debug, Default, Serialize)]
pub struct Server {
    pub pid: u32,
    /// Server CPU (user + system) during the measured window.
    pub cpu_secs: Option<f64>,
    pub cpu_us_per_reply: Option<f64>,
    /// Connect mode: server CPU per completed connection.
    pub cpu_us_per_conn: Option<f64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_open_bytes: Option<u64>,
    pub rss_growth_per_conn_bytes: Option<f64>,
    /// Idle mode: context switches of all server threads per second of the hold.
    pub wakeups_per_sec: Option<f64>,
}

/// Error counts by kind (names as in `ErrorKind::name`).
#[derive(Debug, Serialize)]
pub struct Errors {
    pub total: u64,
    pub altered: u64,
    pub reordered: u64,
    pub duplicated: u64,
    pub extra: u64,
    pub missing: u64,
    pub closed_early: u64,
    pub connect: u64,
    pub reset: u64,
    pub io: u64,
}

impl Errors {
    pub fn of(t: &Tally) -> Errors {
        let c = |k| t.count(k);
        Errors {
            total: t.total_errors(),
            altered: c(ErrorKind::Altered),
            reordered: c(ErrorKind::Reordered),
            duplicated: c(ErrorKind::Duplicated),
            extra: c(ErrorKind::Extra),
            missing: c(ErrorKind::Missing),
            closed_early: c(ErrorKind::ClosedEarly),
            connect: c(ErrorKind::Connect),
            reset: c(ErrorKind::Reset),
            io: c(ErrorKind::Io),
        }
    }
}

/// Everything a run reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub proto: Proto,
    pub target: String,
    pub conns: usize,
    pub depth: usize,
    pub line_len: usize,
    pub threads: usize,
    /// Source addresses bound (0: chosen by the kernel).
    pub sources: usize,
    pub warmup_secs: f64,
    /// Length of the measured window (connect mode: of the whole run).
    pub window_secs: f64,
    pub hold_secs: Option<f64>,
    /// Correct replies that arrived in the measured window.
    pub replies: u64,
    /// Correct replies over the whole run.
    pub replies_total: u64,
    pub replies_per_sec: f64,
    pub latency_us: Latency,
    pub connects: Connects,
    pub server: Option<Server>,
    pub errors: Errors,
    /// Connect mode: the time limit (--secs) ended the run before --conns
    /// connections were attempted.
    pub stopped_by_time_limit: bool,
    /// No error of any kind.
    pub ok: bool,
}

/// The command-line spelling of a value (`pingpong`, `raw`).
fn name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn mib(bytes: Option<u64>) -> String {
    opt(bytes.map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))))
}

fn latency_row(l: &Latency) -> String {
    format!(
        "p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
        l.p50, l.p99, l.p99_9, l.max, l.samples
    )
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "echoloop-load {} -> {}: {} conns, {} threads, proto {}, {}-byte lines{}",
            name(self.mode),
            self.target,
            self.conns,
            self.threads,
            name(self.proto),
            self.line_len,
            if self.mode == Mode::Pipeline {
                format!(", depth {}", self.depth)
            } else {
                String::new()
            }
        );
        if self.sources > 0 {
            let _ = writeln!(
                s,
                "  source addresses    127.0.0.1..=127.0.0.{}",
                self.sources
            );
        }
        if matches!(self.mode, Mode::Pingpong | Mode::Pipeline | Mode::Connect) {
            let _ = writeln!(
                s,
                "  replies/s           {:.0}  ({} in a {:.2} s window, {} in all)",
                self.replies_per_sec, self.replies, self.window_secs, self.replies_total
            );
            let _ = writeln!(s, "  latency us          {}", latency_row(&self.latency_us));
        }
        let c = &self.connects;
        let _ = writeln!(
            s,
            "  connects            {}/{} established, {} completed, {:.0}/s",
            c.established, c.attempted, c.completed, c.per_sec
        );
        let _ = writeln!(s, "  connect latency us  {}", latency_row(&c.latency_us));
        if let Some(h) = self.hold_secs {
            let _ = writeln!(s, "  held idle           {h:.2} s");
        }
        if let Some(srv) = &self.server {
            if srv.cpu_secs.is_some() {
                let _ = writeln!(
                    s,
                    "  server {:<12} cpu {} s, {} us/reply, {} us/conn",
                    srv.pid,
                    opt(srv.cpu_secs.map(|v| format!("{v:.3}"))),
                    opt(srv.cpu_us_per_reply.map(|v| format!("{v:.3}"))),
                    opt(srv.cpu_us_per_conn.map(|v| format!("{v:.2}")))
                );
            }
            if srv.rss_before_bytes.is_some() {
                let _ = writeln!(
                    s,
                    "  server rss          before {}, after open {}, {} bytes/conn",
                    mib(srv.rss_before_bytes),
                    mib(srv.rss_after_open_bytes),
                    opt(srv.rss_growth_per_conn_bytes.map(|v| format!("{v:.0}")))
                );
            }
            if let Some(w) = srv.wakeups_per_sec {
                let _ = writeln!(s, "  server wakeups/s    {w:.2}");
            }
        }
        if self.stopped_by_time_limit {
            let _ = writeln!(
                s,
                "  note                the --secs time limit ended the run early"
            );
        }
        let e = &self.errors;
        if e.total == 0 {
            let _ = writeln!(s, "  errors              none");
        } else {
            let counts = serde_json::to_value(e).unwrap_or_default();
            let mut parts = Vec::new();
            if let Some(map) = counts.as_object() {
                for kind in ErrorKind::ALL {
                    let n = map.get(kind.name()).and_then(|v| v.as_u64()).unwrap_or(0);
                    if n > 0 {
                        parts.push(format!("{}={n}", kind.name()));
                    }
                }
            }
            let _ = writeln!(s, "  errors              {} ({})", e.total, parts.join(" "));
        }
        s
    }
}

/// The first few errors, one a line, for stderr.
pub fn error_lines(t: &Tally) -> Vec<String> {
    t.samples
        .iter()
        .take(crate::tally::MAX_SAMPLES)
        .map(|e| {
            format!(
                "error [{}] at {:.3}s: {}",
                e.kind.name(),
                e.at.as_secs_f64(),
                e.detail
            )
        })
        .collect()
}
