//! What one worker thread counts: replies, latencies, connects and errors by
//! kind (with the first few errors described), merged across threads at the
//! end of a run.

use crate::line::Proto;
use hdrhistogram::Histogram;
use std::time::Duration;

/// Every way a run can go wrong. Any error makes the run fail (exit 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A reply whose bytes differ from what the server owes (mismatch).
    Altered,
    /// A reply that arrived after the reply of a later line (mismatch).
    Reordered,
    /// A reply that was already received once (mismatch).
    Duplicated,
    /// Bytes that answer no line that was sent.
    Extra,
    /// A line whose reply never came (EOF, reset, or the grace period ran out).
    Missing,
    /// The server closed a connection that still had lines outstanding or
    /// was still in use.
    ClosedEarly,
    /// A connection could not be established (refused, timed out, ...).
    Connect,
    /// The connection was reset (`ECONNRESET`, `EPIPE`).
    Reset,
    /// The server answers in the other protocol (`--proto`): the run stops
    /// at the first such reply.
    WrongProto,
    /// Any other socket error.
    Io,
}

impl ErrorKind {
    /// All kinds, in report order.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::Altered,
        ErrorKind::Reordered,
        ErrorKind::Duplicated,
        ErrorKind::Extra,
        ErrorKind::Missing,
        ErrorKind::ClosedEarly,
        ErrorKind::Connect,
        ErrorKind::Reset,
        ErrorKind::WrongProto,
        ErrorKind::Io,
    ];

    /// The kind's name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Altered => "altered",
            ErrorKind::Reordered => "reordered",
            ErrorKind::Duplicated => "duplicated",
            ErrorKind::Extra => "extra",
            ErrorKind::Missing => "missing",
            ErrorKind::ClosedEarly => "closed_early",
            ErrorKind::Connect => "connect",
            ErrorKind::Reset => "reset",
            ErrorKind::WrongProto => "wrong_proto",
            ErrorKind::Io => "io",
        }
    }

    /// Classifies a socket error: reset-like errors vs the rest.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => ErrorKind::Reset,
            _ => ErrorKind::Io,
        }
    }
}

/// How many error descriptions one thread keeps (the rest are only counted).
pub const MAX_SAMPLES: usize = 12;
/// How many of those may be of one kind, so other kinds still get shown.
const MAX_SAMPLES_PER_KIND: usize = 3;

/// One described error, for stderr.
#[derive(Clone, Debug)]
pub struct ErrorSample {
    /// Time since the run started.
    pub at: Duration,
    pub kind: ErrorKind,
    pub detail: String,
}

/// Highest latency the histograms hold, in nanoseconds (larger values are
/// clamped): 100 s.
const MAX_LATENCY_NS: u64 = 100_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant histogram bounds are valid")
}

/// Records a duration into a nanosecond histogram (at least 1 ns).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    record_ns(h, u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
}

/// Records `ns` nanoseconds into `h` (at least 1, as `record`).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    record_n_ns(h, ns, 1);
}

/// Records `n` samples of `ns` nanoseconds into `h` at once (each at least
/// 1, as `record`).
pub fn record_n_ns(h: &mut Histogram<u64>, ns: u64, n: u64) {
    h.saturating_record_n(ns.max(1), n);
}

