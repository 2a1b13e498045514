//! The c10k benchmark: echoloop beside two tokio peers, under the same load.
//!
//! `cargo bench --bench c10k` (harness = false) does, in order:
//!
//! 1. builds the servers and the load generator in release mode
//!    (`cargo build --release -p echoloop -p echoloop-load --bins --examples`);
//! 2. checks that nothing else is using the CPU: waits (at most 90 s) for
//!    the cores to be idle and the load average raised by the build to
//!    fall, then warns if `/proc/loadavg` still says more than 0.5;
//! 3. for each round, for each scenario, for each server in turn (echoloop,
//!    tokio-idiomatic, tokio-tuned, so that the machine's noise hits all of
//!    them alike): starts a fresh server process pinned to core 0, runs
//!    `echoloop-load --json --quiet --server-pid PID` pinned to core 1 against
//!    it, and stops the server;
//! 4. prints one table of medians over the rounds, with the ratio
//!    echoloop/peer for the server-CPU figures and each target
//!    marked met or missed, and writes it to `BENCHMARKS.md` with the
//!    machine, the date and the command, plus `benches/latency.svg`, a chart
//!    of the latency percentiles.
//!
//! A hand-written `benches/c10k-analysis.md`, when present, is copied into
//! `BENCHMARKS.md` under "Analysis", followed by the hand-written
//! `benches/idle-analysis.md` and `benches/open-loop-analysis.md`.
//!
//! After the rounds, two sections run against echoloop alone:
//!
//! - a short soak (`echoloop-load --mode soak`: good ping-pong clients among
//!   abusive ones, the server's memory, descriptors and idle CPU checked);
//! - the live upgrade: for each round, two load shapes at 10,000
//!   connections (open loop at 20,000 lines/s, and ping-pong), each run once
//!   without and then once with a SIGUSR2 in the middle of a 6 s window,
//!   each against a fresh echoloop copied to a temp dir and started with
//!   `--pid-file`. It reports the reply latency (p99, p99.9, max) without,
//!   with and the difference, the old process's `the loops were frozen for`
//!   figure and the time from the signal to its hand-over line, as
//!   "Live upgrade at 10,000 connections" in `BENCHMARKS.md`.
//!
//! Environment: `C10K_ROUNDS` (default 3, at least 2; the live upgrade runs
//! as many rounds), `C10K_SECS` (seconds of each measured window of the
//! rounds, default 4), `C10K_SOAK_SECS` (default 60, `0` skips the soak),
//! `C10K_SOAK_CONNS` (good clients, default 2,000) and `C10K_ONLY` (a
//! comma-separated list of kinds among `pingpong`, `pipeline`, `connect`,
//! `idle`, `rate`, `soak` and `upgrade`, e.g. `rate,soak`: run only those,
//! print the tables, leave `BENCHMARKS.md` alone). The exit status is
//! non-zero when the load generator counted any reply error against any
//! server, the soak found a broken promise, or a live-upgrade run had an
//! error (the load generator's, or a hand-over that did not complete).
//!
//! Every process started here is owned by a [`Proc`] guard that kills it by
//! PID when dropped, panics included; a process that took over in a live
//! upgrade is not our child, and is killed by the PID its pid file named
//! (see [`UpgradableServer`]). Each server listens on a fresh
//! loopback address (127.0.0.2, 127.0.0.3, ...), so the TIME_WAIT sockets
//! that one run leaves behind never collide with the next run's
//! connections. All traffic stays on 127.0.0.0/8.

use echoloop_load::procfs;
use plotters::prelude::*;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A server under test: its name in the table and its binary under
/// `target/release`.
struct Server {
    name: &'static str,
    binary: &'static str,
}

/// The servers, in the order each round runs them.
const SERVERS: [Server; 3] = [
    Server {
        name: "echoloop",
        binary: "echoloop",
    },
    Server {
        name: "tokio-idiomatic",
        binary: "examples/tokio_idiomatic",
    },
    Server {
        name: "tokio-tuned",
        binary: "examples/tokio_tuned",
    },
];
const ECHOLOOP: usize = 0;
const IDIOMATIC: usize = 1;
const TUNED: usize = 2;

/// What the load generator does in one scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    PingPong,
    Pipeline,
    Connect,
    Idle,
    /// Open loop (`--mode rate`): latency corrected for coordinated omission.
    Rate,
}

/// One load scenario: a name and the load generator's arguments.
struct Scenario {
    name: &'static str,
    kind: Kind,
    args: &'static [&'static str],
}

/// The scenarios, all with the default prefix protocol.
const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "ping-pong 100",
        kind: Kind::PingPong,
        args: &["--mode", "pingpong", "--conns", "100"],
    },
    Scenario {
        name: "ping-pong 10,000",
        kind: Kind::PingPong,
        args: &["--mode", "pingpong", "--conns", "10000"],
    },
    Scenario {
        name: "pipeline 16 × 100",
        kind: Kind::Pipeline,
        args: &["--mode", "pipeline", "--depth", "16", "--conns", "100"],
    },
    Scenario {
        name: "connect 10,000",
        kind: Kind::Connect,
        args: &[
            "--mode",
            "connect",
            "--conns",
            "10000",
            "--concurrency",
            "100",
        ],
    },
    Scenario {
        name: "idle 10,000",
        kind: Kind::Idle,
        args: &["--mode", "idle", "--conns", "10000", "--hold", "5"],
    },
    // The rate is below every server's saturation: about half the slowest
    // server's ping-pong 10,000 maximum measured here (tokio-idiomatic,
    // 111,603 replies/s), so the latency is service, not queueing.
    Scenario {
        name: "open loop 10,000 @ 50,000/s",
        kind: Kind::Rate,
        args: &["--mode", "rate", "--rate", "50000", "--conns", "10000"],
    },
];

/// The short soak run against echoloop alone after the rounds: its good
/// clients (`C10K_SOAK_CONNS`) and seconds (`C10K_SOAK_SECS`, 0 = none).
const SOAK_CONNS: u64 = 2000;
const SOAK_SECS: u64 = 60;

/// Seconds the connect scenario may take at most (it needs about one).
const CONNECT_TIME_LIMIT: &str = "60";
/// Pause after each run, for the sockets it closed to settle.
const PAUSE: Duration = Duration::from_secs(1);
/// How long a server may take to print its `Echoing on ADDR` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Load average (1 min) above which the machine counts as busy.
const BUSY_LOAD: f64 = 0.5;
/// How long to wait at most for the load average to fall after the build.
const SETTLE: Duration = Duration::from_secs(90);
/// Share of all cores' time (%) under which the machine counts as idle.
const IDLE_BUSY_PCT: f64 = 10.0;

/// The figures of one load generator run (from its JSON report).
#[derive(Clone, Default)]
struct Sample {
    replies_per_sec: f64,
    /// Reply latency in µs: p50, p99, p99.9 (rate mode: from the due time).
    latency: [f64; 3],
    /// Reply latency max in µs.
    latency_max: f64,
    /// Rate mode: p99 latency from the send time, µs.
    uncorrected_p99: Option<f64>,
    /// Rate mode: p99 of how late the load generator's sends were, µs.
    lateness_p99: Option<f64>,
    connects_per_sec: f64,
    /// Connect latency in µs: p50, p99, p99.9.
    connect_latency: [f64; 3],
    cpu_us_per_reply: Option<f64>,
    cpu_us_per_conn: Option<f64>,
    rss_growth_per_conn: Option<f64>,
    wakeups_per_sec: Option<f64>,
    /// The load generator's CPU time over its whole run (connecting,
    /// warm-up, window, grace) divided by that run's wall time: near 100%
    /// means the generator, not the server, may be the bottleneck.
    load_busy_pct: Option<f64>,
    errors: u64,
    /// The non-zero error counters, `name=count`, for the report.
    error_detail: String,
}

