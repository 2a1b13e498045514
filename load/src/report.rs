//! The final report: one plain data structure, printed either as a
//! human-readable table or as exactly one JSON object (`--json`), plus the
//! first few error descriptions on stderr.

use crate::cli::Mode;
use crate::line::Proto;
use crate::slo::SloReport;
use crate::soak::Soak;
use crate::tally::{ErrorKind, Tally};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write;

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// From a nanosecond histogram (all zeros when it is empty).
    pub fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        let q = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                us(h.value_at_quantile(q))
            }
        };
        Latency {
            samples: h.len(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: if h.is_empty() { 0.0 } else { us(h.max()) },
        }
    }
}

/// Rate mode: the schedule asked for and how well the tool kept it.
#[derive(Debug, Serialize)]
pub struct Rate {
    /// --rate.
    pub asked_per_sec: f64,
    /// Lines due inside the measured window, per second of it.
    pub sent_per_sec: f64,
    /// How late the tool's own sends went out (actual minus scheduled).
    pub lateness_us: Latency,
    /// --max-lateness: the p99 of `lateness_us` allowed.
    pub max_lateness_us: f64,
    /// The tool kept its schedule: lateness p99 within the bound. An
    /// invalid run measured the tool, not the server (exit status 3).
    pub valid: bool,
}

/// Connection establishment.
#[derive(Debug, Serialize)]
pub struct Connects {
    pub attempted: u64,
    pub established: u64,
    /// Connect mode: connections that did their whole job (exchange, close).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<u64>,
    /// Established connections per second of the connect phase.
    pub per_sec: f64,
    pub latency_us: Latency,
}

/// What the load generator itself cost over the measured window, to set
/// beside the server's: a tool that spends more per reply than the server
/// may be what limits the rate.
#[derive(Debug, Default, Serialize)]
pub struct Tool {
    /// Its CPU (user + system, all threads) during the measured window.
    pub cpu_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_reply: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_conn: Option<f64>,
}

/// What was measured on the server process (`--server-pid`); a figure
/// that does not apply to the mode is left out.
#[derive(Debug, Default, Serialize)]
pub struct Server {
    pub pid: u32,
    /// Server CPU (user + system) during the measured window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_reply: Option<f64>,
    /// Connect mode: server CPU per completed connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_conn: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_open_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_growth_per_conn_bytes: Option<f64>,
    /// Idle mode: context switches of all server threads per second of the hold.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    pub wrong_proto: u64,
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
            wrong_proto: c(ErrorKind::WrongProto),
            io: c(ErrorKind::Io),
        }
    }
}

/// Everything a run reports. Fields that do not apply to the mode are
/// left out of the JSON rather than filled with zeros.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub proto: Proto,
    pub target: String,
    pub conns: usize,
    /// Pipeline mode: lines in flight per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    pub line_len: usize,
    pub threads: usize,
    /// Source addresses the connections come from (--sources): more than
    /// one means they were bound to 127.0.0.1..=127.0.0.K.
    pub sources: usize,
    pub warmup_secs: f64,
    /// Length of the measured window (connect mode: of the whole run).
    pub window_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_secs: Option<f64>,
    /// Correct replies counted in the measured window (rate mode: replies
    /// to the lines due inside it).
    pub replies: u64,
    /// Correct replies over the whole run.
    pub replies_total: u64,
    pub replies_per_sec: f64,
    /// Reply latency (rate mode: from when each line was due). Not in idle
    /// mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Latency>,
    /// Rate mode: reply latency from when each line was actually sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_uncorrected_us: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    pub connects: Connects,
    pub tool: Tool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    pub errors: Errors,
    /// Connect mode: the time limit (--secs) ended the run before --conns
    /// connections were attempted.
    pub stopped_by_time_limit: bool,
    /// Why the run stopped before its end, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early: Option<String>,
    /// Soak mode: the abusers and the server-side checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<Soak>,
    /// Rate mode with --slo: the search's steps and the best rate; the
    /// other figures are the best step's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloReport>,
    /// No error of any kind (and, in soak mode, no broken promise).
    pub ok: bool,
}

