//! The command line: every option with its default, parsed by clap, and the
//! checks between options that clap cannot express (exit status 2).

use crate::line::Proto;
use clap::{CommandFactory, Parser, ValueEnum};
use std::net::SocketAddr;
use std::time::Duration;

/// What the connections do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One line in flight per connection.
    Pingpong,
    /// --depth lines in flight per connection; a new one for each reply.
    Pipeline,
    /// Open loop: --rate lines/s in all, each connection on its own evenly
    /// spaced schedule, sent on time whether or not earlier replies came
    /// back. Latency is measured from when each line was due.
    Rate,
    /// Open --conns connections in all, --concurrency at a time, one
    /// exchange each, then close: measures connections per second.
    Connect,
    /// Open --conns connections, one exchange each, hold them idle for
    /// --hold seconds, close.
    Idle,
    /// --conns good ping-pong clients while --abusers clients of every
    /// abusive kind hammer the server, each outcome checked against the
    /// server's promises (told by --idle-timeout, --max-line and
    /// --max-pending-output); with --server-pid also its memory,
    /// descriptors and CPU once the load is gone.
    Soak,
}

/// c10k load generator for line-echo servers: drives up to tens of
/// thousands of connections from a mio readiness loop, checks every reply
/// byte for byte, and reports replies/s, latency, connect rate and the
/// server's CPU and memory. Exit status: 0 no error, 1 any error counted,
/// 2 bad arguments.
#[derive(Debug, Parser)]
#[command(name = "echoloop-load", version)]
pub struct Cli {
    /// Server address (only 127.0.0.0/8 targets can spread source addresses).
    #[arg(long, default_value = "127.0.0.1:1234")]
    pub target: SocketAddr,

    /// What the connections do.
    #[arg(long, value_enum, default_value_t = Mode::Pingpong)]
    pub mode: Mode,

    /// Connections (in `connect` mode: connections in all).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,

    /// Lines in flight per connection in `pipeline` mode.
    #[arg(long, default_value_t = 16)]
    pub depth: usize,

    /// Lines per second in all, spread over --conns, in `rate` mode.
    #[arg(long)]
    pub rate: Option<f64>,

    /// In `rate` mode, search for the highest rate at which this latency
    /// bound holds (`p99=5ms`; p50, p90, p99 or p999), starting at --rate,
    /// in at most 8 runs of --warmup + --secs each.
    #[arg(long, value_parser = crate::slo::parse, value_name = "PERCENTILE=DURATION")]
    pub slo: Option<crate::slo::Slo>,

    /// In `rate` mode, how late the tool's own sends may be at p99 before
    /// the run is marked invalid (exit status 3).
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub max_lateness: Duration,

    /// Connections being opened at once (in `connect` mode: connections
    /// in progress at once, exchange included).
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,

    /// How long to hold the connections idle in `idle` mode.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,

    /// In `soak` mode, abusive clients of each kind (reset, slowloris,
    /// long_line, non_reader, firehose, half_close, random_bytes, vanish).
    #[arg(long, default_value_t = 2)]
    pub abusers: usize,

    /// The server's --idle-timeout (`soak` checks that slowloris clients
    /// are closed by then; `0` = the server never closes idle ones).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// The server's --max-line (`soak` sends longer lines and expects the
    /// error line): `65536`, `64KiB`, `1MiB`.
    #[arg(long, default_value = "65536", value_parser = parse_size)]
    pub max_line: usize,

    /// The server's --max-pending-output (`soak` bounds the server's memory
    /// under non-reading clients with it).
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    pub max_pending_output: usize,

    /// The reply the server must give: `prefix` (`you said: L!`) or `raw` (echo).
    #[arg(long, value_enum, default_value_t = Proto::Prefix)]
    pub proto: Proto,

    /// Bytes per line sent, terminator included (longer only when the
    /// connection id and sequence number don't fit).
    #[arg(long, default_value_t = 16)]
    pub line_len: usize,

    /// End lines with `\r\n` instead of `\n`.
    #[arg(long)]
    pub crlf: bool,

    /// Length of the measured window (in `connect` mode: the time limit).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub secs: Duration,

    /// Traffic before the measured window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// How long replies still outstanding at the end may take before they
    /// count as missing.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,

    /// How long one connect may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Threads, each with its own poll and a share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Source addresses 127.0.0.1..=127.0.0.K to spread connections over
    /// [default: ceil(conns / 20000), on a 127.0.0.0/8 target].
    #[arg(long)]
    pub sources: Option<usize>,

