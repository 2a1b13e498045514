//! `echoloop-load`: entry point. Parses the command line, checks what the
//! machine allows, runs the chosen mode on worker threads, samples the
//! server's and its own /proc at the phase boundaries, and prints the
//! report. Exit status: 0 without errors, 1 with any error counted, 2 for
//! bad arguments, 3 for a rate run in which the tool fell behind its own
//! schedule (invalid: it measured the tool).

mod abuse;
mod alarm;
mod check;
mod churn;
mod cli;
mod conn;
mod hgrm;
mod line;
mod net;
mod progress;
mod rate;
mod report;
mod slo;
mod soak;
mod tally;
mod traffic;
mod worker;

use clap::Parser;
use cli::{Cli, Mode};
use echoloop_load::procfs;
use line::LineFormat;
use progress::Bar;
use report::{Connects, Errors, Latency, Rate, Report, Server, Tool};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tally::{ErrorKind, Tally};
use traffic::Schedule;
use worker::{Progress, Settings, Window};

/// Descriptors kept for everything but client sockets (stdio, polls, ...).
const FD_RESERVE: u64 = 64;
/// How often the main thread refreshes the progress line while it waits.
const TICK: Duration = Duration::from_millis(200);
/// In idle mode the workers close their connections this long after the
/// end of the hold, so the closes don't count as server wake-ups.
const HOLD_MARGIN: Duration = Duration::from_millis(200);

fn main() {
    let cli = Cli::parse();
    cli.validate();
    std::process::exit(run(&cli));
}

/// What the main thread measured around the workers.
#[derive(Debug, Default)]
struct Measured {
    /// Time to open all connections (connect mode: the whole run).
    connect_secs: f64,
    window_secs: f64,
    /// This process's CPU over the measured window (connect mode: the run).
    tool_cpu_secs: Option<f64>,
    /// Rate mode: the rate of the run reported (an SLO search's best step),
    /// when it is not --rate.
    asked_rate: Option<f64>,
    server: Option<Server>,
}

/// CPU seconds this process has used so far (all threads, to the
/// nanosecond: /proc's ticks are too coarse for a one-second window).
fn own_cpu() -> Option<f64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Some(t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
}

