//! The `echoloop` binary: command line to running loops, and exit status.
//!
//! Start-up order: parse (exit 2 on bad arguments, clap's convention), set
//! up logging, raise `RLIMIT_NOFILE`, bind every listener of every loop
//! (exit 1 naming the address on failure), print `Echoing on ADDR` per
//! address, start one thread per loop, then wait for signals. The first
//! SIGINT/SIGTERM asks every loop to shut down gracefully (exit 0 when they
//! are done); a second one exits at once with status 1.

use clap::Parser;
use echoloop::config::{Cli, Config};
use echoloop::event_loop::{EventLoop, ShutdownHandle};
use echoloop::listener;
use echoloop::metrics::Counters;
use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread;

const SIGNALS: Token = Token(0);
const LOOP_EXITED: Token = Token(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(&cli) {
        Ok(code) => code,
        Err(msg) => {
            error!("{msg}");
            eprintln!("echoloop: {msg}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(cli: &Cli) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(level) = cli.log_level {
        builder.filter_level(level);
    }
    builder.target(env_logger::Target::Stderr).init();
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    let fd_limit = listener::raise_fd_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let cfg = Arc::new(Config::from_cli(cli, fd_limit));
    let threads = match cli.threads {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    info!(
        "open-file limit {fd_limit}, max connections {}, {threads} loop(s)",
        cfg.max_connections
    );
    if cfg.max_connections + cfg_reserve(cli) > fd_limit as usize {
        warn!(
            "--max-connections {} leaves no descriptor reserve under the open-file limit {fd_limit}",
            cfg.max_connections
        );
    }

    // Every loop binds its own listener per address (SO_REUSEPORT when
    // there are several); port 0 is resolved by the first bind.
    let mut per_loop: Vec<Vec<std::net::TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    let mut stdout = io::stdout().lock();
    for requested in &cli.listen {
        let mut addr = *requested;
        for loop_listeners in per_loop.iter_mut() {
            let l = listener::bind(addr, threads > 1)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            addr = l.local_addr().map_err(|e| format!("{requested}: {e}"))?;
            loop_listeners.push(l);
        }
        writeln!(stdout, "Echoing on {addr}").map_err(|e| format!("stdout: {e}"))?;
    }
    stdout.flush().map_err(|e| format!("stdout: {e}"))?;
    drop(stdout);

    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let exited = Arc::new(Waker::new(poll.registry(), LOOP_EXITED).map_err(|e| e.to_string())?);
    let live = Arc::new(AtomicUsize::new(0));
    let mut handles: Vec<ShutdownHandle> = Vec::new();
    let mut threads_running = Vec::new();
    for (i, listeners) in per_loop.into_iter().enumerate() {
        let counters = Arc::new(Counters::new());
        let event_loop = EventLoop::new(cfg.clone(), listeners, counters, live.clone())
            .map_err(|e| format!("event loop: {e}"))?;
        handles.push(event_loop.shutdown_handle());
        let exited = exited.clone();
        let t = thread::Builder::new()
            .name(format!("loop-{i}"))
            .spawn(move || {
                let result = event_loop.run();
                let _ = exited.wake();
                result
            })
            .map_err(|e| format!("thread: {e}"))?;
        threads_running.push(t);
    }

    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("signals: {e}"))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| format!("signals: {e}"))?;
    let mut events = Events::with_capacity(8);
    let mut stopping = false;
    while !threads_running.iter().all(|t| t.is_finished()) {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for event in events.iter() {
            if event.token() != SIGNALS {
                continue;
            }
            for signal in signals.pending() {
                if stopping {
                    warn!("second signal ({signal}): exiting now");
                    return Ok(ExitCode::from(1));
                }
                info!("signal {signal}: graceful shutdown");
                stopping = true;
                handles.iter().for_each(ShutdownHandle::shutdown);
            }
        }
    }
    let mut code = ExitCode::SUCCESS;
    for t in threads_running {
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
    if !stopping {
        code = ExitCode::from(1);
    }
    Ok(code)
}

/// Descriptors the process needs besides connections.
fn cfg_reserve(cli: &Cli) -> usize {
    cli.listen.len() + echoloop::config::FD_RESERVE
}