/// A child process that is killed (by its PID) and reaped when dropped.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How processes are pinned to cores.
struct Pinning {
    /// `taskset` is there and the machine has at least two cores.
    enabled: bool,
}

impl Pinning {
    fn detect() -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let taskset = Command::new("taskset")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Pinning {
            enabled: cores >= 2 && taskset,
        }
    }

    /// A command running `program` on `core` when pinning is enabled.
    fn command(&self, core: u32, program: &Path) -> Command {
        if self.enabled {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(core.to_string()).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }
}

/// Where cargo puts its build output.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// Builds the servers and the load generator with the cargo running us.
fn build() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "echoloop",
            "-p",
            "echoloop-load",
        ])
        .args(["--bins", "--examples"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build failed: {status}");
}

/// Starts `server` on `listen`, pinned to core 0, and waits for its
/// `Echoing on ADDR` line. Returns the guard and the address.
fn start_server(server: &Server, listen: &str, pinning: &Pinning) -> (Proc, String) {
    let path = target_dir().join("release").join(server.binary);
    let mut cmd = pinning.command(0, &path);
    cmd.args(["--listen", listen]).stderr(Stdio::null());
    spawn_announced(cmd, server.name)
}

/// Starts `cmd` (a server, with its stderr already set up) and waits for
/// its `Echoing on ADDR` line. Returns the guard and the address.
fn spawn_announced(mut cmd: Command, name: &str) -> (Proc, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut proc = Proc {
        child: cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}")),
    };
    let stdout = proc.child.stdout.take().expect("piped stdout");
    // A blocking read has no timeout: read on a thread, wait on a channel.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(STARTUP_TIMEOUT)
        .unwrap_or_else(|_| panic!("{name} printed no `Echoing on` line"));
    let addr = line
        .trim()
        .strip_prefix("Echoing on ")
        .unwrap_or_else(|| panic!("{name}: unexpected first line {line:?}"))
        .to_string();
    (proc, addr)
}

/// Runs the load generator, pinned to core 1, against `addr` and returns
/// its parsed report.
fn run_load(scenario: &Scenario, addr: &str, pid: u32, secs: &str, pinning: &Pinning) -> Sample {
    let window = if scenario.kind == Kind::Connect {
        CONNECT_TIME_LIMIT
    } else {
        secs
    };
    let pid = pid.to_string();
    let mut args = vec!["--server-pid", pid.as_str()];
    args.extend(["--target", addr, "--secs", window, "--warmup", "1"]);
    args.extend_from_slice(scenario.args);
    let limit = Duration::from_secs(window.parse::<u64>().unwrap_or(60) + 60);
    let (report, status, err, busy) = load_json(&args, limit, pinning);
    let mut sample = parse_report(&report);
    sample.load_busy_pct = Some(busy * 100.0);
    if !status.success() && sample.errors == 0 {
        // A failure the counters do not show still counts as an error.
        sample.errors = 1;
        sample.error_detail = format!("exit {status}: {}", err.trim());
    }
    sample
}

/// Runs `echoloop-load --json --quiet ARGS` pinned to core 1 and waits for
/// it (at most `limit`); returns its report, exit status, stderr and its
/// CPU over its wall time (1.0 = one core).
fn load_json(
    args: &[&str],
    limit: Duration,
    pinning: &Pinning,
) -> (Value, std::process::ExitStatus, String, f64) {
    let path = target_dir().join("release").join("echoloop-load");
    let mut cmd = pinning.command(1, &path);
    cmd.args(["--json", "--quiet"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cpu_before = children_cpu_secs();
    let mut load = Proc {
        child: cmd.spawn().expect("start echoloop-load"),
    };
    // The load generator stops by itself; `limit` only guards a hang.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = load.child.try_wait().expect("wait for echoloop-load") {
            break status;
        }
        assert!(
            started.elapsed() < limit,
            "echoloop-load ran past {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    let _ = load
        .child
        .stdout
        .take()
        .map(|mut s| s.read_to_string(&mut out));
    let _ = load
        .child
        .stderr
        .take()
        .map(|mut s| s.read_to_string(&mut err));
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!("echoloop-load ({status}) gave no JSON report: {e}\nstdout: {out}\nstderr: {err}")
    });
    // The load generator is the only child reaped since `cpu_before`.
    let busy = (children_cpu_secs() - cpu_before) / started.elapsed().as_secs_f64();
    (report, status, err, busy)
}

/// The short soak against a fresh echoloop: its JSON report, or `None`
/// when `C10K_SOAK_SECS` is 0.
fn run_soak(pinning: &Pinning) -> Option<Value> {
    let secs = env_u64_or_zero("C10K_SOAK_SECS", SOAK_SECS);
    if secs == 0 {
        return None;
    }
    let conns = env_u64("C10K_SOAK_CONNS", SOAK_CONNS).to_string();
    let (proc, addr) = start_server(&SERVERS[ECHOLOOP], "127.0.0.250:0", pinning);
    let pid = proc.child.id().to_string();
    let secs_arg = secs.to_string();
    let args = [
        "--mode",
        "soak",
        "--conns",
        &conns,
        "--secs",
        &secs_arg,
        "--warmup",
        "1",
        "--server-pid",
        &pid,
        "--target",
        &addr,
    ];
    // Slowloris attempts last the idle timeout and more; then the checks.
    let limit = Duration::from_secs(secs + 90);
    let (report, status, err, _) = load_json(&args, limit, pinning);
    drop(proc);
    eprintln!(
        "soak {secs} s, {conns} good clients: {status} {}",
        err.trim()
    );
    Some(report)
}

// ----- live upgrade -----------------------------------------------------------

/// A load shape of the live-upgrade section: its name and the load
/// generator's arguments.
struct UpgradeShape {
    name: &'static str,
    args: &'static [&'static str],
    /// Open loop: lines per second in all (for the sentence under the table).
    rate: Option<u64>,
}

/// The live-upgrade section's load shapes, each run against echoloop
/// without and with a SIGUSR2 in its window.
const UPGRADE_SHAPES: [UpgradeShape; 2] = [
    // 20,000 lines/s is far from saturation: at 10,000 connections
    // echoloop answered 182,528 lines/s in closed loop, and at 50,000/s in
    // open loop it used under half a core (9.2 µs per reply) with a median
    // of 122 µs (BENCHMARKS.md). So without an upgrade the tail is service,
    // not queueing, and with one the lines queued while the loops are
    // frozen (20 per ms) drain in a few ms: what the upgrade adds shows on
    // its own, in full, in the corrected max.
    UpgradeShape {
        name: "open loop 10,000 @ 20,000/s",
        args: &["--mode", "rate", "--rate", "20000", "--conns", "10000"],
        rate: Some(20_000),
    },
    UpgradeShape {
        name: "ping-pong 10,000",
        args: &["--mode", "pingpong", "--conns", "10000"],
        rate: None,
    },
];
/// The connections of every shape (the server must hold them all before
/// the window, and hand them all over).
const UPGRADE_CONNS: usize = 10_000;
/// Seconds of each measured window: long enough for a hand-over signalled
/// at [`UPGRADE_SIGNAL_AT`] to be done well inside it.
const UPGRADE_SECS: u64 = 6;
/// The warm-up before the window (the load generator's `--warmup`).
const UPGRADE_WARMUP: Duration = Duration::from_secs(1);
/// When, from the start of the window, SIGUSR2 is sent.
const UPGRADE_SIGNAL_AT: Duration = Duration::from_secs(3);
/// The bound on every wait of an upgrade run: all the connections in, each
/// log line, the pid file, the old process's exit, the new one's death.
const UPGRADE_WAIT: Duration = Duration::from_secs(15);

