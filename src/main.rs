//! The `echoloop` binary: command line to running loops, and exit status.
//!
//! Start-up order: parse (exit 2 on bad arguments, clap's convention), set
//! up logging, raise `RLIMIT_NOFILE`, judge the values against it (exit 2
//! for too many loops), take the listeners systemd passed or bind every
//! listener of every loop, print `Echoing on ADDR` per address, start one
//! thread per loop, write `--pid-file`, tell systemd `READY=1`, then wait
//! for signals. The first SIGINT/SIGTERM tells systemd `STOPPING=1` and
//! asks every loop to shut down gracefully (exit 0 when they are done); a
//! second one exits at once with status 1.
//!
//! SIGUSR2 starts a live upgrade (`upgrade.rs`) on a thread of its own, so
//! signals are still answered meanwhile: one at a time, a second SIGUSR2 is
//! ignored; a SIGINT/SIGTERM during one abandons it before the commit (then
//! stops this process), and after the commit is passed on to the new
//! process, which serves. A process started by an upgrade takes its
//! loops from the old one instead of binding (`Start::Upgrade`), prints no
//! `Echoing on`, and tells systemd `MAINPID=` with `READY=1`.
//!
//! A failure to start is one `echoloop: ...` line on stderr naming what
//! failed (the listen address, the metrics address, the systemd sockets,
//! the hand-over), and exit status 1.

use clap::CommandFactory;
use echoloop::config::{self, Cli, Config};
use echoloop::event_loop::{EventLoop, LoopHandle, Shared};
use echoloop::metrics::Counters;
use echoloop::upgrade::{self, Arrived, Done, Incoming, Plan};
use echoloop::{listener, pid_file};
use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

const SIGNALS: Token = Token(0);
const WOKEN: Token = Token(1);