fn run(cli: &Cli) -> i32 {
    // The soft open-file limit raised to the hard one.
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warning: cannot read the open file limit: {e}");
            u64::MAX
        }
    };
    let sockets = if cli.mode == Mode::Connect {
        cli.concurrency
    } else {
        cli.conns
    } as u64;
    let needed = sockets + FD_RESERVE + 4 * cli.threads as u64;
    if needed > nofile {
        let what = if cli.mode == Mode::Connect {
            "--concurrency"
        } else {
            "--conns"
        };
        Cli::fail(format!(
            "{what} {sockets} needs about {needed} open files, but this process may open only {nofile} \
             (RLIMIT_NOFILE, soft raised to hard): lower {what} or run several load processes"
        ));
    }
    let sources = net::plan_sources(cli.target, cli.conns, cli.sources, cli.spread)
        .unwrap_or_else(|e| Cli::fail(e));
    if let Some(pid) = cli.server_pid
        && !procfs::process_exists(pid)
    {
        Cli::fail(format!(
            "--server-pid {pid}: no such process (/proc/{pid}/stat unreadable)"
        ));
    }
    let settings = Settings {
        target: cli.target,
        sources: sources.clone(),
        format: LineFormat {
            line_len: cli.line_len,
            crlf: cli.crlf,
            proto: cli.proto,
        },
        depth: if cli.mode == Mode::Pipeline {
            cli.depth
        } else {
            1
        },
        rate_per_conn: cli.rate.map(|r| r / cli.conns as f64),
        concurrency: cli.concurrency.div_ceil(cli.threads),
        connect_timeout: cli.connect_timeout,
        grace: cli.grace,
        t0: Instant::now(),
    };
    let progress = Arc::new(Progress::default());
    let bar = Bar::new(cli.quiet);
    let mut soak = None;
    let mut slo_report = None;
    let (tally, measured) = match cli.mode {
        Mode::Connect => drive_connect(cli, &settings, &progress, &bar),
        Mode::Rate if cli.slo.is_some() => {
            let (tally, measured, found) = drive_slo(cli, &settings, &bar);
            slo_report = Some(found);
            (tally, measured)
        }
        Mode::Soak => {
            let limits = abuse::Limits {
                idle_timeout: cli.idle_timeout,
                max_line: cli.max_line,
                max_pending_output: cli.max_pending_output,
            };
            let until = Instant::now() + cli.warmup + cli.secs;
            let running = soak::start(
                cli.target,
                limits,
                cli.proto,
                cli.abusers,
                cli.conns,
                until,
                cli.server_pid,
            );
            let (tally, measured) = drive_traffic(cli, &settings, &progress, &bar);
            bar.set("soak: checking the server".into());
            let good_max = tally.longest_wait;
            let unanswered = tally.count(ErrorKind::Missing);
            soak = Some(soak::finish(running, good_max, unanswered));
            (tally, measured)
        }
        _ => drive_traffic(cli, &settings, &progress, &bar),
    };
    bar.finish();

    let mut report = build_report(cli, sources.len().max(1), &tally, measured);
    if let Some(s) = soak {
        for why in &s.broken {
            eprintln!("broken [soak] {why}");
        }
        report.ok &= s.broken.is_empty();
        report.soak = Some(s);
    }
    if let Some(found) = slo_report {
        if found.best_rate.is_none() {
            eprintln!(
                "echoloop-load: no rate tried kept {} (the report is the last step's)",
                found.bound
            );
            report.ok = false;
        }
        report.slo = Some(found);
    }
    for line in report::error_lines(&tally) {
        eprintln!("{line}");
    }
    if tally.samples.len() < tally.total_errors() as usize {
        eprintln!(
            "({} errors in all; only the first ones are shown)",
            tally.total_errors()
        );
    }
    if let Some(path) = &cli.hgrm
        && let Err(e) = hgrm::write(path, &tally.latency)
    {
        eprintln!("error: writing --hgrm {}: {e}", path.display());
        return 1;
    }
    if cli.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: encoding the report: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", report.table());
    }
    // The verdict last, under the table, where a reader's eye ends.
    if let Some(why) = &report.stopped_early {
        eprintln!("echoloop-load: {why}");
    }
    match &report.rate {
        _ if !report.ok => 1,
        Some(r) if !r.valid => {
            eprintln!(
                "echoloop-load: invalid run: the tool sent late (p99 {:.0} us, allowed {:.0} us), \
                 so the latency measures the tool: lower --rate or add --threads",
                r.lateness_us.p99, r.max_lateness_us
            );
            3
        }
        _ => 0,
    }
}

/// Why the run ended before its time, if it did: every connection failed
/// to connect, or the server answers in the other protocol.
fn stopped_early(cli: &Cli, tally: &Tally) -> Option<String> {
    if let Some(p) = tally.wrong_proto {
        let p = p.name();
        return Some(format!("the server answers in {p} mode: try --proto {p}"));
    }
    if tally.connects_ok == 0 && tally.connects_attempted > 0 {
        let first = tally
            .samples
            .iter()
            .find(|s| s.kind == ErrorKind::Connect)
            .map(|s| format!(" (first: {})", s.detail))
            .unwrap_or_default();
        return Some(format!(
            "none of the {} connections to {} could be established{first}: is the server listening there?",
            tally.connects_attempted, cli.target
        ));
    }
    None
}

/// The connection ids of thread `t` of `threads`: t, t + threads, ...
fn ids_of(t: usize, threads: usize, conns: usize) -> Vec<u32> {
    (t..conns).step_by(threads).map(|i| i as u32).collect()
}

/// Sleeps until `deadline`, refreshing the progress line.
fn wait_until(deadline: Instant, bar: &Bar, progress: &Progress, label: &str) {
    let mut last = (Instant::now(), progress.replies.load(Ordering::Relaxed));
    loop {
        let now = Instant::now();
        if now >= deadline || progress.halted() {
            return;
        }
        std::thread::sleep(TICK.min(deadline - now));
        let replies = progress.replies.load(Ordering::Relaxed);
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        bar.set(format!(
            "{label}: {} connected, {:.0} replies/s",
            progress.connected.load(Ordering::Relaxed),
            (replies - last.1) as f64 / dt
        ));
        last = (Instant::now(), replies);
    }
}

