//! The command line and every limit the server enforces, with its default.
//!
//! [`Cli`] is what clap parses (so `--help` lists every option with its
//! default); [`Config`] is the plain data the loops read, shared between
//! them behind an `Arc` and never written after start-up. Sizes are written
//! `65536`, `64KiB` or `1MiB`; durations `250ms`, `10s`, `2m`, and `0`
//! switches a timeout off where the option says so.
//!
//! Values that parse but cannot work are judged here too, once the
//! descriptor limit is known ([`Config::from_cli`]): too many loops for the
//! limit is refused, a connection cap above what the limit allows is
//! lowered with a warning. [`log_filter`] decides between `--log-level` and
//! `RUST_LOG`.

use crate::line::Mode;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use log::LevelFilter;
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// [default: the open-file limit minus the descriptors the server keeps
    /// for itself (59 with one loop and one listener)].
    #[arg(long, value_name = "N", value_parser = parse_cap)]
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

    /// Write the serving process's pid here once it serves (rewritten by
    /// the new process after a live upgrade; removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// On SIGUSR2 (live upgrade), how long the new binary may take to be
    /// ready before the old process gives up and serves on.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    pub upgrade_timeout: Duration,

    /// Log level [default: $RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL", value_parser = level_parser())]
    pub log_level: Option<LevelFilter>,

    /// Whether `--listen` was given on the command line (not defaulted):
    /// under socket activation it is ignored, and that deserves a warning.
    #[arg(skip)]
    pub listen_given: bool,
}

/// The words `--log-level` and `RUST_LOG` accept as a level.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `--log-level`: one of [`LEVELS`], which clap lists in `--help` and in
/// the error for any other word.
fn level_parser() -> impl clap::builder::TypedValueParser<Value = LevelFilter> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(LEVELS).map(|level| {
        level
            .parse::<LevelFilter>()
            .expect("every listed level parses")
    })
}

impl Cli {
    /// Parses the process's arguments; on bad ones prints clap's message
    /// and exits with status 2.
    pub fn from_args() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.listen_given = matches.value_source("listen") == Some(ValueSource::CommandLine);
        cli
    }
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
/// Descriptors of the process outside any loop: stdin, stdout, stderr, the
/// signal pipe and the main thread's poll and waker, with room to spare (a
/// live upgrade's socket pair and the pipe `spawn` uses fit in it), plus
/// [`FD_RESERVE`].
pub const FIXED_DESCRIPTORS: usize = FD_RESERVE + 8;
/// The most event loops `--threads` accepts; more than there are CPUs only
/// take turns, and machines with more than this many CPUs are rare.
pub const MAX_THREADS: usize = 1024;

impl Config {
    /// Derives the loop configuration from the command line, the effective
    /// `RLIMIT_NOFILE` and the number of CPUs (for `--threads 0`).
    ///
    /// Refuses (`Err`, a message saying what would be accepted) more loops
    /// than the descriptor limit can hold, or than [`MAX_THREADS`]; more
    /// loops than CPUs is allowed with a warning (tests run two loops on
    /// one core). A
    /// `--max-connections` above what the limit allows is lowered to it,
    /// with a warning: the cap and the limit are often set in different
    /// places (a unit's `LimitNOFILE=`, a container's ulimit), and a server
    /// that serves what it really can, saying so, is better than one that
    /// does not start, or one that promises connections it would meet with
    /// `EMFILE` instead of `error: server busy`. Redis does the same.
    pub fn from_cli(cli: &Cli, fd_limit: u64, cpus: usize) -> Result<Derived, String> {
        let threads = match cli.threads {
            0 => cpus.max(1),
            n => n,
        };
        let fd_limit = usize::try_from(fd_limit).unwrap_or(usize::MAX);
        let per_loop = descriptors_per_loop(cli);
        let allowed = (fd_limit.saturating_sub(FIXED_DESCRIPTORS + 1) / per_loop).min(MAX_THREADS);
        if threads > allowed {
            return Err(format!(
                "--threads {threads}: at most {allowed} loop(s) here: each needs {per_loop} \
                 descriptors of the open-file limit of {fd_limit}, and {MAX_THREADS} is the \
                 ceiling (raise the limit with `ulimit -n`, or LimitNOFILE= under systemd; \
                 --threads 0 runs one loop per CPU, {cpus} here)"
            ));
        }
        let room = fd_limit - threads * per_loop - FIXED_DESCRIPTORS;
        let mut warnings = Vec::new();
        let max_connections = match cli.max_connections {
            None => room,
            Some(asked) if asked > room => {
                warnings.push(format!(
                    "--max-connections {asked} is more than the open-file limit of \
                     {fd_limit} allows with {threads} loop(s): serving at most {room} \
                     (raise the limit with `ulimit -n`, or LimitNOFILE= under systemd)"
                ));
                room
            }
            Some(asked) => asked,
        };
        if threads > cpus {
            warnings.push(format!(
                "{threads} loops on {cpus} CPU(s): loops beyond one per CPU only take turns"
            ));
        }
        let config = Config {
            mode: if cli.raw { Mode::Raw } else { Mode::Prefix },
            threads,
            max_line: cli.max_line,
            idle_timeout: (!cli.idle_timeout.is_zero()).then_some(cli.idle_timeout),
            max_pending_output: cli.max_pending_output.max(1),
            max_connections,
            shutdown_timeout: cli.shutdown_timeout,
            read_budget: READ_BUDGET,
            linger_time: LINGER_TIME,
            linger_bytes: LINGER_BYTES,
            shutdown_read_limit: SHUTDOWN_READ_LIMIT,
            proxy_header_timeout: cli.proxy_protocol.then_some(cli.proxy_header_timeout),
            request_timeout: REQUEST_TIMEOUT,
        };
        Ok(Derived { config, warnings })
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
        Config::from_cli(&cli, 1024, 1)
            .expect("the defaults fit 1024 descriptors")
            .config
    }
}