/// One run of the live-upgrade section.
#[derive(Clone, Default)]
struct UpgradeRun {
    /// The load generator's figures; its errors include the bench's own
    /// checks of the hand-over that failed.
    load: Sample,
    /// Upgrade runs: the old process's `the loops were frozen for` figure.
    frozen: Option<Duration>,
    /// Upgrade runs: from SIGUSR2 to the old process's hand-over line.
    handover: Option<Duration>,
}

/// An echoloop started from its own copy of the binary, in a fresh
/// directory, with `--pid-file` there: SIGUSR2 makes it run that copy.
///
/// After an upgrade the serving process is not our child. When dropped,
/// every process the pid file named (other than the one we started, which
/// its [`Proc`] kills) is killed by PID if it still runs our copy of the
/// binary, and the directory is removed.
struct UpgradableServer {
    proc: Proc,
    addr: String,
    dir: tempfile::TempDir,
    pid_file: PathBuf,
    /// The server's descriptors before any client connected.
    base_fds: usize,
    /// Every line any of the processes wrote to stderr (the new process
    /// inherits the old one's), with when the bench read it.
    log: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Every pid the pid file named.
    named: Vec<u32>,
}

impl UpgradableServer {
    /// Copies echoloop to a temp dir and starts it there, pinned to core 0,
    /// on `listen` with `--pid-file` and the `info` log level.
    fn start(listen: &str, pinning: &Pinning) -> UpgradableServer {
        let dir = tempfile::Builder::new()
            .prefix("c10k-upgrade-")
            .tempdir()
            .expect("create a temp dir");
        let exe = dir.path().join("echoloop");
        let built = target_dir().join("release").join(SERVERS[ECHOLOOP].binary);
        // The copy keeps the mode; its descriptor is closed on return, so
        // no process runs it while it is open for writing.
        std::fs::copy(&built, &exe).expect("copy echoloop to the temp dir");
        let pid_file = dir.path().join("echoloop.pid");
        let mut cmd = pinning.command(0, &exe);
        cmd.args(["--listen", listen, "--log-level", "info", "--pid-file"])
            .arg(&pid_file)
            .stderr(Stdio::piped());
        let (mut proc, addr) = spawn_announced(cmd, "echoloop (upgradable)");
        let stderr = proc.child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        // Ends when every process holding the pipe (old and new) is gone.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        let mut server = UpgradableServer {
            proc,
            addr,
            dir,
            pid_file,
            base_fds: 0,
            log,
            named: Vec::new(),
        };
        let pid = server.proc.child.id();
        let named = wait_for(UPGRADE_WAIT, || server.read_pid_file() == Some(pid));
        assert!(named, "the pid file never named pid {pid}");
        server.base_fds = server.fds();
        server
    }

    /// The descriptors the process we started has open now.
    fn fds(&self) -> usize {
        let pid = self.proc.child.id();
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
    }

    /// The pid the pid file names now, remembered for the clean-up.
    fn read_pid_file(&mut self) -> Option<u32> {
        let text = std::fs::read_to_string(&self.pid_file).ok()?;
        let pid = text.strip_suffix('\n')?.parse().ok()?;
        if !self.named.contains(&pid) {
            self.named.push(pid);
        }
        Some(pid)
    }

    /// The first log message (without env_logger's `[time LEVEL target] `)
    /// that `parse` accepts, and when it was read.
    fn find_log<T>(&self, parse: impl Fn(&str) -> Option<T>) -> Option<(Instant, T)> {
        let log = self.log.lock().unwrap();
        log.iter().find_map(|(at, line)| {
            let msg = line.split_once("] ").map_or(line.as_str(), |(_, m)| m);
            Some((*at, parse(msg)?))
        })
    }

    /// The whole log on one line (` / ` between lines), for a failure's
    /// report.
    fn log_text(&self) -> String {
        let log = self.log.lock().unwrap();
        let lines: Vec<&str> = log.iter().map(|(_, l)| l.as_str()).collect();
        lines.join(" / ")
    }
}

impl Drop for UpgradableServer {
    fn drop(&mut self) {
        let _ = self.read_pid_file();
        let ours = self.proc.child.id();
        for &pid in self.named.iter().filter(|&&p| p != ours) {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
            if exe.is_ok_and(|exe| exe.starts_with(self.dir.path())) {
                signal(pid, libc::SIGKILL);
                // Not our child: whoever reaps it, it is gone once it is
                // no longer running.
                wait_for(UPGRADE_WAIT, || !running(pid));
            }
        }
    }
}

/// Sends `sig` to `pid` (our child, or a pid our pid file named).
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects on this process.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, s)| !s.starts_with('Z'))
    })
}

/// Polls `done` every 10 ms until it holds (true) or `within` has passed
/// (false).
fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `N listeners and M connections handed to pid P` → (M, P).
fn parse_handover(msg: &str) -> Option<(usize, u32)> {
    let (counts, pid) = msg
        .strip_prefix("upgrade: ")?
        .split_once(" handed to pid ")?;
    let conns = counts.split_once(" and ")?.1.split_once(' ')?.0;
    Some((conns.parse().ok()?, pid.parse().ok()?))
}

/// A `Duration`'s Debug text (`41.2ms`, `1.5s`, `812µs`, `90ns`) read back.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(value.parse::<f64>().ok()? * scale))
}

/// One run of the live-upgrade section: a fresh upgradable echoloop on
/// `listen`, the load generator against it, and (when `upgrade`) one
/// SIGUSR2 in the middle of the window.
fn run_upgrade(shape: &UpgradeShape, upgrade: bool, listen: &str, pinning: &Pinning) -> UpgradeRun {
    let mut server = UpgradableServer::start(listen, pinning);
    let secs = UPGRADE_SECS.to_string();
    let warmup = UPGRADE_WARMUP.as_secs().to_string();
    let addr = server.addr.clone();
    let mut args = vec!["--target", addr.as_str(), "--secs", &secs];
    args.extend(["--warmup", &warmup]);
    args.extend_from_slice(shape.args);
    let limit = Duration::from_secs(UPGRADE_SECS + 60);
    // The load generator runs on a thread while this one drives the upgrade.
    let (report, status, err, handed) = std::thread::scope(|s| {
        let load = s.spawn(|| load_json(&args, limit, pinning));
        let handed = drive_upgrade(&mut server, upgrade);
        let (report, status, err, _) = load.join().expect("the load generator's thread");
        (report, status, err, handed)
    });
    let mut run = UpgradeRun {
        load: parse_report(&report),
        ..UpgradeRun::default()
    };
    let mut failures = Vec::new();
    if !status.success() {
        failures.push(format!("echoloop-load {status}: {}", err.trim()));
    }
    match handed {
        Ok(Some((frozen, handover))) => {
            run.frozen = Some(frozen);
            run.handover = Some(handover);
            // The old process is our child: it must have exited, with 0.
            let old = &mut server.proc.child;
            let mut exit = None;
            wait_for(UPGRADE_WAIT, || {
                exit = old.try_wait().ok().flatten();
                exit.is_some()
            });
            if !exit.is_some_and(|e| e.success()) {
                failures.push(format!("the old process's exit: {exit:?}"));
            }
        }
        Ok(None) => {}
        Err(why) => failures.push(format!("{why}; log: {}", server.log_text())),
    }
    if !failures.is_empty() {
        run.load.errors += failures.len() as u64;
        let detail = &mut run.load.error_detail;
        *detail = [detail.clone(), failures.join("; ")]
            .join(" ")
            .trim()
            .to_string();
    }
    run
}

