//! Live upgrade between two processes: the old one hands every listener
//! and every connection, with its state, to a new binary over a unix
//! socket, and falls back to serving on if the new one cannot take over.
//!
//! The process model is fork and exec: the old process starts the new
//! binary (the path it was itself started from, the same arguments) with
//! one end of a socket pair in `ECHOLOOP_UPGRADE_FD`, and stays the
//! fallback until the new one has everything and says it is ready. Until
//! the old one answers *commit*, the new one reads and writes no socket,
//! so there is never a moment when both serve or neither can; until then
//! any failure (cannot start, exits, refuses the format, not ready within
//! `--upgrade-timeout`, a stop signal) unfreezes the old loops, which lost
//! nothing because they touched nothing, and kills the new process. Every
//! wait on the new process is cut into 50 ms slices (`STOP_CHECK`), so none
//! outlasts the timeout or a stop signal by more than one.
//!
//! The conversation (`old → new`, then back):
//!
//! 1. `→` the offer: [`handover::header`] (magic, format version, loops).
//!    The new binary reads it first thing; if it does not read that
//!    version it exits with an error naming both, before anything is
//!    handed over. Otherwise it starts up as far as it can without the
//!    sockets (command line, logging, limits, signals, its poll), then
//!    `←` `A`: its start-up is not part of the pause.
//! 2. The old process freezes every loop ([`LoopHandle::freeze`]) between
//!    two of its turns.
//! 3. `→` the hand-over's length (`u64`) and bytes ([`handover::encode`]),
//!    then every descriptor it lists, in order, `SCM_RIGHTS` batches of at
//!    most [`BATCH`], each with a one-byte message holding its count.
//! 4. The new process builds its loops (registered, not yet running).
//!    `←` `R`.
//! 5. `→` `C` and one byte: 1 if the old process was asked to stop
//!    meanwhile (the new one then shuts down gracefully at once). From
//!    here the new process serves; the old loops close their copies of the
//!    descriptors (which ends no connection) and return.
//! 6. `←` `S` once the new process has written the pid file and told
//!    systemd its `MAINPID`; then the old process exits (with status 1 if
//!    the channel closed instead: the new process died, nobody serves).
//!
//! Descriptors arrive without close-on-exec (`SCM_RIGHTS` does not carry
//! it; `O_NONBLOCK` is shared, it belongs to the socket): each is made
//! close-on-exec at once, so the next upgrade's child inherits only its
//! channel. Times cross as `CLOCK_MONOTONIC` nanoseconds (what `Instant`
//! reads on Linux), so every tick means the same in both processes.

use crate::event_loop::{Frozen, Handed, HandedConn, HandedListener, LoopHandle, Verdict};
use crate::handover::{self, ConnState, HEADER_LEN, Handover, LoopState};
use crate::metrics::Snapshot;
use crate::timer::Clock;
use log::{debug, warn};
use sendfd::{RecvWithFd, SendWithFd};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that names the new process's end of the
/// socket pair.
pub const ENV: &str = "ECHOLOOP_UPGRADE_FD";

/// Descriptors per `SCM_RIGHTS` message (the kernel takes at most 253).
pub const BATCH: usize = 250;

/// How long the old process waits for `S` after committing (the new one
/// serves already; this only orders the exit after systemd's `MAINPID`).
const SERVING_WAIT: Duration = Duration::from_secs(5);

/// What an upgrade needs from the old process.
#[derive(Clone)]
pub struct Plan {
    /// The binary to start (the path this process was started from).
    pub program: PathBuf,
    /// Its arguments (this process's own).
    pub args: Vec<OsString>,
    /// How long it may take to be ready.
    pub timeout: Duration,
    /// Every loop of this process, in order.
    pub loops: Vec<LoopHandle>,
}

/// A finished hand-over.
#[derive(Debug)]
pub struct Done {
    /// The process that serves now.
    pub pid: u32,
    /// Listening sockets handed over.
    pub listeners: usize,
    /// Connections handed over.
    pub conns: usize,
    /// How long the loops were frozen, from the first to freeze until the
    /// commit: the pause every client saw (besides waiting for its turn).
    pub frozen: Duration,
    /// Set when the new process ended after the commit, before saying it
    /// serves: then nobody serves, and this process must say so.
    pub lost: Option<String>,
}