/// Everything one worker thread measured. Plain data; `merge` adds another.
#[derive(Clone, Debug)]
pub struct Tally {
    /// Replies checked correct over the whole run.
    pub replies: u64,
    /// Replies checked correct that arrived inside the measured window.
    pub window_replies: u64,
    /// Latency of the replies in the measured window (in `connect` mode: of
    /// every exchange), from the time a line was due to the arrival of its
    /// full reply. In the closed-loop modes a line is due when it is sent;
    /// in rate mode it is due at its place on the schedule, whether or not
    /// the tool managed to send it then (the coordinated-omission
    /// correction), and the window holds the lines *due* inside it. The
    /// arrival is the clock read once per loop turn, right after `poll`
    /// returns, so a busy turn makes latencies longer, never shorter.
    pub latency: Histogram<u64>,
    /// Rate mode: the same replies measured from the actual send time.
    pub latency_uncorrected: Histogram<u64>,
    /// Rate mode: how late the tool's own sends were (actual send time
    /// minus the time on the schedule), for every line due in the window.
    pub lateness: Histogram<u64>,
    /// Rate mode: lines due (and sent) inside the measured window.
    pub window_sent: u64,
    /// The longest any correct reply took, in or out of the window (soak
    /// mode's starvation check).
    pub longest_wait: Duration,
    /// Connections attempted.
    pub connects_attempted: u64,
    /// Connections established.
    pub connects_ok: u64,
    /// Time from `connect()` to the connection being established.
    pub connect_latency: Histogram<u64>,
    /// Connections that completed their whole job (connect mode: exchange
    /// and close).
    pub completed: u64,
    /// Error counts, indexed like `ErrorKind::ALL`.
    pub errors: [u64; ErrorKind::ALL.len()],
    /// The first few errors, described.
    pub samples: Vec<ErrorSample>,
    /// The protocol the server was found to answer in, when it is not the
    /// one asked for (`WrongProto`).
    pub wrong_proto: Option<Proto>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            replies: 0,
            window_replies: 0,
            latency: new_histogram(),
            latency_uncorrected: new_histogram(),
            lateness: new_histogram(),
            window_sent: 0,
            longest_wait: Duration::ZERO,
            connects_attempted: 0,
            connects_ok: 0,
            connect_latency: new_histogram(),
            completed: 0,
            errors: [0; ErrorKind::ALL.len()],
            samples: Vec::new(),
            wrong_proto: None,
        }
    }
}

impl Tally {
    /// Counts `n` errors of `kind`, keeping a description while there is room.
    pub fn error(
        &mut self,
        kind: ErrorKind,
        n: u64,
        at: Duration,
        detail: impl FnOnce() -> String,
    ) {
        if n == 0 {
            return;
        }
        self.errors[kind as usize] += n;
        let same_kind = self.samples.iter().filter(|s| s.kind == kind).count();
        if self.samples.len() < MAX_SAMPLES && same_kind < MAX_SAMPLES_PER_KIND {
            self.samples.push(ErrorSample {
                at,
                kind,
                detail: detail(),
            });
        }
    }

    /// The count of one kind.
    pub fn count(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize]
    }

    /// All errors of all kinds.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Adds another thread's tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        self.replies += other.replies;
        self.window_replies += other.window_replies;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.connect_latency.add(&other.connect_latency);
        let _ = self.latency_uncorrected.add(&other.latency_uncorrected);
        let _ = self.lateness.add(&other.lateness);
        self.window_sent += other.window_sent;
        self.longest_wait = self.longest_wait.max(other.longest_wait);
        self.wrong_proto = self.wrong_proto.or(other.wrong_proto);
        self.connects_attempted += other.connects_attempted;
        self.connects_ok += other.connects_ok;
        self.completed += other.completed;
        for (a, b) in self.errors.iter_mut().zip(other.errors.iter()) {
            *a += b;
        }
        self.samples.extend(other.samples.iter().cloned());
        self.samples.sort_by_key(|s| s.at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_index_matches_all() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn merge_adds_counts_and_samples() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        a.error(ErrorKind::Missing, 2, Duration::from_secs(2), || "a".into());
        b.error(ErrorKind::Missing, 1, Duration::from_secs(1), || "b".into());
        record(&mut b.latency, Duration::from_micros(5));
        b.replies = 3;
        a.merge(&b);
        assert_eq!(a.count(ErrorKind::Missing), 3);
        assert_eq!(a.total_errors(), 3);
        assert_eq!(a.replies, 3);
        assert_eq!(a.latency.len(), 1);
        assert_eq!(a.samples[0].detail, "b");
    }
}