/// Waits for every connection to reach the server, then for the middle of
/// the measured window; with `upgrade`, sends SIGUSR2 there and waits for
/// the hand-over: the old process's line, the pid file naming the new
/// process, the frozen time. Returns (frozen time, SIGUSR2 → hand-over
/// line), or why the hand-over failed.
fn drive_upgrade(
    server: &mut UpgradableServer,
    upgrade: bool,
) -> Result<Option<(Duration, Duration)>, String> {
    let pid = server.proc.child.id();
    let all_in = server.base_fds + UPGRADE_CONNS;
    if !wait_for(UPGRADE_WAIT, || server.fds() >= all_in) {
        return Err(format!(
            "the server had {} connections, not {UPGRADE_CONNS}, after {UPGRADE_WAIT:?}",
            server.fds().saturating_sub(server.base_fds)
        ));
    }
    // The load generator's window begins its warm-up after its last connect.
    let window_end = Instant::now() + UPGRADE_WARMUP + Duration::from_secs(UPGRADE_SECS);
    std::thread::sleep(UPGRADE_WARMUP + UPGRADE_SIGNAL_AT);
    if !upgrade {
        return Ok(None);
    }
    let signalled = Instant::now();
    signal(pid, libc::SIGUSR2);
    let mut handed = None;
    wait_for(UPGRADE_WAIT, || {
        handed = server.find_log(parse_handover);
        handed.is_some()
    });
    let (handed_at, (conns, new_pid)) =
        handed.ok_or_else(|| format!("no hand-over line {UPGRADE_WAIT:?} after SIGUSR2"))?;
    if conns != UPGRADE_CONNS {
        return Err(format!(
            "{conns} connections handed over, not {UPGRADE_CONNS}"
        ));
    }
    if !wait_for(UPGRADE_WAIT, || server.read_pid_file() == Some(new_pid)) {
        return Err(format!(
            "the pid file never named the new process {new_pid}"
        ));
    }
    let frozen_line =
        |m: &str| parse_debug_duration(m.strip_prefix("upgrade: the loops were frozen for ")?);
    let mut frozen = None;
    wait_for(UPGRADE_WAIT, || {
        frozen = server.find_log(frozen_line).map(|(_, d)| d);
        frozen.is_some()
    });
    let frozen = frozen.ok_or("no `the loops were frozen for` line")?;
    if handed_at > window_end {
        return Err("the hand-over ended after the measured window".to_string());
    }
    Ok(Some((frozen, handed_at - signalled)))
}

/// The live-upgrade section: for each round, each shape without and then
/// with an upgrade. Returns runs[shape][without, with] and one line per
/// run; `next_listen` gives each run its fresh address.
fn run_upgrades(
    rounds: u64,
    pinning: &Pinning,
    mut next_listen: impl FnMut() -> String,
) -> (Vec<[Vec<UpgradeRun>; 2]>, Vec<String>) {
    let mut runs: Vec<[Vec<UpgradeRun>; 2]> =
        UPGRADE_SHAPES.iter().map(|_| Default::default()).collect();
    let mut lines = Vec::new();
    for round in 1..=rounds {
        for (si, shape) in UPGRADE_SHAPES.iter().enumerate() {
            for (vi, upgrade) in [false, true].into_iter().enumerate() {
                let run = run_upgrade(shape, upgrade, &next_listen(), pinning);
                let ms = |d: Option<Duration>| num(d.map(|d| d.as_secs_f64() * 1e3));
                let l = &run.load;
                let line = format!(
                    "round {round}/{rounds} {:<28} {:<15} p99 {:>8} µs p99.9 {:>8} µs max {:>8} µs tool lateness p99 {:>6} µs frozen {:>5} ms signal→hand-over {:>5} ms errors {}",
                    shape.name,
                    if upgrade {
                        "with upgrade"
                    } else {
                        "without upgrade"
                    },
                    num(Some(l.latency[1])),
                    num(Some(l.latency[2])),
                    num(Some(l.latency_max)),
                    num(l.lateness_p99),
                    ms(run.frozen),
                    ms(run.handover),
                    l.errors,
                );
                eprintln!("{line}");
                lines.push(line);
                runs[si][vi].push(run);
                std::thread::sleep(PAUSE);
            }
        }
    }
    (runs, lines)
}

/// The live-upgrade section of `BENCHMARKS.md`: medians over the rounds.
fn upgrade_md(runs: &[[Vec<UpgradeRun>; 2]], rounds: u64) -> String {
    let mut d = String::new();
    let _ = writeln!(
        d,
        "\n## Live upgrade at 10,000 connections\n\n\
         echoloop alone (pinned like the rounds), {rounds} rounds; in each, each load shape \
         runs twice, each time against a fresh echoloop copied to a temp dir and started with \
         `--pid-file`: once without an upgrade, then once with a SIGUSR2 {} s into the \
         {UPGRADE_SECS} s window (after {} s of warm-up), the bench waiting for the old \
         process's hand-over line and for the pid file to name the new process. Latency is \
         `echoloop-load`'s (open loop: corrected, from each line's due time); figures are \
         medians over the rounds, the difference is with minus without, errors are summed \
         (the load generator's, a late run of its own included, and the bench's checks of the \
         hand-over).\n",
        UPGRADE_SIGNAL_AT.as_secs(),
        UPGRADE_WARMUP.as_secs(),
    );
    let _ = writeln!(
        d,
        "| load | figure | without upgrade | with upgrade | difference |\n|---|---|--:|--:|--:|"
    );
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let mut growth = Vec::new();
    for (shape, [without, with]) in UPGRADE_SHAPES.iter().zip(runs) {
        // The tail a client sees: p99, p99.9 and max.
        let tail = |r: &UpgradeRun, i: usize| {
            [r.load.latency[1], r.load.latency[2], r.load.latency_max][i]
        };
        let latency = if shape.rate.is_some() {
            "corrected "
        } else {
            ""
        };
        for (i, figure) in ["p99 µs", "p99.9 µs", "max µs"].into_iter().enumerate() {
            let m = |runs: &[UpgradeRun]| median(runs.iter().map(|r| Some(tail(r, i))));
            let (a, b) = (m(without), m(with));
            let diff = a.zip(b).map(|(a, b)| b - a);
            if figure == "max µs" {
                growth.push(diff);
            }
            let _ = writeln!(
                d,
                "| {} | {latency}{figure} | {} | {} | {} |",
                shape.name,
                num(a),
                num(b),
                signed(diff)
            );
        }
        let frozen = median(with.iter().map(|r| ms(r.frozen)));
        let handover = median(with.iter().map(|r| ms(r.handover)));
        let _ = writeln!(
            d,
            "| {} | loops frozen ms (old process's log) | — | {} | |",
            shape.name,
            num(frozen)
        );
        let _ = writeln!(
            d,
            "| {} | SIGUSR2 → hand-over line ms | — | {} | |",
            shape.name,
            num(handover)
        );
        let errors = |runs: &[UpgradeRun]| runs.iter().map(|r| r.load.errors).sum::<u64>();
        let _ = writeln!(
            d,
            "| {} | errors (sum) | {} | {} | |",
            shape.name,
            errors(without),
            errors(with)
        );
    }
    let errors: u64 = runs.iter().flatten().flatten().map(|r| r.load.errors).sum();
    let frozen = median(runs.iter().flat_map(|r| &r[1]).map(|r| ms(r.frozen)));
    let queued = UPGRADE_SHAPES[0]
        .rate
        .zip(frozen)
        .map(|(rate, f)| rate as f64 * f / 1e3);
    let ms_of = |us: Option<f64>| signed(us.map(|us| us / 1e3));
    let outcome = match errors {
        0 => "no error, no close, no reset: one pause".to_string(),
        1 => "**1 error** (see the notes), and one pause".to_string(),
        n => format!("**{n} errors** (see the notes), and one pause"),
    };
    let _ = writeln!(
        d,
        "\nWhat a client sees: {outcome}. While the loops are frozen (a median {} ms here) \
         nothing is read or written; then the new process serves the lines the 10,000 \
         connections queued meanwhile (about {} in the open loop) before the client's own: \
         the pause is the frozen time plus that drain. The worst reply moved by {} ms in the \
         open loop and by {} ms in ping-pong.",
        num(frozen),
        num(queued),
        ms_of(growth[0]),
        ms_of(growth[1]),
    );
    d
}