/// The moments of an upgrade the caller hears of as they happen.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// The new process (this pid) runs; it serves nothing yet.
    Started(u32),
    /// It serves from now on.
    Committed(u32),
}

/// Runs one upgrade to its end, on the caller's thread. `stop` is set when
/// a SIGTERM/SIGINT arrives meanwhile: before the commit it abandons the
/// upgrade (this process then stops); at the commit the new process is
/// told to stop. `step` hears of the start and the commit. On `Err` every
/// loop serves on.
pub fn hand_over(
    plan: &Plan,
    stop: &AtomicBool,
    step: &mut dyn FnMut(Step),
) -> Result<Done, String> {
    let deadline = Instant::now() + plan.timeout;
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let mut child = Spawned(Some(spawn(plan, &theirs)?));
    drop(theirs);
    let pid = child.id();
    step(Step::Started(pid));
    let mut frozen = Vec::new();
    let sent = match offer_and_send(plan, &ours, deadline, stop, &mut frozen) {
        Ok(sent) => sent,
        Err(e) => return Err(abandon(child, frozen, e, plan)),
    };
    // The point of no return: from `C` on, the new process serves.
    let stopping = stop.load(Ordering::SeqCst);
    if let Err(e) = (&ours).write_all(&[b'C', u8::from(stopping)]) {
        return Err(abandon(child, frozen, format!("commit: {e}"), plan));
    }
    child.release();
    step(Step::Committed(pid));
    let frozen_for = (frozen.iter().map(|f| f.since).min()).map_or(Duration::ZERO, |t| t.elapsed());
    for f in &frozen {
        let _ = f.verdict.send(Verdict::HandedOver);
    }
    let never = AtomicBool::new(false);
    let lost = match read_byte(&ours, b'S', Instant::now() + SERVING_WAIT, &never) {
        Ok(()) => None,
        Err(Wait::TimedOut) => {
            warn!("upgrade: pid {pid} serves but did not confirm it within {SERVING_WAIT:?}");
            None
        }
        Err(e) => Some(format!("pid {pid} ended after it took over ({e})")),
    };
    if !stopping && stop.load(Ordering::SeqCst) {
        // A stop that came after `C` was written but before the main
        // thread heard of the commit: it is the new process's to carry out.
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    Ok(Done {
        pid,
        listeners: sent.0,
        conns: sent.1,
        frozen: frozen_for,
        lost,
    })
}

/// The new process until the commit: killed and reaped if the upgrade
/// ends any other way, panics included.
struct Spawned(Option<Child>);

impl Spawned {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    /// It serves: it is no longer ours to kill.
    fn release(&mut self) {
        self.0 = None;
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the new binary with `theirs` inherited.
fn spawn(plan: &Plan, theirs: &UnixStream) -> Result<Child, String> {
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args).env(ENV, fd.to_string());
    // SAFETY: only fcntl(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", plan.program.display()))
}

/// Steps 1 to 4: offer, freeze, send, wait for `R`. The frozen loops are
/// collected in `frozen` as they answer, so the caller can unfreeze them.
/// Returns the listeners and connections sent.
fn offer_and_send(
    plan: &Plan,
    ours: &UnixStream,
    deadline: Instant,
    stop: &AtomicBool,
    frozen: &mut Vec<Frozen>,
) -> Result<(usize, usize), String> {
    let within = |what: &str| -> Result<Duration, String> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("timed out {what}"))
    };
    let loops = u32::try_from(plan.loops.len()).expect("at most 1024 loops");
    write_all(ours, &handover::header(loops), deadline, stop).map_err(|e| format!("offer: {e}"))?;
    // The new binary starts up (all it can do without the sockets) before
    // it takes the offer: the loops freeze only after that.
    read_byte(ours, b'A', deadline, stop).map_err(|e| format!("offer not taken: {e}"))?;
    for handle in &plan.loops {
        let f = handle
            .freeze()
            .recv_timeout(within("freezing the loops")?)
            .map_err(|_| "a loop did not freeze".to_string())?;
        frozen.push(f);
    }
    let fds: Vec<RawFd> = frozen.iter().flat_map(descriptors).collect();
    let listeners = frozen.iter().map(|f| f.listeners.len()).sum();
    let h = Handover {
        loops: frozen.iter_mut().map(describe).collect(),
    };
    let bytes = handover::encode(&h);
    drop(h);
    write_all(ours, &(bytes.len() as u64).to_le_bytes(), deadline, stop)
        .and_then(|()| write_all(ours, &bytes, deadline, stop))
        .map_err(|e| format!("sending the hand-over: {e}"))?;
    for batch in fds.chunks(BATCH) {
        retry(ours, deadline, stop, |s| {
            s.send_with_fd(&[batch.len() as u8], batch)
        })
        .map_err(|e| format!("sending descriptors: {e}"))?;
    }
    debug!(
        "upgrade: sent {} bytes and {} descriptors",
        bytes.len(),
        fds.len()
    );
    read_byte(ours, b'R', deadline, stop).map_err(|e| format!("not ready: {e}"))?;
    Ok((listeners, fds.len() - listeners))
}

