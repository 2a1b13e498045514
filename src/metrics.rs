//! Operational metrics: the counters each event loop keeps, the Prometheus
//! text page that sums them over all loops, the framing of the
//! `GET /metrics` request that asks for it (SPEC §3, `--metrics`), and the
//! rate-limited warning about connections without a PROXY header.
//!
//! This module never touches a socket. Each loop owns one [`Counters`]
//! behind an `Arc` and is its only writer; whichever loop serves a metrics
//! request reads every loop's counters with [`render`]. A metrics
//! connection feeds its input to [`parse_request`] until the answer is not
//! [`Request::Incomplete`], writes [`response`], and closes.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Close reasons
// ---------------------------------------------------------------------------

/// Why a connection was closed. These are the `reason` labels of
/// `echoloop_connections_closed_total` and the words used in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client half-closed; its replies were flushed first.
    Eof,
    /// No complete line within `--idle-timeout`.
    Idle,
    /// The peer reset the connection (`ECONNRESET`, `EPIPE`).
    Reset,
    /// A line exceeded `--max-line`; the error line was sent first.
    TooLong,
    /// Accepted at `--max-connections`; `error: server busy` was sent.
    Busy,
    /// Closed by SIGINT/SIGTERM after its pending replies were flushed.
    Shutdown,
    /// With `--proxy-protocol`: no valid PROXY header (an invalid one, EOF
    /// before it, or none within `--proxy-header-timeout`).
    Proxy,
    /// Any other failure: an unexpected I/O error.
    Error,
}

impl CloseReason {
    /// Every reason, in the order the metrics page lists them.
    pub const ALL: [CloseReason; 8] = [
        CloseReason::Eof,
        CloseReason::Idle,
        CloseReason::Reset,
        CloseReason::TooLong,
        CloseReason::Busy,
        CloseReason::Shutdown,
        CloseReason::Proxy,
        CloseReason::Error,
    ];

    /// The metric label and log word: `eof`, `idle`, `reset`, `too_long`,
    /// `busy`, `shutdown`, `proxy` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::Idle => "idle",
            CloseReason::Reset => "reset",
            CloseReason::TooLong => "too_long",
            CloseReason::Busy => "busy",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Proxy => "proxy",
            CloseReason::Error => "error",
        }
    }

    /// Position in [`CloseReason::ALL`], used as an array index.
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------

/// The counters of one event loop.
///
/// Only the loop that owns it writes to it; any loop may read it to render
/// the metrics page. Atomics with `Relaxed` ordering are enough for that:
/// each counter is read whole, and a page is a best-effort sample, not a
/// consistent snapshot across counters. Because there is one writer, the
/// cache line is never contended on the hot path.
///
/// Contract for the caller: every [`accepted`](Self::accepted) connection is
/// later passed to [`closed`](Self::closed) exactly once, with its reason
/// (a busy connection too: accepted, then closed as [`CloseReason::Busy`]).
///
/// Aligned to 128 bytes (as crossbeam's `CachePadded` is on x86-64) so the
/// counters of two loops never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Counters {
    /// Connections open now: +1 on accept, -1 on close. Signed so that a
    /// caller bug shows as a negative number, not as 2^64 - 1.
    open: AtomicI64,
    /// Connections accepted since start.
    accepted: AtomicU64,
    /// Connections closed since start, indexed by [`CloseReason::index`].
    closed: [AtomicU64; CloseReason::ALL.len()],
    /// Complete lines received (each one got a reply).
    lines: AtomicU64,
    /// Bytes read from clients.
    received_bytes: AtomicU64,
    /// Bytes written to clients.
    sent_bytes: AtomicU64,
}

impl Counters {
    /// All counters at zero.
    pub fn new() -> Counters {
        Counters::default()
    }

    /// Counters that continue from `s` (a live upgrade's new process goes
    /// on from the old one's values).
    pub fn starting_at(s: &Snapshot) -> Counters {
        Counters {
            open: AtomicI64::new(s.open),
            accepted: AtomicU64::new(s.accepted),
            closed: s.closed.map(AtomicU64::new),
            lines: AtomicU64::new(s.lines),
            received_bytes: AtomicU64::new(s.received_bytes),
            sent_bytes: AtomicU64::new(s.sent_bytes),
        }
    }