/// CPU seconds (user + system) of all the children reaped so far.
fn children_cpu_secs() -> f64 {
    // SAFETY: `getrusage` only writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The figures of one JSON report.
fn parse_report(r: &Value) -> Sample {
    let f = |v: &Value| v.as_f64();
    let percentiles = |l: &Value| ["p50", "p99", "p999"].map(|p| f(&l[p]).unwrap_or(0.0));
    let server = &r["server"];
    let mut error_detail = String::new();
    if let Some(errors) = r["errors"].as_object() {
        for (name, count) in errors {
            let count = count.as_u64().unwrap_or(0);
            if name != "total" && count > 0 {
                let _ = write!(error_detail, "{name}={count} ");
            }
        }
    }
    Sample {
        replies_per_sec: f(&r["replies_per_sec"]).unwrap_or(0.0),
        latency: percentiles(&r["latency_us"]),
        latency_max: f(&r["latency_us"]["max"]).unwrap_or(0.0),
        uncorrected_p99: f(&r["latency_uncorrected_us"]["p99"]),
        lateness_p99: f(&r["rate"]["lateness_us"]["p99"]),
        connects_per_sec: f(&r["connects"]["per_sec"]).unwrap_or(0.0),
        connect_latency: percentiles(&r["connects"]["latency_us"]),
        cpu_us_per_reply: f(&server["cpu_us_per_reply"]),
        cpu_us_per_conn: f(&server["cpu_us_per_conn"]),
        rss_growth_per_conn: f(&server["rss_growth_per_conn_bytes"]),
        wakeups_per_sec: f(&server["wakeups_per_sec"]),
        load_busy_pct: None,
        errors: r["errors"]["total"].as_u64().unwrap_or(1),
        error_detail: error_detail.trim().to_string(),
    }
}

/// The median of the values present (the mean of the middle two for an
/// even count), or `None` when there are none.
fn median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The medians of one server in one scenario, errors summed over rounds.
#[derive(Clone, Default)]
struct Summary {
    replies_per_sec: Option<f64>,
    latency: [Option<f64>; 3],
    latency_max: Option<f64>,
    uncorrected_p99: Option<f64>,
    lateness_p99: Option<f64>,
    connects_per_sec: Option<f64>,
    connect_latency: [Option<f64>; 3],
    cpu_us_per_reply: Option<f64>,
    cpu_us_per_conn: Option<f64>,
    rss_growth_per_conn: Option<f64>,
    wakeups_per_sec: Option<f64>,
    load_busy_pct: Option<f64>,
    errors: u64,
}

fn summarize(samples: &[Sample]) -> Summary {
    let m = |get: fn(&Sample) -> Option<f64>| median(samples.iter().map(get));
    Summary {
        replies_per_sec: m(|s| Some(s.replies_per_sec)),
        latency: [
            m(|s| Some(s.latency[0])),
            m(|s| Some(s.latency[1])),
            m(|s| Some(s.latency[2])),
        ],
        latency_max: m(|s| Some(s.latency_max)),
        uncorrected_p99: m(|s| s.uncorrected_p99),
        lateness_p99: m(|s| s.lateness_p99),
        connects_per_sec: m(|s| Some(s.connects_per_sec)),
        connect_latency: [
            m(|s| Some(s.connect_latency[0])),
            m(|s| Some(s.connect_latency[1])),
            m(|s| Some(s.connect_latency[2])),
        ],
        cpu_us_per_reply: m(|s| s.cpu_us_per_reply),
        cpu_us_per_conn: m(|s| s.cpu_us_per_conn),
        rss_growth_per_conn: m(|s| s.rss_growth_per_conn),
        wakeups_per_sec: m(|s| s.wakeups_per_sec),
        load_busy_pct: m(|s| s.load_busy_pct),
        errors: samples.iter().map(|s| s.errors).sum(),
    }
}

/// A number with a precision that suits its size.
fn num(v: Option<f64>) -> String {
    match v {
        None => "—".to_string(),
        Some(v) if v.abs() >= 1000.0 => {
            // Thousands separated by commas, for replies per second.
            let digits = format!("{:.0}", v.abs());
            let mut out = String::from(if v < 0.0 { "-" } else { "" });
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// A difference: [`num`] with its sign, `+` included.
fn signed(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 0.0 => format!("+{}", num(Some(v))),
        _ => num(v),
    }
}

/// `a / b` when both are known and `b` is not zero.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("—".to_string(), |r| format!("{r:.2}×"))
}

/// A target's verdict: `limit` is the bound on `value` (a ratio or an
/// absolute figure), `what` says what it is.
fn verdict(value: Option<f64>, limit: f64, what: &str, unit: &str) -> (String, bool) {
    match value {
        None => (format!("{what} ≤ {limit}{unit}: **not measured**"), false),
        Some(v) if v <= limit => (format!("{what} ≤ {limit}{unit}: **met**"), true),
        Some(v) => {
            let over = (v / limit - 1.0) * 100.0;
            (
                format!("{what} ≤ {limit}{unit}: **MISSED** ({v:.2}{unit}, {over:.0}% over)"),
                false,
            )
        }
    }
}

/// One row of the table.
struct Row {
    scenario: &'static str,
    figure: &'static str,
    values: [String; 3],
    vs_idiomatic: String,
    vs_tuned: String,
    target: String,
}

impl Row {
    fn new(
        scenario: &'static str,
        figure: &'static str,
        s: &[Summary; 3],
        get: fn(&Summary) -> Option<f64>,
    ) -> Row {
        Row {
            scenario,
            figure,
            values: [num(get(&s[0])), num(get(&s[1])), num(get(&s[2]))],
            vs_idiomatic: String::new(),
            vs_tuned: String::new(),
            target: String::new(),
        }
    }

    /// Adds the ratios echoloop/peer.
    fn with_ratios(mut self, s: &[Summary; 3], get: fn(&Summary) -> Option<f64>) -> Row {
        self.vs_idiomatic = ratio_cell(ratio(get(&s[ECHOLOOP]), get(&s[IDIOMATIC])));
        self.vs_tuned = ratio_cell(ratio(get(&s[ECHOLOOP]), get(&s[TUNED])));
        self
    }
}

/// The table's rows and whether every target was met.
fn table_rows(summaries: &[[Summary; 3]]) -> (Vec<Row>, bool) {
    let mut rows = Vec::new();
    let mut all_met = true;
    let mut target = |row: &mut Row, (text, met): (String, bool)| {
        if !row.target.is_empty() {
            row.target.push_str("; ");
        }
        row.target.push_str(&text);
        all_met &= met;
    };
    for (scenario, s) in SCENARIOS.iter().zip(summaries) {
        let name = scenario.name;
        match scenario.kind {
            Kind::PingPong | Kind::Pipeline => {
                rows.push(Row::new(name, "replies/s", s, |s| s.replies_per_sec));
                rows.push(Row::new(name, "latency p50 µs", s, |s| s.latency[0]));
                rows.push(Row::new(name, "latency p99 µs", s, |s| s.latency[1]));
                let cpu = |s: &Summary| s.cpu_us_per_reply;
                rows.push(Row::new(name, "server core busy %", s, |s| {
                    Some(s.cpu_us_per_reply? * s.replies_per_sec? / 1e4)
                }));
                rows.push(Row::new(name, "load gen core busy %", s, |s| {
                    s.load_busy_pct
                }));
                let mut row = Row::new(name, "server CPU µs/reply", s, cpu).with_ratios(s, cpu);
                let (el, idiomatic, tuned) = (cpu(&s[0]), cpu(&s[1]), cpu(&s[2]));
                if scenario.args.contains(&"10000") {
                    target(&mut row, verdict(ratio(el, tuned), 1.0, "vs tuned", "×"));
                }
                if scenario.kind == Kind::Pipeline {
                    let r = ratio(el, idiomatic);
                    target(&mut row, verdict(r, 0.25, "vs idiomatic", "×"));
                    target(&mut row, verdict(ratio(el, tuned), 1.0, "vs tuned", "×"));
                }
                rows.push(row);
            }
            Kind::Connect => {
                rows.push(Row::new(name, "connections/s", s, |s| s.connects_per_sec));
                rows.push(Row::new(name, "connect p50 µs", s, |s| {
                    s.connect_latency[0]
                }));
                rows.push(Row::new(name, "connect p99 µs", s, |s| {
                    s.connect_latency[1]
                }));
                let cpu = |s: &Summary| s.cpu_us_per_conn;
                rows.push(Row::new(name, "server core busy %", s, |s| {
                    Some(s.cpu_us_per_conn? * s.connects_per_sec? / 1e4)
                }));
                rows.push(Row::new(name, "load gen core busy %", s, |s| {
                    s.load_busy_pct
                }));
                let mut row = Row::new(name, "server CPU µs/conn", s, cpu).with_ratios(s, cpu);
                let r = ratio(cpu(&s[0]), cpu(&s[2]));
                target(&mut row, verdict(r, 1.0, "vs tuned", "×"));
                rows.push(row);
            }
            Kind::Rate => {
                rows.push(Row::new(name, "replies/s", s, |s| s.replies_per_sec));
                rows.push(Row::new(name, "corrected p50 µs", s, |s| s.latency[0]));
                rows.push(Row::new(name, "corrected p99 µs", s, |s| s.latency[1]));
                rows.push(Row::new(name, "corrected p99.9 µs", s, |s| s.latency[2]));
                rows.push(Row::new(name, "corrected max µs", s, |s| s.latency_max));
                rows.push(Row::new(name, "uncorrected p99 µs", s, |s| {
                    s.uncorrected_p99
                }));
                rows.push(Row::new(name, "load gen lateness p99 µs", s, |s| {
                    s.lateness_p99
                }));
                let cpu = |s: &Summary| s.cpu_us_per_reply;
                rows.push(Row::new(name, "server CPU µs/reply", s, cpu).with_ratios(s, cpu));
            }
            Kind::Idle => {
                let rss = |s: &Summary| s.rss_growth_per_conn;
                let mut row = Row::new(name, "RSS growth B/conn", s, rss).with_ratios(s, rss);
                target(&mut row, verdict(rss(&s[0]), 96.0, "echoloop", " B"));
                rows.push(row);
                let wakeups = |s: &Summary| s.wakeups_per_sec;
                let mut row = Row::new(name, "wakeups/s", s, wakeups);
                target(&mut row, verdict(wakeups(&s[0]), 0.2, "echoloop", "/s"));
                rows.push(row);
            }
        }
    }
    let errors: [u64; 3] =
        std::array::from_fn(|i| summaries.iter().map(|s| s[i].errors).sum::<u64>());
    let mut row = Row {
        scenario: "every run",
        figure: "reply errors (sum)",
        values: errors.map(|e| e.to_string()),
        vs_idiomatic: String::new(),
        vs_tuned: String::new(),
        target: String::new(),
    };
    let total: u64 = errors.iter().sum();
    let text = if total == 0 {
        "zero in every run: **met**".to_string()
    } else {
        format!("zero in every run: **MISSED** ({total} errors, see the notes)")
    };
    target(&mut row, (text, total == 0));
    rows.push(row);
    (rows, all_met)
}

/// The table as Markdown (it reads as well in a terminal).
fn render_table(rows: &[Row]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| scenario | figure | {} | {} | {} | echoloop ÷ idiomatic | echoloop ÷ tuned | target |",
        SERVERS[0].name, SERVERS[1].name, SERVERS[2].name
    );
    let _ = writeln!(t, "|---|---|--:|--:|--:|--:|--:|---|");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.figure,
            r.values[0],
            r.values[1],
            r.values[2],
            r.vs_idiomatic,
            r.vs_tuned,
            r.target
        );
    }
    t
}