/// A failed upgrade before the commit: the loops resume at once (the new
/// process never touched a socket), then the new process is killed.
/// Returns the reason, with how the new process ended if it ended itself.
fn abandon(mut child: Spawned, frozen: Vec<Frozen>, why: String, plan: &Plan) -> String {
    for f in frozen {
        let _ = f.verdict.send(Verdict::Resume);
    }
    // A child that closed the channel is usually exiting: give it a moment
    // to say how it ended.
    let mut ended = None;
    if let Some(c) = &mut child.0 {
        for _ in 0..20 {
            ended = c.try_wait().ok().flatten();
            if ended.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let (pid, program) = (child.id(), plan.program.display());
    drop(child);
    match ended {
        Some(status) => format!("pid {pid} ({program}) ended before taking over: {status} ({why})"),
        None => format!("pid {pid} ({program}) did not take over ({why}); killed it"),
    }
}

/// Why a wait for the new process's answer ended without it.
#[derive(Debug)]
enum Wait {
    /// The channel's other end was closed: the new process is gone.
    Closed,
    /// Not within the time allowed.
    TimedOut,
    /// A SIGINT/SIGTERM came: this process is to stop instead.
    Stopped,
    /// Something else.
    Failed(String),
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Closed => f.write_str("the new process closed the channel"),
            Wait::TimedOut => f.write_str("timed out"),
            Wait::Stopped => f.write_str("a stop signal came"),
            Wait::Failed(e) => f.write_str(e),
        }
    }
}

/// How often a wait looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Runs `op` (one read, write or send on the channel) until it does not
/// time out, in slices of [`STOP_CHECK`] up to `until`, giving up early if
/// `stop` is set: no wait on the new process can outlast either.
fn retry<T>(
    stream: &UnixStream,
    until: Instant,
    stop: &AtomicBool,
    mut op: impl FnMut(&UnixStream) -> io::Result<T>,
) -> Result<T, Wait> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(Wait::Stopped);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Wait::TimedOut);
        }
        let slice = Some(left.min(STOP_CHECK));
        let _ = stream.set_read_timeout(slice);
        let _ = stream.set_write_timeout(slice);
        match op(stream) {
            Ok(t) => return Ok(t),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Wait::Closed),
            Err(e) => return Err(Wait::Failed(e.to_string())),
        }
    }
}

/// Reads one byte and checks it (see [`retry`]).
fn read_byte(stream: &UnixStream, want: u8, until: Instant, stop: &AtomicBool) -> Result<(), Wait> {
    let mut b = [0u8];
    match retry(stream, until, stop, |mut s| s.read(&mut b))? {
        0 => Err(Wait::Closed),
        _ if b[0] == want => Ok(()),
        _ => Err(Wait::Failed(format!("unexpected byte {:#04x}", b[0]))),
    }
}