    /// A connection was accepted.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
    }

    /// A connection that was [`accepted`](Self::accepted) was closed.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
        self.open.fetch_sub(1, Relaxed);
    }

    /// `n` complete lines were received.
    pub fn add_lines(&self, n: u64) {
        self.lines.fetch_add(n, Relaxed);
    }

    /// `n` bytes were read from a client.
    pub fn add_received(&self, n: u64) {
        self.received_bytes.fetch_add(n, Relaxed);
    }

    /// `n` bytes were written to a client.
    pub fn add_sent(&self, n: u64) {
        self.sent_bytes.fetch_add(n, Relaxed);
    }

    /// The current values, read one counter at a time.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            open: self.open.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Relaxed)),
            lines: self.lines.load(Relaxed),
            received_bytes: self.received_bytes.load(Relaxed),
            sent_bytes: self.sent_bytes.load(Relaxed),
        }
    }
}

/// Plain values of [`Counters`], for one loop or summed over several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Connections open.
    pub open: i64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed, in the order of [`CloseReason::ALL`].
    pub closed: [u64; CloseReason::ALL.len()],
    /// Complete lines received.
    pub lines: u64,
    /// Bytes read from clients.
    pub received_bytes: u64,
    /// Bytes written to clients.
    pub sent_bytes: u64,
}

impl Snapshot {
    /// Connections closed for `reason`.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }

    /// Adds `other` to `self`. Counters wrap like Prometheus counters do
    /// rather than panic (2^64 bytes is not reached in practice).
    fn add(&mut self, other: &Snapshot) {
        self.open = self.open.wrapping_add(other.open);
        self.accepted = self.accepted.wrapping_add(other.accepted);
        for (sum, n) in self.closed.iter_mut().zip(other.closed) {
            *sum = sum.wrapping_add(n);
        }
        self.lines = self.lines.wrapping_add(other.lines);
        self.received_bytes = self.received_bytes.wrapping_add(other.received_bytes);
        self.sent_bytes = self.sent_bytes.wrapping_add(other.sent_bytes);
    }
}

/// Sums the counters of all loops.
pub fn sum(loops: &[Arc<Counters>]) -> Snapshot {
    let mut total = Snapshot::default();
    for counters in loops {
        total.add(&counters.snapshot());
    }
    total
}

// ---------------------------------------------------------------------------
// Connections without a PROXY header: one warning per interval, with a count
// ---------------------------------------------------------------------------

/// The shortest time between two warnings about connections without a
/// valid PROXY header.
pub const PROXY_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Decides when to warn about connections closed as [`CloseReason::Proxy`]:
/// at the first one, then at most once per [`PROXY_WARNING_INTERVAL`], with
/// the number of them since the previous warning. A balancer that forgot
/// `send-proxy` makes every connection fail; the operator needs to hear it
/// once, not once per connection. Time is passed in, so tests need no clock.
#[derive(Debug, Default)]
pub struct ProxyWarnings {
    /// When the last warning was given; `None` before the first.
    last: Option<Instant>,
    /// Connections closed since then, not yet reported.
    unreported: u64,
}

impl ProxyWarnings {
    /// No connection seen yet.
    pub const fn new() -> ProxyWarnings {
        ProxyWarnings {
            last: None,
            unreported: 0,
        }
    }

    /// One more connection without a valid header, at `now`. When a warning
    /// is due, returns how many connections it reports and the time they
    /// fell in (the span since the previous warning; the interval for the
    /// very first one).
    pub fn record(&mut self, now: Instant) -> Option<(u64, Duration)> {
        self.unreported += 1;
        let span = match self.last {
            None => PROXY_WARNING_INTERVAL,
            Some(last) => now.saturating_duration_since(last),
        };
        if self.last.is_some() && span < PROXY_WARNING_INTERVAL {
            return None;
        }
        self.last = Some(now);
        Some((std::mem::take(&mut self.unreported), span))
    }
}

/// The warning for `count` connections without a valid header in `span`.
pub fn proxy_warning(count: u64, span: Duration) -> String {
    let connections = if count == 1 {
        "connection"
    } else {
        "connections"
    };
    format!(
        "{count} {connections} without a valid PROXY header in the last {} s: \
         is the balancer sending one?",
        span.as_secs()
    )
}