/// Joins worker threads and merges their tallies (a panicked thread counts
/// as an `io` error).
fn join_all(handles: Vec<JoinHandle<Tally>>, t0: Instant) -> Tally {
    let mut total = Tally::default();
    for h in handles {
        match h.join() {
            Ok(t) => total.merge(&t),
            Err(_) => total.error(ErrorKind::Io, 1, t0.elapsed(), || {
                "a worker thread panicked".into()
            }),
        }
    }
    total
}

/// pingpong, pipeline, rate and idle: open everything, then traffic or
/// hold. Stops after the open phase when no connection could be made or
/// a thread halted the run.
fn drive_traffic(
    cli: &Cli,
    settings: &Settings,
    progress: &Arc<Progress>,
    bar: &Bar,
) -> (Tally, Measured) {
    let pid = cli.server_pid;
    let mut server = pid.map(|pid| Server {
        pid,
        rss_before_bytes: procfs::rss_bytes(pid).ok(),
        ..Server::default()
    });
    let (opened_tx, opened_rx) = mpsc::channel();
    let mut schedule_txs = Vec::new();
    let mut handles = Vec::new();
    for t in 0..cli.threads {
        let (tx, rx) = mpsc::channel();
        schedule_txs.push(tx);
        let (settings, progress, opened) = (settings.clone(), progress.clone(), opened_tx.clone());
        let ids = ids_of(t, cli.threads, cli.conns);
        let idle = cli.mode == Mode::Idle;
        handles.push(std::thread::spawn(move || {
            traffic::run(settings, ids, idle, progress, opened, t, rx)
        }));
    }
    drop(opened_tx);

    // Open phase: wait until every thread has opened its connections.
    let open_start = Instant::now();
    let per_thread = cli.conns.div_ceil(cli.threads);
    let cap = open_start
        + traffic::open_phase_cap(
            per_thread,
            settings.concurrency,
            settings.connect_timeout,
            settings.grace,
        )
        + Duration::from_secs(10);
    let mut opened = 0;
    while opened < cli.threads && Instant::now() < cap {
        match opened_rx.recv_timeout(TICK) {
            Ok(_) => opened += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => bar.set(format!(
                "connecting: {}/{}",
                progress.connected.load(Ordering::Relaxed),
                cli.conns
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let connect_secs = open_start.elapsed().as_secs_f64();
    let none_connected = progress.connected.load(Ordering::Relaxed) == 0;
    if opened < cli.threads || none_connected || progress.halted() {
        for tx in &schedule_txs {
            let _ = tx.send(Schedule::Abort);
        }
        let mut tally = join_all(handles, settings.t0);
        if opened < cli.threads {
            tally.error(ErrorKind::Io, 1, settings.t0.elapsed(), || {
                "the open phase did not finish in time".into()
            });
        }
        return (tally, Measured::default());
    }
    if let (Some(srv), Some(pid)) = (server.as_mut(), pid) {
        srv.rss_after_open_bytes = procfs::rss_bytes(pid).ok();
    }

    let start = Instant::now();
    let mut window_secs = 0.0;
    let mut tool_cpu_secs = None;
    if cli.mode == Mode::Idle {
        let ctx0 = pid.and_then(|p| procfs::context_switches(p).ok());
        let hold_end = start + cli.hold;
        for tx in &schedule_txs {
            let _ = tx.send(Schedule::Hold {
                until: hold_end + HOLD_MARGIN,
            });
        }
        wait_until(hold_end, bar, progress, "holding idle");
        let ctx1 = pid.and_then(|p| procfs::context_switches(p).ok());
        if let (Some(srv), Some(a), Some(b)) = (server.as_mut(), ctx0, ctx1)
            && !cli.hold.is_zero()
        {
            srv.wakeups_per_sec = Some(b.saturating_sub(a) as f64 / cli.hold.as_secs_f64());
        }
    } else {
        let window = Window {
            from: start + cli.warmup,
            to: start + cli.warmup + cli.secs,
        };
        for tx in &schedule_txs {
            let _ = tx.send(Schedule::Traffic {
                window,
                stop_sending: window.to,
                deadline: window.to + cli.grace,
            });
        }
        wait_until(window.from, bar, progress, "warming up");
        let cpu0 = pid.and_then(|p| procfs::cpu_seconds(p).ok());
        let own0 = own_cpu();
        wait_until(window.to, bar, progress, "measuring");
        let cpu1 = pid.and_then(|p| procfs::cpu_seconds(p).ok());
        tool_cpu_secs = own0.zip(own_cpu()).map(|(a, b)| b - a);
        window_secs = (window.to - window.from).as_secs_f64();
        if let (Some(srv), Some(a), Some(b)) = (server.as_mut(), cpu0, cpu1) {
            srv.cpu_secs = Some(b - a);
        }
        bar.set("waiting for the last replies".into());
    }
    let tally = join_all(handles, settings.t0);
    if let Some(srv) = server.as_mut() {
        if let Some(cpu) = srv.cpu_secs
            && tally.window_replies > 0
        {
            srv.cpu_us_per_reply = Some(cpu * 1e6 / tally.window_replies as f64);
        }
        if let (Some(a), Some(b)) = (srv.rss_before_bytes, srv.rss_after_open_bytes)
            && tally.connects_ok > 0
        {
            srv.rss_growth_per_conn_bytes = Some((b as f64 - a as f64) / tally.connects_ok as f64);
        }
    }
    (
        tally,
        Measured {
            connect_secs,
            window_secs,
            tool_cpu_secs,
            asked_rate: None,
            server,
        },
    )
}

/// rate --slo: rate runs, each a whole `drive_traffic`, as `slo::Search`
/// asks; returns the best passing step (else the last one) and the steps.
fn drive_slo(cli: &Cli, settings: &Settings, bar: &Bar) -> (Tally, Measured, slo::SloReport) {
    let Some(bound) = cli.slo else {
        unreachable!("drive_slo runs only with --slo")
    };
    let mut search = slo::Search::default();
    let mut rate = cli.rate.unwrap_or(1.0);
    let mut steps = Vec::new();
    let mut best: Option<(f64, Tally, Measured)> = None;
    let mut last = None;
    for n in 1..=slo::MAX_STEPS {
        bar.set(format!("slo step {n}: {rate:.0} lines/s"));
        let step_settings = Settings {
            rate_per_conn: Some(rate / cli.conns as f64),
            ..settings.clone()
        };
        let progress = Arc::new(Progress::default());
        let (tally, m) = drive_traffic(cli, &step_settings, &progress, bar);
        let at = |h: &hdrhistogram::Histogram<u64>, q: f64| {
            (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
        };
        let latency_us = at(&tally.latency, bound.quantile);
        let valid =
            at(&tally.lateness, 0.99).is_some_and(|l| l <= cli.max_lateness.as_secs_f64() * 1e6);
        let passed = tally.total_errors() == 0
            && valid
            && latency_us.is_some_and(|l| l <= bound.bound.as_secs_f64() * 1e6);
        steps.push(slo::Step {
            rate,
            latency_us: latency_us.unwrap_or(0.0),
            errors: tally.total_errors(),
            valid,
            passed,
        });
        let stopped = tally.wrong_proto.is_some() || tally.connects_ok == 0;
        let next = search.step(rate, passed);
        if passed {
            best = Some((rate, tally, m));
        } else {
            last = Some((rate, tally, m));
        }
        match next {
            Some(r) if !stopped => rate = r,
            _ => break,
        }
    }
    let best_rate = best.as_ref().map(|b| b.0);
    let (asked, tally, mut m) = best.or(last).expect("the search ran at least one step");
    m.asked_rate = Some(asked);
    let found = slo::SloReport {
        bound: format!("{}={}", bound.name, humantime::format_duration(bound.bound)),
        steps,
        best_rate,
    };
    (tally, m, found)
}

/// connect: churn through --conns connections, --concurrency at a time.
fn drive_connect(
    cli: &Cli,
    settings: &Settings,
    progress: &Arc<Progress>,
    bar: &Bar,
) -> (Tally, Measured) {
    let pid = cli.server_pid;
    let cpu0 = pid.and_then(|p| procfs::cpu_seconds(p).ok());
    let own0 = own_cpu();
    let start = Instant::now();
    let deadline = start + cli.secs;
    let handles: Vec<JoinHandle<Tally>> = (0..cli.threads)
        .map(|t| {
            let (settings, progress) = (settings.clone(), progress.clone());
            let ids = ids_of(t, cli.threads, cli.conns);
            std::thread::spawn(move || churn::run(settings, ids, progress, deadline))
        })
        .collect();
    // The workers stop by their deadline; allow a margin for the last turn.
    let hard = deadline + Duration::from_secs(2);
    while !handles.iter().all(|h| h.is_finished()) && Instant::now() < hard {
        std::thread::sleep(TICK / 4);
        let done = progress.connected.load(Ordering::Relaxed);
        bar.set(format!(
            "connect: {done}/{} connected, {:.0}/s",
            cli.conns,
            done as f64 / start.elapsed().as_secs_f64().max(1e-3)
        ));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(|p| procfs::cpu_seconds(p).ok());
    let tool_cpu_secs = own0.zip(own_cpu()).map(|(a, b)| b - a);
    let tally = join_all(handles, settings.t0);
    let server = pid.map(|pid| {
        let cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
        Server {
            pid,
            cpu_secs: cpu,
            cpu_us_per_conn: cpu
                .filter(|_| tally.completed > 0)
                .map(|c| c * 1e6 / tally.completed as f64),
            ..Server::default()
        }
    });
    (
        tally,
        Measured {
            connect_secs: elapsed,
            window_secs: elapsed,
            tool_cpu_secs,
            asked_rate: None,
            server,
        },
    )
}

fn build_report(cli: &Cli, sources: usize, tally: &Tally, m: Measured) -> Report {
    let per_sec = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let connect = cli.mode == Mode::Connect;
    let replies = if connect {
        tally.replies
    } else {
        tally.window_replies
    };
    let per = |cpu: Option<f64>, n: u64| cpu.filter(|_| n > 0).map(|c| c * 1e6 / n as f64);
    let tool = Tool {
        cpu_secs: m.tool_cpu_secs,
        cpu_us_per_reply: (!connect).then(|| per(m.tool_cpu_secs, replies)).flatten(),
        cpu_us_per_conn: connect
            .then(|| per(m.tool_cpu_secs, tally.completed))
            .flatten(),
    };
    let rate = m.asked_rate.or(cli.rate).map(|asked| {
        let lateness_us = Latency::of(&tally.lateness);
        let max_lateness_us = cli.max_lateness.as_secs_f64() * 1e6;
        Rate {
            asked_per_sec: asked,
            sent_per_sec: per_sec(tally.window_sent, m.window_secs),
            valid: lateness_us.p99 <= max_lateness_us,
            lateness_us,
            max_lateness_us,
        }
    });
    let errors = Errors::of(tally);
    let stopped_early = stopped_early(cli, tally);
    Report {
        mode: cli.mode,
        proto: cli.proto,
        target: cli.target.to_string(),
        conns: cli.conns,
        depth: (cli.mode == Mode::Pipeline).then_some(cli.depth),
        line_len: cli.line_len,
        threads: cli.threads,
        sources,
        warmup_secs: if connect {
            0.0
        } else {
            cli.warmup.as_secs_f64()
        },
        window_secs: m.window_secs,
        hold_secs: (cli.mode == Mode::Idle).then_some(cli.hold.as_secs_f64()),
        replies,
        replies_total: tally.replies,
        replies_per_sec: per_sec(replies, m.window_secs),
        latency_us: (cli.mode != Mode::Idle).then(|| Latency::of(&tally.latency)),
        latency_uncorrected_us: (cli.mode == Mode::Rate)
            .then(|| Latency::of(&tally.latency_uncorrected)),
        rate,
        connects: Connects {
            attempted: tally.connects_attempted,
            established: tally.connects_ok,
            completed: connect.then_some(tally.completed),
            per_sec: per_sec(tally.connects_ok, m.connect_secs),
            latency_us: Latency::of(&tally.connect_latency),
        },
        tool,
        server: m.server,
        ok: errors.total == 0,
        errors,
        stopped_by_time_limit: connect
            && tally.connects_attempted < cli.conns as u64
            && stopped_early.is_none(),
        stopped_early,
        soak: None,
        slo: None,
    }
}