fn main() -> ExitCode {
    // First, while single-threaded: it takes a variable out of the
    // environment.
    let incoming = Incoming::from_env().map_err(|e| format!("upgrade: {e}"));
    let program = started_from();
    let cli = Cli::from_args();
    init_logging(&cli);
    match incoming.and_then(|incoming| run(&cli, incoming, program)) {
        Ok(code) => code,
        Err(msg) => {
            // Not through the logger: a failure to start must be seen even
            // with `--log-level off`, and only once.
            eprintln!("echoloop: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Starts the logger with the level `--log-level` or `RUST_LOG` asks for,
/// warning (through it) when `RUST_LOG` had to be ignored.
fn init_logging(cli: &Cli) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, warning) = config::log_filter(cli.log_level, rust_log.as_deref());
    env_logger::Builder::new()
        .parse_filters(&filter)
        .target(env_logger::Target::Stderr)
        .init();
    if let Some(warning) = warning {
        warn!("{warning}");
    }
}

/// Start, serve, stop: each step is one function below.
fn run(
    cli: &Cli,
    mut incoming: Option<Incoming>,
    program: io::Result<PathBuf>,
) -> Result<ExitCode, String> {
    let mut cli = cli.clone();
    let inherited = match &incoming {
        Some(from) => {
            // The same loops as the old process, whatever --threads says.
            cli.threads = from.loops;
            Vec::new()
        }
        None => take_inherited()?,
    };
    // Handlers first: a signal that comes once `Echoing on` is printed
    // must find them installed.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGUSR2]).map_err(|e| format!("signals: {e}"))?;
    let (cfg, fd_limit) = configure(&cli)?;
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| format!("signals: {e}"))?;
    let starts = match &mut incoming {
        // Started up as far as we can without the sockets: only now does
        // the old process freeze its loops.
        Some(from) => (from.take().map_err(|e| format!("upgrade: {e}"))?)
            .into_iter()
            .map(Start::Upgrade)
            .collect(),
        None => bind(&cli, cfg.threads, inherited)?,
    };
    info!(
        "open-file limit {fd_limit}, max connections {}, {} loop(s)",
        cfg.max_connections, cfg.threads
    );
    let announced = announcement(&starts)?;
    let handed = handed_counts(&starts);
    let built = build_loops(&cfg, starts, &poll)?;
    let stop_at_once = match &mut incoming {
        Some(from) => from.ready().map_err(|e| format!("upgrade: {e}"))?,
        None => false,
    };
    let loops = start_loops(built)?;
    match incoming {
        Some(from) => {
            info!(
                "upgrade: took over {} listeners and {} connections from pid {}",
                handed.0, handed.1, from.from
            );
            say_serving(&cli, &[NotifyState::MainPid(std::process::id())]);
            from.serving();
        }
        None => {
            // Only now, with every descriptor of the process open and the
            // loops running, do we say where we serve.
            for (what, addrs) in &announced {
                announce(addrs, what)?;
            }
            say_serving(&cli, &[]);
        }
    }
    let mut serving = Serving::new(upgrade_plan(program, &cli, &loops), loops);
    if stop_at_once {
        info!("the old process was asked to stop during the upgrade: graceful shutdown");
        serving.stop();
    }
    let code = serving.wait(&mut poll, &mut signals)?;
    Ok(serving.finish(code, &cli))
}

/// What one loop starts with.
enum Start {
    /// Listeners bound (or taken from systemd) by this process.
    Fresh {
        echo: Vec<TcpListener>,
        metrics: Option<TcpListener>,
    },
    /// What a loop of the old process handed over.
    Upgrade(Arrived),
}

/// The `Echoing on` and `Metrics on` lines a fresh start prints (none
/// after an upgrade: the old process printed them).
fn announcement(starts: &[Start]) -> Result<Vec<(&'static str, Vec<SocketAddr>)>, String> {
    let Some(Start::Fresh { echo, metrics }) = starts.first() else {
        return Ok(Vec::new());
    };
    let metrics: Vec<TcpListener> = metrics.iter().filter_map(|m| m.try_clone().ok()).collect();
    Ok(vec![
        ("Echoing on", local_addrs(echo)?),
        ("Metrics on", local_addrs(&metrics)?),
    ])
}

/// Listeners and connections an upgrade handed over, for the log.
fn handed_counts(starts: &[Start]) -> (usize, usize) {
    (starts.iter())
        .filter_map(|s| match s {
            Start::Upgrade(a) => Some((a.handed.listeners.len(), a.handed.conns.len())),
            Start::Fresh { .. } => None,
        })
        .fold((0, 0), |(l, c), (dl, dc)| (l + dl, c + dc))
}

/// Serving: the pid file, then systemd's `READY=1` (after `first`).
fn say_serving(cli: &Cli, first: &[NotifyState]) {
    if let Some(path) = &cli.pid_file
        && let Err(e) = pid_file::write(path)
    {
        error!("cannot write the pid file {}: {e}", path.display());
    }
    let mut states = first.to_vec();
    states.push(NotifyState::Ready);
    notify(&states);
}

/// The path this binary was started from, which a live upgrade runs
/// again: `argv[0]` made absolute when it names a path (a symlink stays the
/// symlink, so switching it switches the version), else (found through
/// `PATH`) the running executable.
fn started_from() -> io::Result<PathBuf> {
    match std::env::args_os().next() {
        Some(arg0) if Path::new(&arg0).components().count() > 1 => std::path::absolute(arg0),
        _ => std::env::current_exe(),
    }
}

/// What SIGUSR2 needs: the binary's path, this process's arguments, the
/// loops.
fn upgrade_plan(program: io::Result<PathBuf>, cli: &Cli, loops: &Loops) -> Result<Plan, String> {
    Ok(Plan {
        program: program.map_err(|e| format!("cannot tell which binary to run: {e}"))?,
        args: std::env::args_os().skip(1).collect(),
        timeout: cli.upgrade_timeout,
        loops: loops.handles.clone(),
    })
}

/// The listeners systemd passed, if any; the variables that named them
/// are removed so that children of ours do not think they are theirs.
fn take_inherited() -> Result<Vec<TcpListener>, String> {
    let inherited = listener::inherited()
        .map_err(|e| format!("cannot use the sockets systemd passed (LISTEN_FDS): {e}"))?;
    // SAFETY: still single-threaded (no loop, logger or signal thread has
    // started), so nothing reads the environment concurrently.
    unsafe {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }
    Ok(inherited)
}

/// Raises `RLIMIT_NOFILE` and derives the configuration against it: values
/// that cannot work exit with status 2 (clap's convention), adjusted ones
/// are logged as warnings. Returns the configuration and the limit.
fn configure(cli: &Cli) -> Result<(Arc<Config>, u64), String> {
    let fd_limit = listener::raise_fd_limit()
        .map_err(|e| format!("cannot read or raise the open-file limit: {e}"))?;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let derived = Config::from_cli(cli, fd_limit, cpus).unwrap_or_else(|msg| {
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit()
    });
    derived.warnings.iter().for_each(|w| warn!("{w}"));
    Ok((Arc::new(derived.config), fd_limit))
}

/// Every listener of every loop: echo, and metrics when `--metrics` is
/// given. Socket activation replaces `--listen` (with a warning when it
/// was given).
fn bind(cli: &Cli, threads: usize, inherited: Vec<TcpListener>) -> Result<Vec<Start>, String> {
    let echo = if inherited.is_empty() {
        bind_all(&cli.listen, threads, "listen on")?
    } else {
        if cli.listen_given {
            let ignored: Vec<String> = cli.listen.iter().map(|a| format!("--listen {a}")).collect();
            warn!(
                "socket-activated: {} ignored, serving the socket(s) systemd passed",
                ignored.join(" ")
            );
        }
        info!(
            "socket-activated: serving {} inherited listener(s)",
            inherited.len()
        );
        share_all(inherited, threads)?
    };
    let metrics: Vec<Option<TcpListener>> = match cli.metrics {
        Some(addr) => bind_all(&[addr], threads, "serve metrics on")?
            .into_iter()
            .map(|mut l| l.pop())
            .collect(),
        None => (0..threads).map(|_| None).collect(),
    };
    Ok(echo
        .into_iter()
        .zip(metrics)
        .map(|(echo, metrics)| Start::Fresh { echo, metrics })
        .collect())
}

/// The loops, built and registered, not yet running.
struct Built {
    loops: Vec<EventLoop>,
    /// Wakes the main `poll` (a loop ended, or the upgrade did).
    woken: Arc<Waker>,
}

/// One loop per [`Start`], sharing the counters (fresh, or continuing from
/// what the old process counted) and the connection count.
fn build_loops(cfg: &Arc<Config>, starts: Vec<Start>, poll: &Poll) -> Result<Built, String> {
    let woken = Arc::new(Waker::new(poll.registry(), WOKEN).map_err(|e| e.to_string())?);
    let counters = (starts.iter())
        .map(|s| match s {
            Start::Fresh { .. } => Arc::new(Counters::new()),
            Start::Upgrade(a) => Arc::new(Counters::starting_at(&a.counters)),
        })
        .collect();
    let shared = Shared {
        cfg: cfg.clone(),
        counters,
        live: Arc::new(AtomicUsize::new(0)),
    };
    let loops = (starts.into_iter().enumerate())
        .map(|(i, start)| match start {
            Start::Fresh { echo, metrics } => EventLoop::new(shared.clone(), i, echo, metrics),
            Start::Upgrade(a) => EventLoop::take_over(shared.clone(), i, a.handed),
        })
        .collect::<io::Result<_>>()
        .map_err(|e| format!("event loop: {e}"))?;
    Ok(Built { loops, woken })
}

/// The running loops: their threads, their handles, and how the main
/// thread learns that they have finished.
struct Loops {
    threads: Vec<thread::JoinHandle<io::Result<()>>>,
    handles: Vec<LoopHandle>,
    /// Loops whose `run` has returned; each one also wakes `poll`.
    finished: Arc<AtomicUsize>,
    /// The waker they use, held here too: if the last loop's copy closed
    /// the eventfd, its pending wake would leave the poll with it.
    woken: Arc<Waker>,
}

/// One thread per loop; a loop that returns wakes the main `poll`.
fn start_loops(built: Built) -> Result<Loops, String> {
    let finished = Arc::new(AtomicUsize::new(0));
    let mut loops = Loops {
        threads: Vec::new(),
        handles: Vec::new(),
        finished: finished.clone(),
        woken: built.woken.clone(),
    };
    for (i, event_loop) in built.loops.into_iter().enumerate() {
        loops.handles.push(event_loop.handle());
        let (woken, finished) = (built.woken.clone(), finished.clone());
        let t = thread::Builder::new()
            .name(format!("loop-{i}"))
            .spawn(move || {
                let result = event_loop.run();
                // Counted before the wake, so the main thread never misses it.
                finished.fetch_add(1, Ordering::SeqCst);
                let _ = woken.wake();
                result
            })
            .map_err(|e| format!("thread: {e}"))?;
        loops.threads.push(t);
    }
    Ok(loops)
}

/// The main thread once the loops run: signals, and the upgrade in flight.
struct Serving {
    loops: Loops,
    /// How to upgrade (`Err`: why SIGUSR2 cannot).
    plan: Result<Plan, String>,
    /// A graceful shutdown was asked of the loops.
    stopping: bool,
    /// A SIGINT/SIGTERM came (the next one exits at once). Not set by the
    /// stop an upgrade's old process passes on: a signal that reached
    /// both processes is still the first one here.
    signalled: bool,
    upgrading: Option<Upgrading>,
    /// The new process of the upgrade in flight, until it serves.
    newcomer: Option<u32>,
    /// The process that serves since an upgrade's commit: signals are
    /// passed on to it.
    successor: Option<u32>,
    /// How the hand-over ended, once it did: the new process serves
    /// (`Ok`, it owns the pid file now), or it died after the commit and
    /// nobody does (`Err`).
    handed_over: Option<Result<(), ()>>,
}

/// An upgrade running on its own thread.
struct Upgrading {
    /// Its reports, each sent just before it wakes the main `poll`.
    reports: mpsc::Receiver<Report>,
    /// Set when SIGINT/SIGTERM comes before the commit: give up.
    stop: Arc<AtomicBool>,
}

/// What the upgrade thread tells the main thread.
enum Report {
    /// The new process (this pid) runs, not serving yet.
    Started(u32),
    /// The new process (this pid) serves from now on.
    Committed(u32),
    /// The upgrade is over: handed over, or why not.
    Finished(Result<Done, String>),
}

impl Serving {
    fn new(plan: Result<Plan, String>, loops: Loops) -> Serving {
        Serving {
            plan,
            loops,
            stopping: false,
            signalled: false,
            upgrading: None,
            newcomer: None,
            successor: None,
            handed_over: None,
        }
    }

    /// The exit status once `wait` returned `code`; the pid file is removed
    /// unless a new process serves and owns it now.
    fn finish(self, code: Option<ExitCode>, cli: &Cli) -> ExitCode {
        let code = match code {
            Some(code) => code,
            None if self.handed_over == Some(Err(())) => ExitCode::from(1),
            None => join(self.loops.threads),
        };
        if self.handed_over != Some(Ok(()))
            && let Some(path) = &cli.pid_file
            && let Err(e) = pid_file::remove(path)
        {
            warn!("cannot remove the pid file {}: {e}", path.display());
        }
        code
    }

    /// Waits until every loop has finished and no upgrade is in flight.
    /// The first SIGINT/SIGTERM asks all loops to shut down gracefully (and
    /// abandons an upgrade not yet committed), a second one means exit now
    /// (`Some(1)`); once an upgrade has committed, both are passed on to
    /// the process that serves. SIGUSR2 upgrades.
    fn wait(&mut self, poll: &mut Poll, signals: &mut Signals) -> Result<Option<ExitCode>, String> {
        let mut events = Events::with_capacity(8);
        while self.loops.finished.load(Ordering::SeqCst) < self.loops.threads.len()
            || self.upgrading.is_some()
        {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            self.take_reports();
            for signal in signals.pending() {
                // A commit reported since the wake decides who a stop is for.
                self.take_reports();
                if signal == SIGUSR2 {
                    self.start_upgrade();
                } else if let Some(pid) = self.successor {
                    info!("signal {signal}: passed on to pid {pid}, which serves now");
                    // SAFETY: kill(2) on the pid of our own child.
                    unsafe { libc::kill(pid as libc::pid_t, signal) };
                } else if self.signalled {
                    warn!("second signal ({signal}): exiting now");
                    if let Some(pid) = self.newcomer {
                        // It must not take over what we leave behind.
                        // SAFETY: kill(2) on the pid of our own child.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                    return Ok(Some(ExitCode::from(1)));
                } else {
                    self.signalled = true;
                    match &self.upgrading {
                        Some(u) => {
                            info!(
                                "signal {signal}: abandoning the upgrade, then a graceful shutdown"
                            );
                            u.stop.store(true, Ordering::SeqCst);
                        }
                        None => {
                            info!("signal {signal}: graceful shutdown");
                            self.stop();
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Asks every loop to shut down gracefully.
    fn stop(&mut self) {
        self.stopping = true;
        notify(&[NotifyState::Stopping]);
        self.loops.handles.iter().for_each(LoopHandle::shutdown);
    }

    /// SIGUSR2: one upgrade at a time, never during a shutdown.
    fn start_upgrade(&mut self) {
        if self.upgrading.is_some() || self.successor.is_some() {
            warn!("upgrade already in progress: signal ignored");
            return;
        }
        if self.stopping {
            warn!("shutting down: upgrade signal ignored");
            return;
        }
        let plan = match &self.plan {
            Ok(plan) => plan.clone(),
            Err(e) => {
                error!("upgrade failed: {e}; still serving");
                return;
            }
        };
        info!("upgrade: starting {}", plan.program.display());
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now());
        notify(&reloading);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, reports) = mpsc::channel();
        let (woken, flag) = (self.loops.woken.clone(), stop.clone());
        let report = move |r: Report| {
            let _ = tx.send(r);
            let _ = woken.wake();
        };
        let spawned = thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || {
                let result = upgrade::hand_over(&plan, &flag, &mut |r| {
                    report(match r {
                        upgrade::Step::Started(pid) => Report::Started(pid),
                        upgrade::Step::Committed(pid) => Report::Committed(pid),
                    })
                });
                report(Report::Finished(result));
            });
        match spawned {
            Ok(_) => self.upgrading = Some(Upgrading { reports, stop }),
            Err(e) => {
                error!("upgrade failed: thread: {e}; still serving");
                notify(&[NotifyState::Ready]);
            }
        }
    }

    /// Acts on what the upgrade thread reported: the commit, then the
    /// outcome. A failed upgrade leaves this process serving (and carries
    /// out a stop asked meanwhile); a successor that died after the commit
    /// is an error.
    fn take_reports(&mut self) {
        let Some(u) = &self.upgrading else {
            return;
        };
        let mut outcome = None;
        loop {
            match u.reports.try_recv() {
                Ok(Report::Started(pid)) => self.newcomer = Some(pid),
                Ok(Report::Committed(pid)) => self.successor = Some(pid),
                Ok(Report::Finished(result)) => outcome = Some(result),
                Err(mpsc::TryRecvError::Empty) => break,
                // Gone without its outcome: the thread panicked (its guard
                // killed the new process; the loops resumed).
                Err(mpsc::TryRecvError::Disconnected) => {
                    outcome.get_or_insert(Err("its thread panicked".into()));
                    break;
                }
            }
        }
        let Some(result) = outcome else {
            return;
        };
        let stop = u.stop.load(Ordering::SeqCst);
        self.upgrading = None;
        self.newcomer = None;
        match result {
            Ok(done) => {
                info!(
                    "upgrade: {} listeners and {} connections handed to pid {}",
                    done.listeners, done.conns, done.pid
                );
                info!("upgrade: the loops were frozen for {:?}", done.frozen);
                self.handed_over = Some(match done.lost {
                    None => Ok(()),
                    Some(e) => {
                        error!("upgrade: {e}: nobody serves the connections now");
                        Err(())
                    }
                });
            }
            Err(e) => {
                error!("upgrade failed: {e}; still serving");
                notify(&[NotifyState::Ready]);
                if stop {
                    self.stop();
                }
            }
        }
    }
}

/// Joins the finished loops: status 0 unless one failed or panicked.
fn join(threads: Vec<thread::JoinHandle<io::Result<()>>>) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!("event loop failed: {e}");
                code = ExitCode::from(1);
            }
            Err(_) => {
                error!("event loop panicked");
                code = ExitCode::from(1);
            }
        }
    }
    code
}

/// Binds every address once per loop: `result[loop][address]`. With several
/// loops each gets its own `SO_REUSEPORT` socket; port 0 is resolved by the
/// first bind and reused by the others. `purpose` names the address in the
/// error (`listen on`, `serve metrics on`).
fn bind_all(
    addrs: &[SocketAddr],
    threads: usize,
    purpose: &str,
) -> Result<Vec<Vec<TcpListener>>, String> {
    let mut per_loop: Vec<Vec<TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    for requested in addrs {
        let mut addr = *requested;
        for listeners in per_loop.iter_mut() {
            let l = listener::bind(addr, threads > 1)
                .map_err(|e| format!("cannot {purpose} {addr}: {e}"))?;
            addr = l.local_addr().map_err(|e| format!("{requested}: {e}"))?;
            listeners.push(l);
        }
    }
    Ok(per_loop)
}

/// Socket activation: every loop accepts on (a duplicate of) each inherited
/// listener; the kernel hands each connection to one of them.
fn share_all(inherited: Vec<TcpListener>, threads: usize) -> Result<Vec<Vec<TcpListener>>, String> {
    (0..threads)
        .map(|_| {
            inherited
                .iter()
                .map(|l| l.try_clone().map_err(|e| format!("inherited socket: {e}")))
                .collect()
        })
        .collect()
}

/// The addresses the listeners really got (port 0 resolved).
fn local_addrs(listeners: &[TcpListener]) -> Result<Vec<SocketAddr>, String> {
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| format!("listener: {e}")))
        .collect()
}

/// Prints `<what> ADDR` per listener to stdout, flushed (SPEC §3).
fn announce(addrs: &[SocketAddr], what: &str) -> Result<(), String> {
    let mut out = io::stdout().lock();
    for addr in addrs {
        writeln!(out, "{what} {addr}").map_err(|e| format!("stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("stdout: {e}"))
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) where the service is.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify: {e}");
    }
}