/// The warnings of the whole process: every loop reports here, so a
/// misconfigured balancer gives one warning per interval, not one per loop.
static PROXY_WARNINGS: Mutex<ProxyWarnings> = Mutex::new(ProxyWarnings::new());

/// A connection was closed as [`CloseReason::Proxy`] at `now`: warns (at
/// `warn` level, shown by default) when [`ProxyWarnings`] says it is time.
pub fn proxy_rejected(now: Instant) {
    let due = PROXY_WARNINGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .record(now);
    if let Some((count, span)) = due {
        log::warn!("{}", proxy_warning(count, span));
    }
}

// ---------------------------------------------------------------------------
// Prometheus text exposition format
// ---------------------------------------------------------------------------

/// The content type of the Prometheus text exposition format, version 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the metrics page for the counters of all loops, summed.
pub fn render(loops: &[Arc<Counters>]) -> String {
    render_snapshot(&sum(loops))
}

/// Renders the metrics page for one set of values: each metric with its
/// `# HELP` and `# TYPE` lines, every close reason always present.
pub fn render_snapshot(s: &Snapshot) -> String {
    let mut page = Page(String::with_capacity(1536));

    let name = "echoloop_connections_open";
    page.describe(name, "gauge", "Connections open now.");
    page.sample(name, "", s.open);

    let name = "echoloop_connections_accepted_total";
    page.describe(name, "counter", "Connections accepted.");
    page.sample(name, "", s.accepted);

    let name = "echoloop_connections_closed_total";
    page.describe(name, "counter", "Connections closed, by reason.");
    for reason in CloseReason::ALL {
        let labels = format!("{{reason=\"{reason}\"}}");
        page.sample(name, &labels, s.closed(reason));
    }

    let name = "echoloop_lines_total";
    page.describe(name, "counter", "Lines received and answered.");
    page.sample(name, "", s.lines);

    let name = "echoloop_received_bytes_total";
    page.describe(name, "counter", "Bytes read from clients.");
    page.sample(name, "", s.received_bytes);

    let name = "echoloop_sent_bytes_total";
    page.describe(name, "counter", "Bytes written to clients.");
    page.sample(name, "", s.sent_bytes);

    page.0
}

/// A metrics page being written, one line at a time.
struct Page(String);

impl Page {
    /// Writes the `# HELP` and `# TYPE` lines of a metric.
    fn describe(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// Writes one sample line; `labels` is empty or `{key="value"}`.
    fn sample(&mut self, name: &str, labels: &str, value: impl fmt::Display) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }
}

// ---------------------------------------------------------------------------
// HTTP: the one request a metrics connection may send, and the answer
// ---------------------------------------------------------------------------

/// The longest request head (request line and headers, up to the blank
/// line) a metrics client may send. Prometheus sends a few hundred bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The most header fields a metrics request may carry.
pub const MAX_REQUEST_HEADERS: usize = 32;

/// What the bytes received on a metrics connection ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The request head is not complete yet; read more.
    Incomplete,
    /// `GET /metrics` (`head: false`): answer with the page; `HEAD /metrics`
    /// (`head: true`): the same headers, no body.
    Metrics {
        /// The request was `HEAD`.
        head: bool,
    },
    /// `/metrics` with any other method: answer 405 with `Allow: GET, HEAD`.
    MethodNotAllowed,
    /// A well-formed request for another path: answer 404 (no body to a
    /// `HEAD`).
    NotFound {
        /// The request was `HEAD`.
        head: bool,
    },
    /// Not HTTP, more than [`MAX_REQUEST_HEADERS`] headers, or a head longer
    /// than [`MAX_REQUEST_HEAD`]: answer 400.
    Bad,
}

/// Frames and classifies the request at the start of `buf`, which holds
/// everything received so far on a metrics connection.
///
/// Only the head is looked at. The server answers one request and closes,
/// so a body or a pipelined second request is never read. A query string is
/// allowed and ignored (`GET /metrics?x=1` is [`Request::Metrics`]), since
/// Prometheus appends the `params` of a scrape config to the path. Methods
/// are case-sensitive, as HTTP says. The answer does not depend on how
/// `buf` was split into reads.
pub fn parse_request(buf: &[u8]) -> Request {
    let head = &buf[..buf.len().min(MAX_REQUEST_HEAD)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(path, _query)| path);
            let method = request.method.unwrap_or("");
            let head = method == "HEAD";
            match (path == "/metrics", method) {
                (true, "GET" | "HEAD") => Request::Metrics { head },
                (true, _) => Request::MethodNotAllowed,
                (false, _) => Request::NotFound { head },
            }
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => Request::Bad,
        Ok(httparse::Status::Partial) => Request::Incomplete,
        Err(_) => Request::Bad,
    }
}