/// Writes all of `bytes` (see [`retry`]).
fn write_all(
    stream: &UnixStream,
    mut bytes: &[u8],
    until: Instant,
    stop: &AtomicBool,
) -> Result<(), Wait> {
    while !bytes.is_empty() {
        match retry(stream, until, stop, |mut s| s.write(bytes))? {
            0 => return Err(Wait::Closed),
            n => bytes = &bytes[n..],
        }
    }
    Ok(())
}

/// A frozen loop as the hand-over format describes it (its connections'
/// states are moved out, not copied: they can be large).
fn describe(f: &mut Frozen) -> LoopState {
    LoopState {
        clock_origin_ns: to_monotonic(f.clock.origin()),
        tick_ns: u64::try_from(f.clock.tick().as_nanos()).unwrap_or(u64::MAX),
        counters: f.counters,
        listeners: f.listeners.iter().map(|l| l.service).collect(),
        conns: (f.conns.drain(..))
            .map(|c| ConnState {
                kind: c.kind,
                saved: c.saved,
            })
            .collect(),
    }
}

/// A frozen loop's descriptors in the order [`describe`] lists them.
fn descriptors(f: &Frozen) -> impl Iterator<Item = RawFd> + '_ {
    let listeners = f.listeners.iter().map(|l| l.socket);
    listeners.chain(f.conns.iter().map(|c| c.socket))
}

// ----- the new process's side ---------------------------------------------

/// This process's channel to the old one, when a live upgrade started it.
pub struct Incoming {
    stream: UnixStream,
    /// The number of loops to run (the old process's `--threads`).
    pub loops: usize,
    /// The old process.
    pub from: u32,
}

/// One loop's part of what arrived: its sockets and its counters.
pub struct Arrived {
    /// Listeners, connections and clock, for `EventLoop::take_over`.
    pub handed: Handed,
    /// The counters to continue from.
    pub counters: Snapshot,
}

impl Incoming {
    /// The channel named by [`ENV`], with the offer read (not answered yet:
    /// see [`Incoming::take`]); `None` when this process was not started
    /// by an upgrade. The variable is removed, so children of ours do not
    /// take it for theirs. An offer in another format version is refused:
    /// the error names both.
    pub fn from_env() -> Result<Option<Incoming>, String> {
        let Some(value) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        // SAFETY: called first thing in main, single-threaded.
        unsafe { std::env::remove_var(ENV) };
        let fd: RawFd = (value.to_str().and_then(|v| v.parse().ok()))
            .ok_or_else(|| format!("{ENV}={value:?} is not a descriptor"))?;
        set_cloexec(fd).map_err(|e| format!("{ENV}={fd}: {e}"))?;
        // SAFETY: the old process passed this descriptor for us alone.
        let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut header = [0u8; HEADER_LEN];
        (&stream)
            .read_exact(&mut header)
            .map_err(|e| format!("reading the offer: {e}"))?;
        let loops = handover::read_header(&header).map_err(|e| e.to_string())?;
        Ok(Some(Incoming {
            stream,
            loops: loops as usize,
            from: std::os::unix::process::parent_id(),
        }))
    }