/// A [`Config`] and what the operator should be told about how it was
/// derived (logged as warnings once the logger runs).
#[derive(Debug, Clone)]
pub struct Derived {
    /// What the loops run with.
    pub config: Config,
    /// Values that were adjusted, or are legal but unwise.
    pub warnings: Vec<String>,
}

/// Descriptors each loop holds besides its connections: its listeners
/// (echo and metrics), its poll and its waker, and room for the busy
/// clients and metrics scrapes it serves at once.
fn descriptors_per_loop(cli: &Cli) -> usize {
    cli.listen.len()
        + usize::from(cli.metrics.is_some())
        + 2
        + MAX_LINGERING_BUSY
        + MAX_METRICS_CONNS
}

/// The filter spec for the logger, from `--log-level` (which wins) or
/// `RUST_LOG`, else `info`; and a warning when `RUST_LOG` was ignored.
///
/// `RUST_LOG` is ignored when it does not parse, or when it would let no
/// echoloop line through without saying so: `RUST_LOG=bogus` reads as
/// "only the module `bogus`, at every level", which silences the server.
/// `off`, or a spec naming `echoloop`, is taken as meant.
pub fn log_filter(
    log_level: Option<LevelFilter>,
    rust_log: Option<&str>,
) -> (String, Option<String>) {
    let fallback = "info".to_owned();
    if let Some(level) = log_level {
        return (level.to_string().to_ascii_lowercase(), None);
    }
    let Some(spec) = rust_log.map(str::trim).filter(|s| !s.is_empty()) else {
        return (fallback, None);
    };
    let levels = LEVELS.join(", ");
    let mut builder = env_filter::Builder::new();
    if let Err(e) = builder.try_parse(spec) {
        return (
            fallback,
            Some(format!(
                "ignoring RUST_LOG={spec}: {e} (a level is one of {levels}, e.g. RUST_LOG=debug \
                 or RUST_LOG=echoloop=debug); logging at info"
            )),
        );
    }
    let filter = builder.build();
    let ours = log::Metadata::builder()
        .level(log::Level::Error)
        .target("echoloop")
        .build();
    // The directives are before any `/regex`; each is `module[=level]`.
    let directives = spec.split('/').next().unwrap_or("");
    let names_us = directives
        .split(',')
        .any(|d| d.trim().starts_with("echoloop"));
    if filter.enabled(&ours) || filter.filter() == LevelFilter::Off || names_us {
        return (spec.to_owned(), None);
    }
    (
        fallback,
        Some(format!(
            "ignoring RUST_LOG={spec}: it is no level ({levels}) and names no echoloop \
             module, so it would hide every line; logging at info"
        )),
    )
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
        .filter(|&n| n <= MAX_SIZE)
        .ok_or_else(|| format!("size `{s}` is too large (at most 1GiB)"))
}

/// The largest `--max-line` or `--max-pending-output`: a connection's
/// buffers then stay far below 4 GiB (a live upgrade hands each over with
/// a 32-bit length).
pub const MAX_SIZE: usize = 1 << 30;

