//! The abusive clients of `soak` mode, each kind on its own thread with a
//! plain blocking socket, repeating its abuse until the soak ends and
//! checking, each time, the outcome the server promises (SPEC sections 1
//! and 2). A broken promise is described and counted; the kinds whose harm
//! shows only on the server (memory, descriptors, starving the good
//! clients) are checked by `soak` around them.

use crate::line::{Head, LineFormat, Proto, reply_to, show};
use crate::tally::ErrorKind;
use socket2::SockRef;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The abuses, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Half a line, then a reset (SO_LINGER 0): nothing to check here; the
    /// server must simply go on (good clients, descriptors).
    Reset,
    /// Bytes without a newline, one at a time: closed at the idle timeout.
    Slowloris,
    /// A line longer than --max-line: the exact error line, then EOF.
    LongLine,
    /// Sends and never reads: the server's memory must stay bounded.
    NonReader,
    /// Pipelines as fast as it can: every reply correct (and the good
    /// clients not starved).
    Firehose,
    /// Lines and an unterminated tail, then a half-close: every reply,
    /// the tail's included, then EOF.
    HalfClose,
    /// Random bytes cut by newlines: echoed exactly as the SPEC says.
    RandomBytes,
    /// Connects and closes without a byte.
    Vanish,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Reset,
        Kind::Slowloris,
        Kind::LongLine,
        Kind::NonReader,
        Kind::Firehose,
        Kind::HalfClose,
        Kind::RandomBytes,
        Kind::Vanish,
    ];

    /// The kind's name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Reset => "reset",
            Kind::Slowloris => "slowloris",
            Kind::LongLine => "long_line",
            Kind::NonReader => "non_reader",
            Kind::Firehose => "firehose",
            Kind::HalfClose => "half_close",
            Kind::RandomBytes => "random_bytes",
            Kind::Vanish => "vanish",
        }
    }
}

/// The server's limits, as given to the tool (the server's own options).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `Duration::ZERO`: the server never closes idle connections.
    pub idle_timeout: Duration,
    pub max_line: usize,
    pub max_pending_output: usize,
}

/// What every abuser needs.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub target: SocketAddr,
    pub limits: Limits,
    pub proto: Proto,
    /// No new attempt starts after this instant.
    pub until: Instant,
}

/// How one abuser fared.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub kind: Kind,
    pub attempts: u64,
    pub broken: u64,
    /// The first broken promise, described.
    pub first: Option<String>,
}

/// How long a reply, an error line or an EOF may take before it counts
/// as never coming.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines per firehose batch: written at once, then all replies read.
const FIREHOSE_BATCH: u64 = 512;
/// Pause between two attempts of the short abuses.
const PAUSE: Duration = Duration::from_millis(20);
/// Connection ids of abusers start here, far from the good clients'.
pub const FIRST_ID: u32 = 1_000_000_000;

/// Runs abuser `id` of `kind` until `ctx.until`.
pub fn run(kind: Kind, id: u32, ctx: Ctx) -> Outcome {
    let mut out = Outcome {
        kind,
        attempts: 0,
        broken: 0,
        first: None,
    };
    let mut seq = 0u64;
    while Instant::now() < ctx.until {
        out.attempts += 1;
        let result = match kind {
            Kind::Reset => reset(&ctx),
            Kind::Slowloris => slowloris(&ctx),
            Kind::LongLine => long_line(&ctx),
            Kind::NonReader => non_reader(&ctx, id),
            Kind::Firehose => firehose(&ctx, id, &mut seq),
            Kind::HalfClose => half_close(&ctx, id),
            Kind::RandomBytes => random_bytes(&ctx),
            Kind::Vanish => connect(&ctx).map(drop),
        };
        if let Err(why) = result {
            out.broken += 1;
            out.first.get_or_insert(why);
        }
        std::thread::sleep(PAUSE);
    }
    out
}

fn connect(ctx: &Ctx) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&ctx.target, REPLY_TIMEOUT)
        .map_err(|e| format!("connect to {}: {e}", ctx.target))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(REPLY_TIMEOUT));
    Ok(s)
}

/// How a read-until-the-end stopped.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
    /// Nothing for `REPLY_TIMEOUT`, or more than `limit` bytes.
    Stuck,
}

/// Reads until EOF, a reset, `REPLY_TIMEOUT` without a byte, or more than
/// `limit` bytes.
fn read_to_end(s: &mut TcpStream, limit: usize) -> (Vec<u8>, End) {
    let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, End::Eof),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > limit {
                    return (got, End::Stuck);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_reset(&e) => return (got, End::Reset),
            Err(_) => return (got, End::Stuck),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    ErrorKind::of_io(e) == ErrorKind::Reset
}

/// Compares what came back with what the server owes, then EOF.
fn expect_then_eof(what: &str, want: &[u8], got: &[u8], end: End) -> Result<(), String> {
    if got != want {
        return Err(format!(
            "{what}: expected `{}`, got `{}` ({end:?})",
            show(want, 120),
            show(got, 120)
        ));
    }
    if end != End::Eof {
        return Err(format!(
            "{what}: every reply came, then {end:?} instead of EOF"
        ));
    }
    Ok(())
}

fn reset(ctx: &Ctx) -> Result<(), String> {
    let mut s = connect(ctx)?;
    let _ = s.write_all(b"half a li");
    // SO_LINGER 0: close() sends an RST instead of a FIN.
    SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    Ok(())
}