    /// Takes the offer once this process has started up as far as it can
    /// without the sockets (the old process freezes its loops when it
    /// reads the answer, so the pause does not include our start-up), then
    /// step 3: the hand-over and its descriptors, sorted per loop.
    pub fn take(&mut self) -> Result<Vec<Arrived>, String> {
        (&self.stream)
            .write_all(b"A")
            .map_err(|e| format!("answering the offer: {e}"))?;
        let mut len = [0u8; 8];
        (&self.stream)
            .read_exact(&mut len)
            .map_err(|e| format!("reading the hand-over: {e}"))?;
        let len = u64::from_le_bytes(len);
        let mut bytes = Vec::new();
        (&self.stream)
            .take(len)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the hand-over: {e}"))?;
        if bytes.len() as u64 != len {
            return Err("the hand-over was cut short".into());
        }
        let h = handover::decode(&bytes).map_err(|e| e.to_string())?;
        if h.loops.len() != self.loops {
            return Err("the hand-over does not match its offer".into());
        }
        let mut fds = self.receive_fds(h.descriptors())?.into_iter();
        let mut arrived = Vec::new();
        for l in h.loops {
            let clock = Clock::with_origin(
                from_monotonic(l.clock_origin_ns),
                Duration::from_nanos(l.tick_ns),
            );
            let mut handed = Handed {
                listeners: Vec::new(),
                conns: Vec::new(),
                clock,
            };
            // `descriptors()` counted exactly these.
            for service in l.listeners {
                let fd = fds.next().expect("a descriptor per listener");
                handed.listeners.push(HandedListener {
                    socket: fd.into(),
                    service,
                });
            }
            for c in l.conns {
                let fd = fds.next().expect("a descriptor per connection");
                handed.conns.push(HandedConn {
                    socket: fd.into(),
                    kind: c.kind,
                    saved: c.saved,
                });
            }
            arrived.push(Arrived {
                handed,
                counters: l.counters,
            });
        }
        Ok(arrived)
    }

    /// Receives `n` descriptors, each made close-on-exec at once.
    fn receive_fds(&self, n: usize) -> Result<Vec<OwnedFd>, String> {
        let mut got = Vec::with_capacity(n);
        let mut raw = [0 as RawFd; BATCH];
        while got.len() < n {
            let want = (n - got.len()).min(BATCH);
            let mut count = [0u8];
            let (bytes, fds) = (self.stream)
                .recv_with_fd(&mut count, &mut raw[..want])
                .map_err(|e| format!("receiving descriptors: {e}"))?;
            // SAFETY: the kernel just installed these descriptors for us.
            got.extend(
                raw[..fds]
                    .iter()
                    .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
            for fd in &got[got.len() - fds..] {
                set_cloexec(fd.as_raw_fd()).map_err(|e| format!("received descriptor: {e}"))?;
            }
            if bytes == 0 {
                return Err("the old process closed the channel".into());
            }
            if count[0] as usize != fds {
                return Err(format!("a batch of {} arrived as {fds}", count[0]));
            }
        }
        Ok(got)
    }

    /// Steps 4 and 5: tells the old process this one is ready, and waits
    /// for its commit. `Ok(true)`: commit, and shut down at once. If the
    /// old process died meanwhile (we were reparented), its loops were
    /// frozen and this process holds everything: it serves.
    pub fn ready(&mut self) -> Result<bool, String> {
        let mut commit = [0u8; 2];
        let answer = (&self.stream)
            .write_all(b"R")
            .and_then(|()| (&self.stream).read_exact(&mut commit));
        match answer {
            Ok(()) if commit[0] == b'C' => Ok(commit[1] == 1),
            Ok(()) => Err(format!("unexpected byte {:#04x}", commit[0])),
            Err(_) if std::os::unix::process::parent_id() != self.from => {
                warn!(
                    "upgrade: the old process (pid {}) is gone: serving what it handed over",
                    self.from
                );
                Ok(false)
            }
            Err(e) => Err(format!("no commit from the old process: {e}")),
        }
    }

    /// Step 6: this process serves; the old one may exit.
    pub fn serving(self) {
        if let Err(e) = (&self.stream).write_all(b"S") {
            warn!("upgrade: could not tell pid {} we serve: {e}", self.from);
        }
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
fn monotonic_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// An `Instant` of this process as `CLOCK_MONOTONIC` nanoseconds.
fn to_monotonic(at: Instant) -> u64 {
    let (now, mono) = (Instant::now(), monotonic_now());
    let ago = u64::try_from(now.saturating_duration_since(at).as_nanos()).unwrap_or(u64::MAX);
    mono.saturating_sub(ago)
}

/// `CLOCK_MONOTONIC` nanoseconds as an `Instant` of this process.
fn from_monotonic(ns: u64) -> Instant {
    let (now, mono) = (Instant::now(), monotonic_now());
    now.checked_sub(Duration::from_nanos(mono.saturating_sub(ns)))
        .unwrap_or(now)
}