/// The content type of the error answers.
const TEXT: &str = "text/plain; charset=utf-8";

/// The whole HTTP answer to a complete request: the metrics page (200),
/// 405, 404 or 400, each followed by a close. `None` for
/// [`Request::Incomplete`]: there is nothing to answer yet.
pub fn response(request: Request, loops: &[Arc<Counters>]) -> Option<Vec<u8>> {
    let (status, content_type, body, extra, head) = match request {
        Request::Incomplete => return None,
        Request::Metrics { head } => (
            "200 OK",
            METRICS_CONTENT_TYPE,
            render(loops).into_bytes(),
            "",
            head,
        ),
        Request::MethodNotAllowed => (
            "405 Method Not Allowed",
            TEXT,
            b"method not allowed: try GET /metrics\n".to_vec(),
            "Allow: GET, HEAD\r\n",
            false,
        ),
        Request::NotFound { head } => (
            "404 Not Found",
            TEXT,
            b"not found: try GET /metrics\n".to_vec(),
            "",
            head,
        ),
        Request::Bad => (
            "400 Bad Request",
            TEXT,
            b"bad request\n".to_vec(),
            "",
            false,
        ),
    };
    let mut answer = http_response(status, content_type, extra, &body);
    if head {
        // The headers of the GET answer, Content-Length included, and no body.
        answer.truncate(answer.len() - body.len());
    }
    Some(answer)
}

