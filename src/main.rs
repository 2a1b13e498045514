//! The `echoloop` binary: command line to running loops, and exit status.
//!
//! Start-up order: parse (exit 2 on bad arguments, clap's convention), set
//! up logging, raise `RLIMIT_NOFILE`, judge the values against it (exit 2
//! for too many loops), take the listeners systemd passed or bind every
//! listener of every loop, print `Echoing on ADDR` per address, start one
//! thread per loop, tell systemd `READY=1`, then wait for signals. The
//! first SIGINT/SIGTERM tells systemd `STOPPING=1` and asks every loop to
//! shut down gracefully (exit 0 when they are done); a second one exits at
//! once with status 1.
//!
//! A failure to start is one `echoloop: ...` line on stderr naming what
//! failed (the listen address, the metrics address, the systemd sockets),
//! and exit status 1.

use clap::CommandFactory;
use echoloop::config::{self, Cli, Config};
use echoloop::event_loop::{EventLoop, Shared, ShutdownHandle};
use echoloop::listener;
use echoloop::metrics::Counters;
use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

const SIGNALS: Token = Token(0);
const LOOP_EXITED: Token = Token(1);

fn main() -> ExitCode {
    let cli = Cli::from_args();
    init_logging(&cli);
    match run(&cli) {
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
fn run(cli: &Cli) -> Result<ExitCode, String> {
    let inherited = take_inherited()?;
    // Handlers first: a signal that comes once `Echoing on` is printed
    // must find them installed.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("signals: {e}"))?;
    let (cfg, fd_limit) = configure(cli)?;
    let (echo, metrics) = bind(cli, cfg.threads, inherited)?;
    // After binding, so that a failure to start is the only line printed.
    info!(
        "open-file limit {fd_limit}, max connections {}, {} loop(s)",
        cfg.max_connections, cfg.threads
    );
    let echo_addrs = local_addrs(&echo[0])?;
    let metrics_addrs = match &metrics {
        Some(m) => local_addrs(&m[0])?,
        None => Vec::new(),
    };
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| format!("signals: {e}"))?;
    let loops = start_loops(&cfg, echo, metrics, &poll)?;
    // Only now, with every descriptor of the process open and the loops
    // running, do we say where we serve.
    announce(&echo_addrs, "Echoing on")?;
    announce(&metrics_addrs, "Metrics on")?;
    notify(NotifyState::Ready);
    if let Some(code) = wait_for_signals(&mut poll, &mut signals, &loops)? {
        return Ok(code);
    }
    Ok(join(loops.threads))
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

/// Listeners indexed `[loop][address]`.
type PerLoop = Vec<Vec<TcpListener>>;

/// Every listener of every loop: echo, and metrics when `--metrics` is
/// given. Socket activation replaces `--listen` (with a warning when it
/// was given).
fn bind(
    cli: &Cli,
    threads: usize,
    inherited: Vec<TcpListener>,
) -> Result<(PerLoop, Option<PerLoop>), String> {
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
    let metrics = match cli.metrics {
        Some(addr) => Some(bind_all(&[addr], threads, "serve metrics on")?),
        None => None,
    };
    Ok((echo, metrics))
}

/// The running loops: their threads, their shutdown handles, and how the
/// main thread learns that they have finished.
struct Loops {
    threads: Vec<thread::JoinHandle<io::Result<()>>>,
    handles: Vec<ShutdownHandle>,
    /// Loops whose `run` has returned; each one also wakes `poll`.
    finished: Arc<AtomicUsize>,
    /// The waker they use, held here too: if the last loop's copy closed
    /// the eventfd, its pending wake would leave the poll with it.
    _exited: Arc<Waker>,
}

/// One thread per loop, each with its listeners, sharing the counters and
/// the connection count; a loop that returns wakes the main `poll`.
fn start_loops(
    cfg: &Arc<Config>,
    echo: PerLoop,
    metrics: Option<PerLoop>,
    poll: &Poll,
) -> Result<Loops, String> {
    let exited = Arc::new(Waker::new(poll.registry(), LOOP_EXITED).map_err(|e| e.to_string())?);
    let finished = Arc::new(AtomicUsize::new(0));
    let shared = Shared {
        cfg: cfg.clone(),
        counters: (0..cfg.threads)
            .map(|_| Arc::new(Counters::new()))
            .collect(),
        live: Arc::new(AtomicUsize::new(0)),
    };
    let mut loops = Loops {
        threads: Vec::new(),
        handles: Vec::new(),
        finished: finished.clone(),
        _exited: exited.clone(),
    };
    let mut metrics_per_loop = metrics.map(|m| m.into_iter().map(|mut l| l.remove(0)));
    for (i, listeners) in echo.into_iter().enumerate() {
        let metrics_listener = metrics_per_loop.as_mut().and_then(Iterator::next);
        let event_loop = EventLoop::new(shared.clone(), i, listeners, metrics_listener)
            .map_err(|e| format!("event loop: {e}"))?;
        loops.handles.push(event_loop.shutdown_handle());
        let (exited, finished) = (exited.clone(), finished.clone());
        let t = thread::Builder::new()
            .name(format!("loop-{i}"))
            .spawn(move || {
                let result = event_loop.run();
                // Counted before the wake, so the main thread never misses it.
                finished.fetch_add(1, Ordering::SeqCst);
                let _ = exited.wake();
                result
            })
            .map_err(|e| format!("thread: {e}"))?;
        loops.threads.push(t);
    }
    Ok(loops)
}

/// Waits until every loop has finished. The first SIGINT/SIGTERM asks all
/// of them to shut down gracefully; a second one means exit now (`Some(1)`).
fn wait_for_signals(
    poll: &mut Poll,
    signals: &mut Signals,
    loops: &Loops,
) -> Result<Option<ExitCode>, String> {
    let mut events = Events::with_capacity(8);
    let mut stopping = false;
    while loops.finished.load(Ordering::SeqCst) < loops.threads.len() {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if !events.iter().any(|event| event.token() == SIGNALS) {
            continue;
        }
        for signal in signals.pending() {
            if stopping {
                warn!("second signal ({signal}): exiting now");
                return Ok(Some(ExitCode::from(1)));
            }
            info!("signal {signal}: graceful shutdown");
            stopping = true;
            notify(NotifyState::Stopping);
            loops.handles.iter().for_each(ShutdownHandle::shutdown);
        }
    }
    Ok(None)
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
fn notify(state: NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!("sd_notify: {e}");
    }
}