/// The share of all cores' time that was not idle over `span`, in percent
/// (from the `cpu` line of `/proc/stat`).
fn cpu_busy_pct(span: Duration) -> Option<f64> {
    let (total0, idle0) = procfs::system_cpu_ticks().ok()?;
    std::thread::sleep(span);
    let (total1, idle1) = procfs::system_cpu_ticks().ok()?;
    let total = total1.saturating_sub(total0).max(1) as f64;
    Some(100.0 * (1.0 - idle1.saturating_sub(idle0) as f64 / total))
}

/// The 1-minute load average.
fn load_average() -> Option<f64> {
    procfs::load_average().ok()
}

/// The first line a command prints, or `unknown`.
fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// `nproc`, the CPU model and the kernel.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, m)| m.trim().to_string());
    let kernel = command_line("uname", &["-r"]);
    format!("{cores} cores (nproc), {model}, Linux {kernel}")
}

/// The latency chart: one panel per traffic scenario, p50/p99/p99.9 on a
/// linear scale from 0, one line per server.
fn draw_chart(path: &Path, summaries: &[[Summary; 3]]) -> Result<(), Box<dyn std::error::Error>> {
    let panels: Vec<(String, [[f64; 3]; 3])> = SCENARIOS
        .iter()
        .zip(summaries)
        .filter(|(sc, _)| sc.kind != Kind::Idle)
        .map(|(sc, s)| {
            let connect = sc.kind == Kind::Connect;
            let values = std::array::from_fn(|i| {
                let l = if connect {
                    s[i].connect_latency
                } else {
                    s[i].latency
                };
                l.map(|v| v.unwrap_or(0.0))
            });
            let title = if connect {
                format!("{} (connect latency)", sc.name)
            } else if sc.kind == Kind::Rate {
                format!("{} (corrected reply latency)", sc.name)
            } else {
                format!("{} (reply latency)", sc.name)
            };
            (title, values)
        })
        .collect();
    let root = SVGBackend::new(path, (1000, 1120)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Latency percentiles in µs, medians over the rounds",
        ("sans-serif", 22),
    )?;
    let colors = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
    ];
    // One legend for all panels, in a strip under the title.
    let (legend, body) = root.split_vertically(30);
    for (i, (server, color)) in SERVERS.iter().zip(colors).enumerate() {
        let x = 300 + 170 * i as i32;
        legend.draw(&PathElement::new(
            [(x, 15), (x + 24, 15)],
            color.stroke_width(3),
        ))?;
        legend.draw(&Text::new(server.name, (x + 30, 8), ("sans-serif", 15)))?;
    }
    let labels = ["p50", "p99", "p99.9"];
    for (area, (title, values)) in body.split_evenly((3, 2)).iter().zip(&panels) {
        let hi = values.iter().flatten().copied().fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..2u32).into_segmented(), 0.0..hi)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i as usize).unwrap_or(&"").to_string(),
                _ => String::new(),
            })
            .y_labels(8)
            .y_label_formatter(&|v| if *v == 0.0 { "0".into() } else { num(Some(*v)) })
            .draw()?;
        for (color, series) in colors.into_iter().zip(values) {
            let points: Vec<_> = (0u32..3)
                .map(|i| (SegmentValue::CenterOf(i), series[i as usize]))
                .collect();
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )?;
        }
    }
    root.present()?;
    Ok(())
}