/// An HTTP/1.1 response with `status` (such as `"200 OK"`), a
/// `Content-Type`, an exact `Content-Length`, `Connection: close` and the
/// `extra` header lines (each ending in `\r\n`; usually none).
pub fn http_response(status: &str, content_type: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 {status}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         {extra}\
         \r\n",
        body.len()
    );
    let mut response = Vec::with_capacity(head.len() + body.len());
    response.extend_from_slice(head.as_bytes());
    response.extend_from_slice(body);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A page with every counter at `0`.
    const ZERO_PAGE: &str = "\
# HELP echoloop_connections_open Connections open now.
# TYPE echoloop_connections_open gauge
echoloop_connections_open 0
# HELP echoloop_connections_accepted_total Connections accepted.
# TYPE echoloop_connections_accepted_total counter
echoloop_connections_accepted_total 0
# HELP echoloop_connections_closed_total Connections closed, by reason.
# TYPE echoloop_connections_closed_total counter
echoloop_connections_closed_total{reason=\"eof\"} 0
echoloop_connections_closed_total{reason=\"idle\"} 0
echoloop_connections_closed_total{reason=\"reset\"} 0
echoloop_connections_closed_total{reason=\"too_long\"} 0
echoloop_connections_closed_total{reason=\"busy\"} 0
echoloop_connections_closed_total{reason=\"shutdown\"} 0
echoloop_connections_closed_total{reason=\"proxy\"} 0
echoloop_connections_closed_total{reason=\"error\"} 0
# HELP echoloop_lines_total Lines received and answered.
# TYPE echoloop_lines_total counter
echoloop_lines_total 0
# HELP echoloop_received_bytes_total Bytes read from clients.
# TYPE echoloop_received_bytes_total counter
echoloop_received_bytes_total 0
# HELP echoloop_sent_bytes_total Bytes written to clients.
# TYPE echoloop_sent_bytes_total counter
echoloop_sent_bytes_total 0
";

    fn loops(n: usize) -> Vec<Arc<Counters>> {
        (0..n).map(|_| Arc::new(Counters::new())).collect()
    }

    // ----- CloseReason ----------------------------------------------------

    #[test]
    fn close_reason_words() {
        let words: Vec<&str> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            words,
            [
                "eof", "idle", "reset", "too_long", "busy", "shutdown", "proxy", "error"
            ]
        );
        for (i, reason) in CloseReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert_eq!(reason.to_string(), reason.as_str());
        }
    }

    // ----- ProxyWarnings -------------------------------------------------

    #[test]
    fn the_first_proxy_failure_warns_at_once() {
        let mut w = ProxyWarnings::new();
        let t0 = Instant::now();
        assert_eq!(w.record(t0), Some((1, PROXY_WARNING_INTERVAL)));
        assert_eq!(
            proxy_warning(1, PROXY_WARNING_INTERVAL),
            "1 connection without a valid PROXY header in the last 10 s: \
             is the balancer sending one?"
        );
    }

    #[test]
    fn proxy_failures_warn_at_most_once_per_interval_with_the_count() {
        let mut w = ProxyWarnings::new();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(w.record(at(0)).is_some());
        for ms in (100..10_000).step_by(100) {
            assert_eq!(w.record(at(ms)), None, "warned again at {ms} ms");
        }
        // 99 held back, and this one: reported once the interval is over.
        assert_eq!(w.record(at(10_000)), Some((100, Duration::from_secs(10))));
        assert_eq!(w.record(at(10_001)), None);
        // A quiet hour: the next one is reported with the span it fell in.
        assert_eq!(
            w.record(at(3_610_000)),
            Some((2, Duration::from_secs(3_600)))
        );
        assert_eq!(
            proxy_warning(2, Duration::from_secs(3_600)),
            "2 connections without a valid PROXY header in the last 3600 s: \
             is the balancer sending one?"
        );
    }

    // ----- Counters -------------------------------------------------------

    #[test]
    fn counters_count() {
        let c = Counters::new();
        assert_eq!(c.snapshot(), Snapshot::default());
        c.accepted();
        c.accepted();
        c.accepted();
        c.closed(CloseReason::Eof);
        c.closed(CloseReason::TooLong);
        c.add_lines(5);
        c.add_lines(2);
        c.add_received(100);
        c.add_sent(150);
        let s = c.snapshot();
        assert_eq!(s.open, 1);
        assert_eq!(s.accepted, 3);
        assert_eq!(s.closed(CloseReason::Eof), 1);
        assert_eq!(s.closed(CloseReason::TooLong), 1);
        assert_eq!(s.closed(CloseReason::Idle), 0);
        assert_eq!(s.lines, 7);
        assert_eq!(s.received_bytes, 100);
        assert_eq!(s.sent_bytes, 150);
    }

    #[test]
    fn counters_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<Counters>(), 128);
    }

    #[test]
    fn sum_adds_all_loops() {
        let all = loops(3);
        all[0].accepted();
        all[1].accepted();
        all[1].closed(CloseReason::Idle);
        all[2].add_lines(4);
        all[2].add_sent(9);
        all[0].add_received(1);
        let s = sum(&all);
        assert_eq!(s.open, 1);
        assert_eq!(s.accepted, 2);
        assert_eq!(s.closed(CloseReason::Idle), 1);
        assert_eq!(s.lines, 4);
        assert_eq!(s.received_bytes, 1);
        assert_eq!(s.sent_bytes, 9);
        assert_eq!(sum(&[]), Snapshot::default());
    }

    #[test]
    fn counters_are_readable_from_another_thread() {
        let c = Arc::new(Counters::new());
        let writer = Arc::clone(&c);
        std::thread::spawn(move || {
            for _ in 0..1000 {
                writer.accepted();
                writer.add_lines(1);
            }
        })
        .join()
        .unwrap();
        assert_eq!(sum(&[c]).lines, 1000);
    }

    // ----- render ---------------------------------------------------------

    #[test]
    fn render_zero() {
        assert_eq!(render(&loops(1)), ZERO_PAGE);
        assert_eq!(render(&[]), ZERO_PAGE);
    }

    #[test]
    fn render_sums_every_metric_exactly() {
        let all = loops(2);
        for (i, c) in all.iter().enumerate() {
            for _ in 0..30 {
                c.accepted();
            }
            for (n, reason) in CloseReason::ALL.into_iter().enumerate() {
                for _ in 0..n {
                    c.closed(reason); // 0 + 1 + ... + 7 = 28 closes per loop
                }
            }
            c.add_lines(100 + i as u64);
            c.add_received(1_000);
            c.add_sent(u64::from(u32::MAX));
        }
        let expected = ZERO_PAGE
            .replace("open 0", "open 4")
            .replace("accepted_total 0", "accepted_total 60")
            .replace("\"idle\"} 0", "\"idle\"} 2")
            .replace("\"reset\"} 0", "\"reset\"} 4")
            .replace("\"too_long\"} 0", "\"too_long\"} 6")
            .replace("\"busy\"} 0", "\"busy\"} 8")
            .replace("\"shutdown\"} 0", "\"shutdown\"} 10")
            .replace("\"proxy\"} 0", "\"proxy\"} 12")
            .replace("\"error\"} 0", "\"error\"} 14")
            .replace("lines_total 0", "lines_total 201")
            .replace("received_bytes_total 0", "received_bytes_total 2000")
            .replace("sent_bytes_total 0", "sent_bytes_total 8589934590");
        assert_eq!(render(&all), expected);
    }

    #[test]
    fn render_is_valid_exposition_text() {
        // Every line is a comment or `name{labels} value`, every sampled
        // metric was described first, and the page ends with a newline.
        let page = render(&loops(1));
        assert!(page.ends_with('\n'));
        let mut described = Vec::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                described.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with("# HELP ") {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(described.iter().any(|d| d == name), "{line}");
                assert!(value.parse::<i64>().is_ok(), "{line}");
            }
        }
        assert_eq!(described.len(), 6);
    }

    // ----- parse_request ----------------------------------------------------

    /// Asserts that every strict prefix of `request` is `Incomplete` and the
    /// whole of it, with or without bytes after it, is `expected`.
    fn assert_frames(request: &[u8], expected: Request) {
        for end in 0..request.len() {
            assert_eq!(
                parse_request(&request[..end]),
                Request::Incomplete,
                "{:?}",
                String::from_utf8_lossy(&request[..end])
            );
        }
        assert_eq!(parse_request(request), expected);
        let mut more = request.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n\r\nbody");
        assert_eq!(parse_request(&more), expected);
    }

    #[test]
    fn get_metrics() {
        assert_frames(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9100\r\n\
              User-Agent: Prometheus/2.53.0\r\nAccept: text/plain;version=0.0.4\r\n\
              X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
            Request::Metrics { head: false },
        );
        assert_frames(
            b"GET /metrics HTTP/1.0\r\n\r\n",
            Request::Metrics { head: false },
        );
        assert_frames(
            b"GET /metrics HTTP/1.1\n\n",
            Request::Metrics { head: false },
        );
    }

    #[test]
    fn query_string_is_ignored() {
        assert_frames(
            b"GET /metrics?module=echo HTTP/1.1\r\n\r\n",
            Request::Metrics { head: false },
        );
        assert_frames(
            b"GET /metrics? HTTP/1.1\r\n\r\n",
            Request::Metrics { head: false },
        );
    }

    #[test]
    fn head_metrics() {
        assert_frames(
            b"HEAD /metrics HTTP/1.1\r\n\r\n",
            Request::Metrics { head: true },
        );
        assert_frames(
            b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n",
            Request::Metrics { head: true },
        );
    }

    #[test]
    fn other_methods_on_metrics_are_not_allowed() {
        for request in [
            &b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n"[..],
            b"PUT /metrics HTTP/1.1\r\n\r\n",
            b"DELETE /metrics?x HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_frames(request, Request::MethodNotAllowed);
        }
    }

    #[test]
    fn other_paths_are_not_found() {
        for request in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET /metrics/ HTTP/1.1\r\n\r\n",
            b"GET /metricsx HTTP/1.1\r\n\r\n",
            b"GET /METRICS HTTP/1.1\r\n\r\n",
            b"POST /other HTTP/1.1\r\n\r\n",
        ] {
            assert_frames(request, Request::NotFound { head: false });
        }
        assert_frames(b"HEAD / HTTP/1.1\r\n\r\n", Request::NotFound { head: true });
    }

    #[test]
    fn bad_requests() {
        for request in [
            &b"hello\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello
            b"GET /metrics HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        ] {
            assert_eq!(
                parse_request(request),
                Request::Bad,
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn too_many_headers_is_bad() {
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_REQUEST_HEADERS {
            request.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&request), Request::Metrics { head: false });
        let at = request.len() - 2;
        request.splice(at..at, b"X-one-more: y\r\n".iter().copied());
        assert_eq!(parse_request(&request), Request::Bad);
    }

    #[test]
    fn long_head_is_bad_once_the_bound_is_reached() {
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(MAX_REQUEST_HEAD - 4, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        assert_eq!(request.len(), MAX_REQUEST_HEAD);
        assert_eq!(parse_request(&request), Request::Metrics { head: false });

        let mut request = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(MAX_REQUEST_HEAD - 1, b'a');
        assert_eq!(parse_request(&request), Request::Incomplete);
        request.push(b'a');
        assert_eq!(parse_request(&request), Request::Bad);
        request.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&request), Request::Bad);
    }

    // ----- responses ------------------------------------------------------

    #[test]
    fn http_response_exact() {
        assert_eq!(
            http_response("404 Not Found", "text/plain", "", b"nope\n"),
            b"HTTP/1.1 404 Not Found\r\n\
              Content-Type: text/plain\r\n\
              Content-Length: 5\r\n\
              Connection: close\r\n\
              \r\n\
              nope\n"
        );
        assert_eq!(
            http_response(
                "405 Method Not Allowed",
                "text/plain",
                "Allow: GET, HEAD\r\n",
                b""
            ),
            b"HTTP/1.1 405 Method Not Allowed\r\n\
              Content-Type: text/plain\r\n\
              Content-Length: 0\r\n\
              Connection: close\r\n\
              Allow: GET, HEAD\r\n\
              \r\n"
        );
    }

    #[test]
    fn response_per_request() {
        let all = loops(2);
        assert_eq!(response(Request::Incomplete, &all), None);

        let metrics = response(Request::Metrics { head: false }, &all).unwrap();
        let expected = http_response("200 OK", METRICS_CONTENT_TYPE, "", ZERO_PAGE.as_bytes());
        assert_eq!(metrics, expected);
        let head = String::from_utf8_lossy(&metrics);
        assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", ZERO_PAGE.len())));

        // HEAD: the same head, Content-Length of the page included, no body.
        let head = response(Request::Metrics { head: true }, &all).unwrap();
        assert_eq!(head, &expected[..expected.len() - ZERO_PAGE.len()]);

        let not_allowed = response(Request::MethodNotAllowed, &all).unwrap();
        let not_allowed = String::from_utf8(not_allowed).unwrap();
        assert!(not_allowed.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(not_allowed.contains("\r\nAllow: GET, HEAD\r\n"));

        let not_found = response(Request::NotFound { head: false }, &all).unwrap();
        assert!(not_found.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(not_found.ends_with(b"not found: try GET /metrics\n"));
        let not_found_head = response(Request::NotFound { head: true }, &all).unwrap();
        assert!(not_found_head.ends_with(b"Connection: close\r\n\r\n"));
        let bad = response(Request::Bad, &all).unwrap();
        assert!(bad.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }

    // ----- properties -----------------------------------------------------

    proptest! {
        /// However a valid request is split into reads, every prefix is
        /// `Incomplete` and the whole is classified by its path.
        #[test]
        fn every_prefix_of_a_request_is_incomplete(
            path in prop_oneof![
                Just("/metrics".to_owned()),
                "/metrics\\?[a-z=&]{0,20}",
                "/[a-z]{0,12}",
            ],
            headers in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,40}"), 0..8),
        ) {
            let mut request = format!("GET {path} HTTP/1.1\r\n");
            for (name, value) in &headers {
                request.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            request.push_str("\r\n");
            let request = request.as_bytes();
            for end in 0..request.len() {
                prop_assert_eq!(parse_request(&request[..end]), Request::Incomplete);
            }
            let expected = if path.split('?').next() == Some("/metrics") {
                Request::Metrics { head: false }
            } else {
                Request::NotFound { head: false }
            };
            prop_assert_eq!(parse_request(request), expected);
        }

        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            let _ = parse_request(&buf);
        }

        #[test]
        fn sum_is_the_sum_of_the_loops(
            lines in proptest::collection::vec(0u64..1 << 40, 0..8),
        ) {
            let all = loops(lines.len());
            for (c, n) in all.iter().zip(&lines) {
                c.add_lines(*n);
            }
            let total: u64 = lines.iter().sum();
            let needle = format!("\necholoop_lines_total {total}\n");
            prop_assert!(render(&all).contains(&needle));
        }
    }
}
