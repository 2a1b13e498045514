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
//! `--upgrade-timeout`) kills the new process and unfreezes the old loops,
//! which lost nothing because they touched nothing.
//!
//! The conversation (`old → new`, then back):
//!
//! 1. `→` the offer: [`handover::header`] (magic, format version, loops).
//!    `←` `A` if the new binary reads that version; otherwise it exits
//!    with an error naming both versions, before anything is handed over.
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
//! 6. `←` `S` once the new process has told systemd its `MAINPID` and
//!    written the pid file; then the old process exits.
//!
//! Descriptors cross with their flags: each received one is made
//! close-on-exec at once, so the next upgrade's child inherits only its
//! socket. Times cross as `CLOCK_MONOTONIC` nanoseconds (what `Instant`
//! reads on Linux), so every tick means the same in both processes.

use crate::event_loop::{Frozen, Handed, LoopHandle, Verdict};
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
}

/// Runs one upgrade to its end, on the caller's thread; `stop` is set if a
/// SIGTERM/SIGINT arrives meanwhile. On `Err` every loop serves on.
pub fn hand_over(plan: &Plan, stop: &AtomicBool) -> Result<Done, String> {
    let deadline = Instant::now() + plan.timeout;
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let mut child = spawn(plan, &theirs)?;
    drop(theirs);
    let pid = child.id();
    let mut frozen = Vec::new();
    if let Err(e) = offer_and_send(plan, &ours, deadline, &mut frozen) {
        return Err(abandon(&mut child, frozen, e, plan));
    }
    // The point of no return: from `C` on, the new process serves.
    let stopping = stop.load(Ordering::SeqCst);
    if let Err(e) = (&ours).write_all(&[b'C', u8::from(stopping)]) {
        return Err(abandon(&mut child, frozen, format!("commit: {e}"), plan));
    }
    let done = Done {
        pid,
        listeners: frozen.iter().map(|f| f.listeners.len()).sum(),
        conns: frozen.iter().map(|f| f.conns.len()).sum(),
        frozen: (frozen.iter().map(|f| f.since).min()).map_or(Duration::ZERO, |t| t.elapsed()),
    };
    for f in &frozen {
        let _ = f.verdict.send(Verdict::HandedOver);
    }
    let _ = ours.set_read_timeout(Some(SERVING_WAIT));
    match expect(&ours, b'S') {
        Ok(()) => {}
        Err(e) => warn!("upgrade: pid {pid} serves but did not confirm it: {e}"),
    }
    if !stopping && stop.load(Ordering::SeqCst) {
        // The signal came after the commit: pass it on to whoever serves.
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    Ok(done)
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
fn offer_and_send(
    plan: &Plan,
    ours: &UnixStream,
    deadline: Instant,
    frozen: &mut Vec<Frozen>,
) -> Result<(), String> {
    let within = |what: &str| -> Result<Duration, String> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("not ready within {:?} ({what})", plan.timeout))
    };
    let timeouts = |d: Duration| {
        let _ = ours.set_read_timeout(Some(d));
        let _ = ours.set_write_timeout(Some(d));
    };
    timeouts(within("offer")?);
    let loops = u32::try_from(plan.loops.len()).expect("at most 1024 loops");
    (&*ours)
        .write_all(&handover::header(loops))
        .map_err(|e| format!("offer: {e}"))?;
    expect(ours, b'A').map_err(|e| format!("offer not taken: {e}"))?;
    for handle in &plan.loops {
        let f = handle
            .freeze()
            .recv_timeout(within("freezing the loops")?)
            .map_err(|_| "a loop did not freeze".to_string())?;
        frozen.push(f);
    }
    let h = Handover {
        loops: frozen.iter().map(describe).collect(),
    };
    let bytes = handover::encode(&h);
    timeouts(within("sending")?);
    let mut w = ours;
    w.write_all(&(bytes.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(&bytes))
        .map_err(|e| format!("sending the hand-over: {e}"))?;
    let fds: Vec<RawFd> = frozen.iter().flat_map(descriptors).collect();
    for batch in fds.chunks(BATCH) {
        ours.send_with_fd(&[batch.len() as u8], batch)
            .map_err(|e| format!("sending descriptors: {e}"))?;
    }
    debug!(
        "upgrade: sent {} bytes and {} descriptors",
        bytes.len(),
        fds.len()
    );
    timeouts(within("waiting for ready")?);
    expect(ours, b'R').map_err(|e| format!("not ready: {e}"))
}

/// A failed upgrade before the commit: the new process is killed (it
/// never served), the loops are told to resume. Returns the reason, with
/// how the new process ended when it ended on its own.
fn abandon(child: &mut Child, frozen: Vec<Frozen>, why: String, plan: &Plan) -> String {
    // A child that closed the channel is usually exiting: give it a moment
    // to say how it ended.
    let mut ended = None;
    for _ in 0..20 {
        ended = child.try_wait().ok().flatten();
        if ended.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    for f in frozen {
        let _ = f.verdict.send(Verdict::Resume);
    }
    let (pid, program) = (child.id(), plan.program.display());
    match ended {
        Some(status) => format!("pid {pid} ({program}) ended before taking over: {status} ({why})"),
        None => format!(
            "pid {pid} ({program}) did not take over within {:?} ({why}); killed it",
            plan.timeout
        ),
    }
}

/// Reads one byte and checks it.
fn expect(stream: &UnixStream, want: u8) -> Result<(), String> {
    let mut b = [0u8];
    match (&*stream).read_exact(&mut b) {
        Ok(()) if b[0] == want => Ok(()),
        Ok(()) => Err(format!("unexpected byte {:#04x}", b[0])),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err("the new process closed the channel".into())
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err("timed out".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A frozen loop as the hand-over format describes it.
fn describe(f: &Frozen) -> LoopState {
    LoopState {
        clock_origin_ns: to_monotonic(f.clock.origin()),
        tick_ns: u64::try_from(f.clock.tick().as_nanos()).unwrap_or(u64::MAX),
        counters: f.counters,
        listeners: f.listeners.iter().map(|&(_, s)| s).collect(),
        conns: (f.conns.iter())
            .map(|(_, kind, saved)| ConnState {
                kind: *kind,
                saved: saved.clone(),
            })
            .collect(),
    }
}

/// A frozen loop's descriptors in the order [`describe`] lists them.
fn descriptors(f: &Frozen) -> impl Iterator<Item = RawFd> + '_ {
    let listeners = f.listeners.iter().map(|&(fd, _)| fd);
    listeners.chain(f.conns.iter().map(|&(fd, _, _)| fd))
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
    /// The channel named by [`ENV`], with the offer read and accepted;
    /// `None` when this process was not started by an upgrade. The variable
    /// is removed, so children of ours do not take it for theirs. An offer
    /// in another format version is refused: the error names both.
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
        (&stream)
            .write_all(b"A")
            .map_err(|e| format!("answering the offer: {e}"))?;
        Ok(Some(Incoming {
            stream,
            loops: loops as usize,
            from: std::os::unix::process::parent_id(),
        }))
    }

    /// Step 3: the hand-over and its descriptors, sorted per loop.
    pub fn receive(&mut self) -> Result<Vec<Arrived>, String> {
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
                handed.listeners.push((fd.into(), service));
            }
            for c in l.conns {
                let fd = fds.next().expect("a descriptor per connection");
                handed.conns.push((fd.into(), c.kind, c.saved));
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
    /// for its commit. `Ok(true)`: commit, and shut down at once.
    pub fn ready(&mut self) -> Result<bool, String> {
        (&self.stream)
            .write_all(b"R")
            .map_err(|e| format!("saying ready: {e}"))?;
        let mut commit = [0u8; 2];
        match (&self.stream).read_exact(&mut commit) {
            Ok(()) if commit[0] == b'C' => Ok(commit[1] == 1),
            Ok(()) => Err(format!("unexpected byte {:#04x}", commit[0])),
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