/// The command-line spelling of a value (`pingpong`, `raw`).
fn name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "-".into(),
        |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    )
}

fn latency_row(l: &Latency) -> String {
    format!(
        "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.samples
    )
}

/// `1 thread`, `2 threads`.
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// A CPU cost row: seconds, then per reply or per connection.
fn cpu_row(secs: Option<f64>, per_reply: Option<f64>, per_conn: Option<f64>) -> Option<String> {
    let secs = secs?;
    let mut row = format!("cpu {secs:.3} s");
    if let Some(v) = per_reply {
        let _ = write!(row, ", {v:.3} us/reply");
    }
    if let Some(v) = per_conn {
        let _ = write!(row, ", {v:.2} us/conn");
    }
    Some(row)
}

impl Report {
    /// The human-readable table: only the rows that mean something for
    /// the mode.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut extra = String::new();
        if let Some(d) = self.depth {
            let _ = write!(extra, ", depth {d}");
        }
        if let Some(r) = &self.rate {
            let _ = write!(extra, ", {:.0} lines/s asked", r.asked_per_sec);
        }
        let _ = writeln!(
            s,
            "echoloop-load {} -> {}: {}, {}, proto {}, {}-byte lines{extra}",
            name(self.mode),
            self.target,
            count(self.conns, "conn"),
            count(self.threads, "thread"),
            name(self.proto),
            self.line_len,
        );
        if let Some(why) = &self.stopped_early {
            let _ = writeln!(s, "  stopped early       {why}");
        }
        if self.sources > 1 {
            let _ = writeln!(
                s,
                "  source addresses    127.0.0.1..=127.0.0.{}",
                self.sources
            );
        }
        let c = &self.connects;
        match self.mode {
            Mode::Pingpong | Mode::Pipeline | Mode::Rate | Mode::Soak
                if self.stopped_early.is_none() =>
            {
                if let Some(r) = &self.rate {
                    let _ = writeln!(
                        s,
                        "  sent/s              {:.0}  (lines due in a {:.2} s window)",
                        r.sent_per_sec, self.window_secs
                    );
                }
                let _ = writeln!(
                    s,
                    "  replies/s           {:.0}  ({} in a {:.2} s window, {} in all)",
                    self.replies_per_sec, self.replies, self.window_secs, self.replies_total
                );
                if let Some(l) = &self.latency_us {
                    let from = if self.rate.is_some() {
                        "  from due time"
                    } else {
                        ""
                    };
                    let _ = writeln!(s, "  latency us          {}{from}", latency_row(l));
                }
                if let Some(l) = &self.latency_uncorrected_us {
                    let _ = writeln!(
                        s,
                        "  uncorrected us      {}  from send time",
                        latency_row(l)
                    );
                }
                if let Some(r) = &self.rate {
                    let verdict = if r.valid {
                        format!("valid: p99 within {:.0} us", r.max_lateness_us)
                    } else {
                        format!(
                            "INVALID: p99 above {:.0} us, the tool fell behind",
                            r.max_lateness_us
                        )
                    };
                    let _ = writeln!(
                        s,
                        "  tool lateness us    p50 {:.1}  p99 {:.1}  max {:.1}  ({verdict})",
                        r.lateness_us.p50, r.lateness_us.p99, r.lateness_us.max
                    );
                }
                let _ = writeln!(
                    s,
                    "  connects            {}/{} established",
                    c.established, c.attempted
                );
            }
            Mode::Connect => {
                let _ = writeln!(
                    s,
                    "  connections/s       {:.0}  ({}/{} established, {} completed an exchange and closed)",
                    c.per_sec,
                    c.established,
                    c.attempted,
                    c.completed.unwrap_or(0)
                );
                if let Some(l) = self.latency_us.as_ref().filter(|l| l.samples > 0) {
                    let _ = writeln!(s, "  exchange latency us {}", latency_row(l));
                }
            }
            Mode::Idle | Mode::Pingpong | Mode::Pipeline | Mode::Rate | Mode::Soak => {
                let _ = writeln!(
                    s,
                    "  connects            {}/{} established, {:.0}/s",
                    c.established, c.attempted, c.per_sec
                );
            }
        }
        if c.established > 0 {
            let _ = writeln!(s, "  connect latency us  {}", latency_row(&c.latency_us));
        }
        if let Some(h) = self.hold_secs {
            let _ = writeln!(s, "  held idle           {h:.2} s");
        }
        let t = &self.tool;
        if let Some(row) = cpu_row(t.cpu_secs, t.cpu_us_per_reply, t.cpu_us_per_conn)
            && self.stopped_early.is_none()
        {
            let _ = writeln!(s, "  load tool           {row}");
        }
        if let Some(srv) = &self.server {
            if let Some(row) = cpu_row(srv.cpu_secs, srv.cpu_us_per_reply, srv.cpu_us_per_conn) {
                let _ = writeln!(s, "  server {:<12} {row}", srv.pid);
            }
            if srv.rss_before_bytes.is_some() {
                let per_conn = srv
                    .rss_growth_per_conn_bytes
                    .map(|v| format!(", {v:.0} bytes/conn"))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  server rss          before {}, after open {}{per_conn}",
                    mib(srv.rss_before_bytes),
                    mib(srv.rss_after_open_bytes),
                );
            }
            if let Some(w) = srv.wakeups_per_sec {
                let _ = writeln!(s, "  server wakeups/s    {w:.2}");
            }
        }
        if let Some(soak) = &self.soak {
            soak_rows(&mut s, soak);
        }
        if let Some(slo) = &self.slo {
            for (i, st) in slo.steps.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "  slo step {:<11} {:.0} lines/s: {:.1} us{}, {}",
                    i + 1,
                    st.rate,
                    st.latency_us,
                    if st.valid { "" } else { " (tool late)" },
                    if st.passed { "passed" } else { "failed" }
                );
            }
            let best = slo
                .best_rate
                .map_or_else(|| "none".into(), |r| format!("{r:.0} lines/s"));
            let _ = writeln!(s, "  slo {:<15} highest passing rate {best}", slo.bound);
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

