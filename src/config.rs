//! The command line and every limit the server enforces, with its default.
//!
//! [`Cli`] is what clap parses (so `--help` lists every option with its
//! default); [`Config`] is the plain data the loops read, shared between
//! them behind an `Arc` and never written after start-up. Sizes are written
//! `65536`, `64KiB` or `1MiB`; durations `250ms`, `10s`, `2m`, and `0`
//! switches a timeout off where the option says so.

use crate::line::Mode;
use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

/// A TCP line-echo daemon: `you said: <line>!` for every line, or the plain
/// echo with `--raw`.
#[derive(Parser, Debug, Clone)]
#[command(name = "echoloop", version, about, long_about = None)]
pub struct Cli {
    /// Address to listen on (repeatable; IPv6 too, e.g. `[::1]:1234`).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:1234")]
    pub listen: Vec<SocketAddr>,

    /// Echo each line exactly as it arrived instead of `you said: <line>!`.
    #[arg(long)]
    pub raw: bool,

    /// Longest line content accepted; a longer line gets an error and a close.
    #[arg(long, value_name = "SIZE", default_value = "65536", value_parser = parse_size)]
    pub max_line: usize,

    /// Close a connection that completes no line for this long (`0` = never).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Unsent replies per connection at which reading it pauses (resumes below half).
    #[arg(long, value_name = "SIZE", default_value = "256KiB", value_parser = parse_size)]
    pub max_pending_output: usize,

    /// Live connections per process before new ones get `error: server busy`
    /// [default: the open-file limit minus what the process needs itself, 59 with one loop].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Event loops, each on its own thread and SO_REUSEPORT listener (`0` = one per core).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,

    /// On SIGINT/SIGTERM, how long to wait for clients to take their replies.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Serve Prometheus metrics at `GET /metrics` on this address [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Require a PROXY protocol v1 or v2 header on every connection (behind HAProxy or nginx).
    #[arg(long)]
    pub proxy_protocol: bool,

    /// How long a connection may take to send its whole PROXY header.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_positive_duration)]
    pub proxy_header_timeout: Duration,

    /// Log level: error, warn, info, debug, trace [default: $RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

/// What the event loops need to know, derived from [`Cli`] once at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// How lines are answered.
    pub mode: Mode,
    /// Event loops to run (`--threads`, with 0 resolved to the core count).
    pub threads: usize,
    /// Longest accepted line content, in bytes.
    pub max_line: usize,
    /// Idle timeout; `None` when switched off.
    pub idle_timeout: Option<Duration>,
    /// Unsent reply bytes at which a connection stops being read.
    pub max_pending_output: usize,
    /// Live connections allowed in the whole process.
    pub max_connections: usize,
    /// Bound on the graceful part of a shutdown.
    pub shutdown_timeout: Duration,
    /// Input read from one connection per turn of the loop (fairness).
    pub read_budget: usize,
    /// How long an error-closing connection may keep sending before close.
    pub linger_time: Duration,
    /// How much input an error-closing connection may send before close.
    pub linger_bytes: usize,
    /// At shutdown, how much input already sent by a client is still read
    /// and answered.
    pub shutdown_read_limit: usize,
    /// With `--proxy-protocol`: the deadline for the whole header.
    pub proxy_header_timeout: Option<Duration>,
    /// The deadline for a whole `/metrics` request.
    pub request_timeout: Duration,
}

/// Input served to one connection per turn (Redis reads 16 KiB per event,
/// Netty 16 reads; 64 KiB keeps a firehose fast and its neighbours served).
pub const READ_BUDGET: usize = 64 * 1024;
/// SPEC §1: discard input for at most 2 s or 64 KiB after an error line.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// See [`LINGER_TIME`].
pub const LINGER_BYTES: usize = 64 * 1024;
/// At shutdown, input a client had already sent is read and answered up to
/// this much (SPEC §3: replies to the complete lines it already sent).
pub const SHUTDOWN_READ_LIMIT: usize = 1 << 20;
/// A metrics client must send its whole request within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Per loop, clients turned away as busy that may linger until they have
/// read their error line; more are closed right after one write.
pub const MAX_LINGERING_BUSY: usize = 8;
/// Per loop, metrics clients served at once; more are closed at once.
pub const MAX_METRICS_CONNS: usize = 8;
/// Descriptors kept free so that a busy reply can still be accepted (Redis
/// reserves 32).
pub const FD_RESERVE: usize = 32;

impl Config {
    /// Derives the loop configuration; `fd_limit` is the effective
    /// `RLIMIT_NOFILE`, used for the default connection cap.
    pub fn from_cli(cli: &Cli, fd_limit: u64) -> Config {
        let threads = match cli.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // Per loop: its listeners, its poll and its waker; then stdio, the
        // signal pipe and the reserve for busy replies.
        let per_loop = cli.listen.len()
            + usize::from(cli.metrics.is_some())
            + 2
            + MAX_LINGERING_BUSY
            + MAX_METRICS_CONNS;
        let fixed = threads * per_loop + FD_RESERVE + 8;
        let derived = (fd_limit as usize).saturating_sub(fixed).max(1);
        Config {
            mode: if cli.raw { Mode::Raw } else { Mode::Prefix },
            threads,
            max_line: cli.max_line,
            idle_timeout: (!cli.idle_timeout.is_zero()).then_some(cli.idle_timeout),
            max_pending_output: cli.max_pending_output.max(1),
            max_connections: cli.max_connections.unwrap_or(derived),
            shutdown_timeout: cli.shutdown_timeout,
            read_budget: READ_BUDGET,
            linger_time: LINGER_TIME,
            linger_bytes: LINGER_BYTES,
            shutdown_read_limit: SHUTDOWN_READ_LIMIT,
            proxy_header_timeout: cli.proxy_protocol.then_some(cli.proxy_header_timeout),
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// The timer wheel's unit: 1/50 of the idle timeout, between 1 ms and
    /// 200 ms. The loop wakes at most once per unit while connections exist
    /// (5 times a second at the default 10 s), and an idle close is late by
    /// at most one unit (2 %).
    pub fn timer_tick(&self) -> Duration {
        let base = self.idle_timeout.unwrap_or(Duration::from_secs(10)) / 50;
        base.clamp(Duration::from_millis(1), Duration::from_millis(200))
    }
}

impl Default for Config {
    fn default() -> Self {
        let cli = Cli::parse_from(["echoloop"]);
        Config::from_cli(&cli, 1024)
    }
}

/// Parses a byte size: `65536`, `64KiB`, `1MiB`, `1GiB` (also `K`, `KB`…
/// as binary multiples, the way operators write them in Redis configs).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 65536, 64KiB, 1MiB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Parses a duration: `250ms`, `10s`, `2m`, or a bare `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration (e.g. 250ms, 10s, 2m): {e}"))
}

/// Parses a duration that must not be zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("`{s}`: must be longer than zero")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::default();
        assert_eq!(c.mode, Mode::Prefix);
        assert_eq!(c.max_line, 65536);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.max_pending_output, 256 * 1024);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.timer_tick(), Duration::from_millis(200));
    }
}