fn slowloris(ctx: &Ctx) -> Result<(), String> {
    let idle = ctx.limits.idle_timeout;
    let mut s = connect(ctx)?;
    let start = Instant::now();
    if idle.is_zero() {
        // Nothing is promised: trickle for a while, then leave.
        let _ = s.write_all(b"x");
        std::thread::sleep(Duration::from_secs(1));
        return Ok(());
    }
    let give_up = idle + (idle / 2).max(Duration::from_secs(1));
    let step = (idle / 8).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let _ = s.set_read_timeout(Some(step));
    let mut buf = [0u8; 256];
    loop {
        if s.write_all(b"z").is_err() {
            return Ok(()); // closed by the server
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Err(e) if is_reset(&e) => return Ok(()),
            _ => {}
        }
        if start.elapsed() > give_up {
            return Err(format!(
                "slowloris: still open after {:.1} s of bytes without a newline (--idle-timeout {})",
                start.elapsed().as_secs_f64(),
                humantime::format_duration(idle)
            ));
        }
    }
}

fn long_line(ctx: &Ctx) -> Result<(), String> {
    let max = ctx.limits.max_line;
    let mut s = connect(ctx)?;
    let line = vec![b'y'; max + 1];
    if let Err(e) = s.write_all(&line) {
        return Err(format!("long line: writing {} bytes: {e}", max + 1));
    }
    let (got, end) = read_to_end(&mut s, 4096);
    let want = format!("error: line too long (max {max} bytes)\n");
    expect_then_eof("long line", want.as_bytes(), &got, end)
}

fn non_reader(ctx: &Ctx, id: u32) -> Result<(), String> {
    let s = connect(ctx)?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let format = LineFormat {
        line_len: 64,
        crlf: false,
        proto: ctx.proto,
    };
    let mut out = Vec::new();
    let mut seq = 0;
    // Writes until the server stops reading, then waits; a close by the
    // server (its idle timeout) ends this attempt, and the next one
    // reconnects.
    while Instant::now() < ctx.until {
        out.clear();
        for _ in 0..64 {
            format.push_line(&mut out, &Head::new(id), seq);
            seq += 1;
        }
        match (&s).write(&out) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

fn firehose(ctx: &Ctx, id: u32, seq: &mut u64) -> Result<(), String> {
    let mut s = connect(ctx)?;
    let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
    let format = LineFormat {
        line_len: 32,
        crlf: false,
        proto: ctx.proto,
    };
    let head = Head::new(id);
    let (mut lines, mut want, mut got) = (Vec::new(), Vec::new(), Vec::new());
    while Instant::now() < ctx.until {
        lines.clear();
        want.clear();
        for _ in 0..FIREHOSE_BATCH {
            format.push_line(&mut lines, &head, *seq);
            format.push_reply(&mut want, &head, *seq);
            *seq += 1;
        }
        s.write_all(&lines)
            .map_err(|e| format!("firehose: writing a batch: {e}"))?;
        got.resize(want.len(), 0);
        if let Err(e) = s.read_exact(&mut got) {
            return Err(format!(
                "firehose: reading {} bytes of replies: {e}",
                want.len()
            ));
        }
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            let from = at.saturating_sub(20);
            return Err(format!(
                "firehose: replies differ at byte {at}: expected `{}`, got `{}`",
                show(&want[from..], 60),
                show(&got[from..], 60)
            ));
        }
    }
    Ok(())
}

fn half_close(ctx: &Ctx, id: u32) -> Result<(), String> {
    let mut s = connect(ctx)?;
    let format = LineFormat {
        line_len: 24,
        crlf: true,
        proto: ctx.proto,
    };
    let (mut sent, mut want) = (Vec::new(), Vec::new());
    for seq in 0..2 {
        format.push_line(&mut sent, &Head::new(id), seq);
        format.push_reply(&mut want, &Head::new(id), seq);
    }
    let tail = format!("c{id} unterminated tail").into_bytes();
    sent.extend_from_slice(&tail);
    want.extend_from_slice(&reply_to(ctx.proto, &tail));
    s.write_all(&sent).map_err(|e| format!("half close: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half close: shutdown: {e}"))?;
    let (got, end) = read_to_end(&mut s, want.len() + 4096);
    expect_then_eof("half close", &want, &got, end)
}

fn random_bytes(ctx: &Ctx) -> Result<(), String> {
    let mut s = connect(ctx)?;
    let (mut sent, mut want) = (Vec::new(), Vec::new());
    let longest = ctx.limits.max_line.min(200);
    for _ in 0..32 {
        let start = sent.len();
        let len = fastrand::usize(0..=longest);
        // Any byte but the newline, which ends the line.
        sent.extend((0..len).map(|_| {
            loop {
                let b = fastrand::u8(..);
                if b != b'\n' {
                    break b;
                }
            }
        }));
        sent.push(b'\n');
        want.extend_from_slice(&reply_to(ctx.proto, &sent[start..]));
    }
    s.write_all(&sent)
        .map_err(|e| format!("random bytes: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("random bytes: shutdown: {e}"))?;
    let (got, end) = read_to_end(&mut s, want.len() + 4096);
    expect_then_eof("random bytes", &want, &got, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_distinct_names() {
        let mut names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Kind::ALL.len());
        // `soak` indexes its rows by `kind as usize`.
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