/// Parses `--max-connections`: a count of at least 1.
pub fn parse_cap(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(
            "0 would turn every client away: give at least 1 (or leave the option out \
                      for the default, derived from the open-file limit)"
                .to_owned(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "`{s}` is not a connection count (a whole number, at least 1)"
        )),
    }
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
        assert_eq!(parse_size("1GiB"), Ok(MAX_SIZE));
        assert!(parse_size("1025MiB").is_err());
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

    fn derive(args: &[&str], fd_limit: u64, cpus: usize) -> Result<Derived, String> {
        let mut argv = vec!["echoloop"];
        argv.extend_from_slice(args);
        Config::from_cli(&Cli::parse_from(argv), fd_limit, cpus)
    }

    #[test]
    fn the_default_cap_is_the_limit_minus_what_the_server_keeps() {
        let d = derive(&[], 20_000, 2).unwrap();
        assert_eq!(d.config.max_connections, 20_000 - 59);
        assert!(d.warnings.is_empty());
        let d = derive(&["--metrics", "127.0.0.1:0", "--threads", "2"], 20_000, 2).unwrap();
        assert_eq!(d.config.max_connections, 20_000 - 2 * 20 - 40);
    }

    #[test]
    fn a_cap_above_the_limit_is_lowered_with_a_warning() {
        let d = derive(&["--max-connections", "100000"], 20_000, 2).unwrap();
        assert_eq!(d.config.max_connections, 19_941);
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].contains("100000"), "{:?}", d.warnings);
        assert!(d.warnings[0].contains("19941"), "{:?}", d.warnings);
        let d = derive(&["--max-connections", "19941"], 20_000, 2).unwrap();
        assert_eq!(d.config.max_connections, 19_941);
        assert!(d.warnings.is_empty());
    }

    #[test]
    fn too_many_loops_are_refused_saying_how_many_fit() {
        // (100 - 41) / 19 = 3 loops fit in 100 descriptors.
        assert!(derive(&["--threads", "3"], 100, 4).is_ok());
        let err = derive(&["--threads", "4"], 100, 4).unwrap_err();
        assert!(err.contains("at most 3 loop(s)"), "{err}");
        let err = derive(&["--threads", "100000"], 1 << 30, 4).unwrap_err();
        assert!(err.contains("at most 1024 loop(s)"), "{err}");
        assert!(derive(&["--threads", "0"], 100, 64).is_err());
        assert_eq!(
            derive(&["--threads", "0"], 100, 2).unwrap().config.threads,
            2
        );
    }

    #[test]
    fn more_loops_than_cpus_is_a_warning() {
        let d = derive(&["--threads", "2"], 20_000, 1).unwrap();
        assert_eq!(d.config.threads, 2);
        assert!(
            d.warnings[0].contains("2 loops on 1 CPU"),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn a_cap_of_zero_is_refused() {
        assert!(parse_cap("0").unwrap_err().contains("at least 1"));
        assert!(parse_cap("many").is_err());
        assert_eq!(parse_cap("3"), Ok(3));
    }

    #[test]
    fn log_level_wins_over_rust_log() {
        assert_eq!(
            log_filter(Some(LevelFilter::Debug), Some("bogus")),
            ("debug".to_owned(), None)
        );
        assert_eq!(log_filter(None, None), ("info".to_owned(), None));
        assert_eq!(log_filter(None, Some(" ")), ("info".to_owned(), None));
    }

    #[test]
    fn rust_log_is_taken_when_it_lets_echoloop_speak_or_says_off() {
        for spec in [
            "debug",
            "warn,mio=trace",
            "echoloop=debug",
            "echoloop::conn=trace",
            "off",
            "echoloop=off",
        ] {
            assert_eq!(
                log_filter(None, Some(spec)),
                (spec.to_owned(), None),
                "{spec}"
            );
        }
    }

    #[test]
    fn a_rust_log_that_would_hide_everything_is_ignored_with_a_warning() {
        for spec in [
            "bogus",
            "mio=debug",
            "echoloop=loud",
            "a/b/c",
            "bogus/echoloop",
        ] {
            let (filter, warning) = log_filter(None, Some(spec));
            assert_eq!(filter, "info", "{spec}");
            let warning = warning.unwrap_or_else(|| panic!("no warning for {spec}"));
            assert!(warning.contains(&format!("RUST_LOG={spec}")), "{warning}");
            assert!(
                warning.contains("off, error, warn, info, debug, trace"),
                "{warning}"
            );
        }
    }
}