/// Reads a positive integer from the environment, else `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// Like `env_u64`, but `0` is a value (it turns something off).
fn env_u64_or_zero(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The scenario kind's name in `C10K_ONLY`.
fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::PingPong => "pingpong",
        Kind::Pipeline => "pipeline",
        Kind::Connect => "connect",
        Kind::Idle => "idle",
        Kind::Rate => "rate",
    }
}

/// `C10K_ONLY=rate,soak`: the kinds to run (`pingpong`, `pipeline`,
/// `connect`, `idle`, `rate`, `soak`, `upgrade`); `None` runs everything. A partial
/// run prints its table but writes neither `BENCHMARKS.md` nor the chart.
fn only() -> Option<Vec<String>> {
    let v = std::env::var("C10K_ONLY").ok()?;
    Some(v.split(',').map(|k| k.trim().to_string()).collect())
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a filter that names another bench
    // means this one is not wanted.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"c10k".contains(a.as_str()))
    {
        return ExitCode::SUCCESS;
    }
    let rounds = env_u64("C10K_ROUNDS", 3).max(2);
    let secs = env_u64("C10K_SECS", 4).to_string();
    let only = only();
    let wanted = |kind: &str| only.as_ref().is_none_or(|o| o.iter().any(|k| k == kind));

    build();
    let pinning = Pinning::detect();
    let mut notes = Vec::new();
    if !pinning.enabled {
        notes.push(
            "**Unpinned**: `taskset` is missing or there is one core, so servers and the \
             load generator shared the cores."
                .to_string(),
        );
    } else {
        notes.push(
            "Servers pinned to core 0, the load generator to core 1 (`taskset -c`).".to_string(),
        );
    }
    // The build just raised the load average, and other work may be
    // running: wait a bounded time for an idle CPU and a low load average.
    let settle_until = Instant::now() + SETTLE;
    while Instant::now() < settle_until
        && (load_average().is_some_and(|l| l > BUSY_LOAD)
            || cpu_busy_pct(Duration::from_secs(1)).is_some_and(|b| b >= IDLE_BUSY_PCT))
    {
        std::thread::sleep(Duration::from_secs(4));
    }
    let load_before = load_average();
    let busy_before = cpu_busy_pct(Duration::from_secs(1));
    if let Some(load) = load_before.filter(|&l| l > BUSY_LOAD) {
        let busy = busy_before.map_or("unknown".to_string(), |b| format!("{b:.0}%"));
        let warning = format!(
            "**Warning**: the 1-minute load average was {load:.2} (> {BUSY_LOAD}) before the \
             start (CPU busy over the last second: {busy} of all cores): something else was \
             using the CPU, the figures are noisier."
        );
        println!("{warning}");
        notes.push(warning);
    }
    let started = Instant::now();

    // samples[scenario][server]: one sample per round.
    let mut samples: Vec<[Vec<Sample>; 3]> = SCENARIOS.iter().map(|_| Default::default()).collect();
    let mut run = 0u32;
    let mut run_lines = Vec::new();
    for round in 1..=rounds {
        for (si, scenario) in SCENARIOS.iter().enumerate() {
            if !wanted(kind_name(scenario.kind)) {
                continue;
            }
            for (vi, server) in SERVERS.iter().enumerate() {
                // A fresh loopback address per run: 127.0.0.2 ..= 127.0.0.201.
                let listen = format!("127.0.0.{}:0", 2 + run % 200);
                run += 1;
                let (proc, addr) = start_server(server, &listen, &pinning);
                let pid = proc.child.id();
                let sample = run_load(scenario, &addr, pid, &secs, &pinning);
                drop(proc);
                let line = format!(
                    "round {round}/{rounds} {:<18} {:<16} replies/s {:>9} p99 {:>8} µs cpu/reply {:>6} cpu/conn {:>6} rss/conn {:>6} wakeups/s {:>5} errors {}",
                    scenario.name,
                    server.name,
                    num(Some(sample.replies_per_sec)),
                    num(Some(sample.latency[1])),
                    num(sample.cpu_us_per_reply),
                    num(sample.cpu_us_per_conn),
                    num(sample.rss_growth_per_conn),
                    num(sample.wakeups_per_sec),
                    sample.errors,
                );
                eprintln!("{line}");
                run_lines.push(line);
                if sample.errors > 0 {
                    let line = format!(
                        "Errors: round {round}, {}, {}: {} ({})",
                        scenario.name, server.name, sample.errors, sample.error_detail
                    );
                    println!("{line}");
                    notes.push(line);
                }
                samples[si][vi].push(sample);
                std::thread::sleep(PAUSE);
            }
        }
    }
    let soak = if wanted("soak") {
        run_soak(&pinning)
    } else {
        None
    };
    let upgrades = wanted("upgrade").then(|| {
        let (runs, lines) = run_upgrades(rounds, &pinning, || {
            let listen = format!("127.0.0.{}:0", 2 + run % 200);
            run += 1;
            listen
        });
        run_lines.extend(lines);
        runs
    });
    let upgrade_errors: u64 = upgrades
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .map(|r| r.load.errors)
        .sum();
    for (shape, variants) in UPGRADE_SHAPES.iter().zip(upgrades.iter().flatten()) {
        for (variant, runs) in ["without upgrade", "with upgrade"].iter().zip(variants) {
            for (round, r) in (1..).zip(runs).filter(|(_, r)| r.load.errors > 0) {
                let line = format!(
                    "Errors: round {round}, {}, {variant}: {} ({})",
                    shape.name, r.load.errors, r.load.error_detail
                );
                println!("{line}");
                notes.push(line);
            }
        }
    }
    let elapsed = started.elapsed();

    let summaries: Vec<[Summary; 3]> = samples
        .iter()
        .map(|per_server| std::array::from_fn(|i| summarize(&per_server[i])))
        .collect();
    let (rows, all_met) = table_rows(&summaries);
    let table = render_table(&rows);
    println!();
    println!("c10k: medians of {rounds} rounds, {secs} s windows ({elapsed:.0?})");
    println!();
    print!("{table}");
    println!();
    for note in &notes {
        println!("{note}");
    }
    let soak_section = soak.as_ref().map(soak_md);
    if let Some(text) = &soak_section {
        print!("{text}");
    }
    let upgrade_section = upgrades.as_ref().map(|runs| upgrade_md(runs, rounds));
    if let Some(text) = &upgrade_section {
        print!("{text}");
    }
    let soak_ok = soak.as_ref().is_none_or(|v| v["ok"] == true);
    if only.is_some() {
        println!("C10K_ONLY: a partial run, BENCHMARKS.md and the chart are left as they were");
        return if soak_ok && upgrade_errors == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }

    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/latency.svg");
    if let Err(e) = draw_chart(&chart, &summaries) {
        println!("latency chart not written: {e}");
    }
    let errors: u64 = summaries.iter().flatten().map(|s| s.errors).sum();
    let doc = benchmarks_md(&Doc {
        table: &table,
        rounds,
        secs: &secs,
        elapsed,
        load_before,
        notes: &notes,
        run_lines: &run_lines,
        all_met,
        soak: soak_section.as_deref(),
        upgrade: upgrade_section.as_deref(),
    });
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    std::fs::write(&doc_path, doc).expect("write BENCHMARKS.md");
    println!("wrote {} and {}", doc_path.display(), chart.display());
    if errors > 0 {
        println!("FAILED: the load generator counted {errors} reply errors");
        return ExitCode::FAILURE;
    }
    if !soak_ok {
        println!("FAILED: the soak found a broken promise");
        return ExitCode::FAILURE;
    }
    if upgrade_errors > 0 {
        println!("FAILED: {upgrade_errors} errors in the live-upgrade runs");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The soak's section of `BENCHMARKS.md`, from its JSON report.
fn soak_md(v: &Value) -> String {
    let mut d = String::new();
    let f = |v: &Value| num(v.as_f64());
    let soak = &v["soak"];
    let _ = writeln!(
        d,
        "\n## Soak\n\n`echoloop-load --mode soak --conns {} --secs {} --server-pid PID` against \
         echoloop with its defaults (idle timeout {} s, max line {} bytes, max pending output \
         {} bytes): {} good ping-pong clients, two abusive clients of each kind.\n",
        v["conns"],
        f(&v["window_secs"]),
        f(&soak["idle_timeout_secs"]),
        soak["max_line"],
        soak["max_pending_output"],
        v["conns"],
    );
    let _ = writeln!(
        d,
        "- Good clients: {} replies/s, p50 {} µs, p99 {} µs, max {} µs, errors {}",
        f(&v["replies_per_sec"]),
        f(&v["latency_us"]["p50"]),
        f(&v["latency_us"]["p99"]),
        f(&v["latency_us"]["max"]),
        v["errors"]["total"]
    );
    let srv = &soak["server"];
    let mib = |v: &Value| num(v.as_f64().map(|b| b / (1024.0 * 1024.0)));
    let _ = writeln!(
        d,
        "- Server descriptors before / peak / after: {} / {} / {}; RSS MiB {} / {} / {} \
         (growth allowed {} MiB); CPU in the quiet second after: {}% of a core",
        srv["fds_before"],
        srv["fds_peak"],
        srv["fds_after"],
        mib(&srv["rss_before_bytes"]),
        mib(&srv["rss_peak_bytes"]),
        mib(&srv["rss_after_bytes"]),
        mib(&srv["rss_bound_bytes"]),
        num(srv["quiet_cpu_share"].as_f64().map(|c| c * 100.0)),
    );
    let _ = writeln!(
        d,
        "\n| abuse | clients | attempts | broken |\n|---|--:|--:|--:|"
    );
    for row in soak["abuse"].as_array().into_iter().flatten() {
        let _ = writeln!(
            d,
            "| {} | {} | {} | {} |",
            row["kind"].as_str().unwrap_or("?"),
            row["clients"],
            row["attempts"],
            row["broken"]
        );
    }
    let broken: Vec<&str> = soak["broken"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str())
        .collect();
    if broken.is_empty() {
        let _ = writeln!(d, "\nEvery promise kept.");
    } else {
        let _ = writeln!(d, "\nBroken promises:\n");
        for b in broken {
            let _ = writeln!(d, "- {b}");
        }
    }
    d
}

/// What `BENCHMARKS.md` is made of.
struct Doc<'a> {
    table: &'a str,
    rounds: u64,
    secs: &'a str,
    elapsed: Duration,
    load_before: Option<f64>,
    notes: &'a [String],
    /// One line per load generator run, in the order they ran.
    run_lines: &'a [String],
    all_met: bool,
    /// The soak section, when a soak ran.
    soak: Option<&'a str>,
    /// The live-upgrade section, when it ran.
    upgrade: Option<&'a str>,
}

/// The whole of `BENCHMARKS.md`.
fn benchmarks_md(doc: &Doc) -> String {
    let &Doc {
        table,
        rounds,
        secs,
        elapsed,
        load_before,
        notes,
        run_lines,
        all_met,
        soak,
        upgrade,
    } = doc;
    let mut d = String::new();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load = load_before.map_or("unknown".to_string(), |l| format!("{l:.2}"));
    let _ = writeln!(d, "# Benchmarks\n");
    let _ = writeln!(
        d,
        "Written by `cargo bench --bench c10k` (`benches/c10k.rs`); do not edit by hand, \
         run it again.\n"
    );
    let _ = writeln!(
        d,
        "- Command: `cargo bench --bench c10k` (part of `cargo bench`)"
    );
    let _ = writeln!(d, "- Date: {date}");
    let _ = writeln!(d, "- Machine: {}", machine());
    let _ = writeln!(
        d,
        "- Rounds: {rounds} (`C10K_ROUNDS`), each server in turn per scenario, a fresh \
         server process per run; figures are medians over the rounds, errors are summed"
    );
    let _ = writeln!(
        d,
        "- Window: {secs} s measured (`C10K_SECS`) after 1 s of warm-up; connect runs \
         until its 10,000 connections are done; idle holds 5 s"
    );
    let _ = writeln!(
        d,
        "- Load average (1 min) before the start: {load} (warning above 0.5); total time \
         {elapsed:.0?}"
    );
    let _ = writeln!(
        d,
        "- All targets met: **{}**\n",
        if all_met { "yes" } else { "no" }
    );
    let _ = writeln!(d, "{table}");
    let _ = writeln!(d, "![latency percentiles](benches/latency.svg)\n");
    for section in [soak, upgrade].into_iter().flatten() {
        let _ = writeln!(d, "{}", section.trim());
        let _ = writeln!(d);
    }
    let _ = writeln!(d, "## Notes\n");
    for note in notes {
        let _ = writeln!(d, "- {note}");
    }
    let _ = writeln!(
        d,
        "- The servers: `echoloop` (defaults but `--listen`: one loop, 10 s idle timeout), \
         `tokio_idiomatic` (current-thread runtime, a task per connection, \
         `BufReader::read_line` then `write_all` per line) and `tokio_tuned` (current-thread \
         runtime, a task per connection, one write for all the replies of a read), both in \
         `load/examples/`."
    );
    let _ = writeln!(
        d,
        "- Server CPU is the server's utime+stime from `/proc/PID/stat` over the measured \
         window, divided by the replies (or connections) in it; RSS growth is resident \
         memory after the connections opened minus before, per connection; wakeups are \
         voluntary context switches of all the server's threads per second while idle."
    );
    let _ = writeln!(
        d,
        "- Each server listens on its own loopback address (127.0.0.2, .3, ...), so the \
         TIME_WAIT sockets of one run never collide with the next run's connections."
    );
    let _ = writeln!(
        d,
        "- Latency is measured by a single-threaded load generator on one core: at 10,000 \
         connections it is mostly queueing in the generator and the kernel, so compare \
         servers with each other, not with other machines."
    );
    // The hand-written reading of a run (profiles of missed targets) lives
    // beside this file, so that a new run does not erase it.
    let analysis = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/c10k-analysis.md");
    if let Ok(text) = std::fs::read_to_string(&analysis) {
        let _ = writeln!(
            d,
            "\n## Analysis\n\nHand-written from `benches/c10k-analysis.md` (copied in by the \
             bench; it describes the run it names, which may be older than the table above).\n"
        );
        let _ = write!(d, "{}", text.trim_end());
        let _ = writeln!(d);
    }
    // The idle figures at 19,900 connections and the million-connection
    // bill are measured by hand (two load processes, /proc/slabinfo), and
    // so is where the open-loop tail comes from (runs under chrt, the
    // server's run-queue wait): kept beside this file too.
    for name in ["benches/idle-analysis.md", "benches/open-loop-analysis.md"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let _ = writeln!(d);
            let _ = write!(d, "{}", text.trim_end());
            let _ = writeln!(d);
        }
    }
    let _ = writeln!(d, "\n## Every run\n");
    let _ = writeln!(
        d,
        "The figures of each load generator run, in the order they ran (the table above \
         holds their medians).\n"
    );
    let _ = writeln!(d, "```text");
    for line in run_lines {
        let _ = writeln!(d, "{line}");
    }
    let _ = writeln!(d, "```");
    d
}