    /// Always bind explicit source addresses (at least two unless --sources).
    #[arg(long)]
    pub spread: bool,

    /// The server's process id: report its CPU per reply, memory per
    /// connection and (idle mode) wake-ups per second.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Print one JSON object to stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Write the reply latency distribution (rate mode: the corrected one)
    /// to FILE in HdrHistogram's percentile-distribution format
    /// (milliseconds), for the usual HdrHistogram plotter.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<std::path::PathBuf>,

    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Longest duration accepted for any duration option: one day.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// Parses a duration the way the server does (`500ms`, `2s`, `1m 30s`,
/// humantime's syntax); a plain number is seconds, fractions allowed
/// (`0.5`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Duration::try_from_secs_f64(v).ok(),
        Ok(_) => None,
        Err(_) => Some(humantime::parse_duration(s).map_err(|e| {
            format!(
                "`{s}` is not a duration ({e}): write seconds (`2`, `0.5`) or `500ms`, `2s`, `1m`"
            )
        })?),
    };
    match d {
        Some(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!(
            "`{s}`: a duration must be between 0 and {}",
            humantime::format_duration(MAX_DURATION)
        )),
    }
}

/// Parses a byte size the way the server does: `65536`, `64KiB`, `1MiB`,
/// `1GiB` (`K`, `KB`, ... also mean binary multiples).
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 65536, 64KiB, 1MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Highest --rate accepted, lines/s: far above what one load process can
/// send, so only typos are refused.
const MAX_RATE: f64 = 100_000_000.0;

/// Largest line accepted: the server's default --max-line.
pub const MAX_LINE_LEN: usize = 65_536;

impl Cli {
    /// Checks the combinations clap can't; on failure prints the message
    /// with usage and exits with status 2.
    pub fn validate(&self) {
        if let Err(msg) = self.check() {
            Cli::command()
                .error(clap::error::ErrorKind::ValueValidation, msg)
                .exit();
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.conns == 0 {
            return Err("--conns must be at least 1".into());
        }
        if self.conns > u32::MAX as usize {
            return Err("--conns is too large".into());
        }
        if self.depth == 0 {
            return Err("--depth must be at least 1".into());
        }
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if self.threads == 0 || self.threads > 256 {
            return Err("--threads must be 1..=256".into());
        }
        let min_len = if self.crlf { 2 } else { 1 };
        if self.line_len < min_len || self.line_len > MAX_LINE_LEN {
            return Err(format!("--line-len must be {min_len}..={MAX_LINE_LEN}"));
        }
        if self.connect_timeout.is_zero() {
            return Err("--connect-timeout must be above 0".into());
        }
        if self.mode != Mode::Connect && self.secs.is_zero() {
            return Err("--secs must be above 0".into());
        }
        if self.mode == Mode::Soak && (self.max_line == 0 || self.max_pending_output == 0) {
            return Err("--max-line and --max-pending-output must be above 0".into());
        }
        if self.slo.is_some() && self.mode != Mode::Rate {
            return Err("--slo is for --mode rate (the search starts at --rate)".into());
        }
        match (self.mode, self.rate) {
            (Mode::Rate, None) => return Err("--mode rate needs --rate LINES_PER_SEC".into()),
            (Mode::Rate, Some(r)) if !(r.is_finite() && r > 0.0 && r <= MAX_RATE) => {
                return Err(format!("--rate must be above 0 and at most {MAX_RATE}"));
            }
            (Mode::Rate, _) => {}
            (_, Some(_)) => return Err("--rate is for --mode rate".into()),
            (_, None) => {}
        }
        Ok(())
    }

    /// Reports an argument that is valid alone but impossible here (open
    /// file limit, source addresses), exit status 2.
    pub fn fail(msg: String) -> ! {
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_humantime() {
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("nan").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("2d").is_err());
    }

    #[test]
    fn sizes_read_like_the_servers() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn rate_goes_with_rate_mode() {
        let check = |args: &[&str]| Cli::parse_from([&["echoloop-load"], args].concat()).check();
        assert!(check(&["--mode", "rate", "--rate", "100"]).is_ok());
        assert!(check(&["--mode", "rate"]).is_err());
        assert!(check(&["--mode", "rate", "--rate", "0"]).is_err());
        assert!(check(&["--rate", "100"]).is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_validate() {
        let cli = Cli::parse_from(["echoloop-load"]);
        assert!(cli.check().is_ok());
        let cli = Cli::parse_from(["echoloop-load", "--depth", "0"]);
        assert!(cli.check().is_err());
    }
}