/// The soak section of the table: one row per abuse kind, the server's
/// side, and the verdict.
fn soak_rows(s: &mut String, soak: &Soak) {
    for row in &soak.abuse {
        if row.clients == 0 {
            continue;
        }
        let verdict = if row.broken == 0 {
            "ok".to_string()
        } else {
            format!("{} BROKEN", row.broken)
        };
        let _ = writeln!(
            s,
            "  abuse {:<13} {} clients, {} attempts, {verdict}",
            row.kind, row.clients, row.attempts
        );
    }
    if let Some(srv) = &soak.server {
        let n = |v: Option<usize>| v.map_or_else(|| "-".into(), |v| v.to_string());
        let _ = writeln!(
            s,
            "  server fds          before {}, peak {}, after {}",
            n(srv.fds_before),
            n(srv.fds_peak),
            n(srv.fds_after)
        );
        let _ = writeln!(
            s,
            "  server rss peak     before {}, peak {}, after {} (growth allowed {})",
            mib(srv.rss_before_bytes),
            mib(srv.rss_peak_bytes),
            mib(srv.rss_after_bytes),
            mib(Some(srv.rss_bound_bytes))
        );
        if let Some(c) = srv.quiet_cpu_share {
            let _ = writeln!(s, "  server quiet cpu    {:.1}% of a core", c * 100.0);
        }
    }
    let verdict = if soak.broken.is_empty() {
        "every promise kept".to_string()
    } else {
        format!("{} broken (see stderr)", soak.broken.len())
    };
    let _ = writeln!(s, "  soak                {verdict}");
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
