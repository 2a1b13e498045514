//! # echoloop: a TCP line-echo daemon on a hand-rolled readiness loop
//!
//! Every line a client sends is answered `you said: <line>!` (or echoed as
//! it came, with `--raw`). The contract is `SPEC.md`; this page is the map.
//!
//! ## The files, one job each
//!
//! - `main.rs`: command line → [`config::Config`], logger, raise
//!   `RLIMIT_NOFILE`, bind, print `Echoing on ADDR`, start N loops, turn
//!   SIGINT/SIGTERM into a shutdown of every loop, exit status.
//! - [`config`]: every option and limit, with its default and its doc.
//! - [`listener`]: the raw socket calls: bind with socket2
//!   (`SO_REUSEPORT`, v6-only), `accept` outcomes named (`EMFILE` pauses,
//!   `ECONNABORTED` is skipped), the descriptor limit.
//! - [`event_loop`]: the loop, mechanism only: poll, decode tokens, drive
//!   connections, serve the ready list, fire timers, close. The only file
//!   that touches `mio::Poll`.
//! - [`conn`]: one connection as a state machine with no socket of its own
//!   ("sans-IO"): it is handed something to read and write and the time,
//!   and answers what it wants next.
//! - [`line`](mod@line): pure framing and reply building, property tested.
//! - [`timer`]: deadlines on a hashed timer wheel in coarse ticks.
//! - [`metrics`]: per-loop counters, the Prometheus text, the close reasons.
//! - [`proxy`]: pure PROXY protocol v1/v2 header parsing.
//!
//! Calls flow one way: `event_loop` calls `conn`, `conn` calls `line`; a
//! connection never calls the loop back, it answers queries.
//!
//! ## The life of one line
//!
//! 1. epoll reports the connection's token readable. The loop decodes the
//!    token into a slab key plus generation and calls
//!    [`conn::Conn::handle_io`].
//! 2. The connection reads into the loop's one read buffer until
//!    `WouldBlock`, a short read, EOF or its 64 KiB turn budget; if the
//!    budget ran out it asks to be put on the *ready list* and is served
//!    again next turn (edge-triggered readiness would not remind us).
//! 3. [`line::answer_lines`] finds each `\n` (memchr), strips one `\r`, and
//!    appends `you said: ..!\n` to the output buffer; only the unfinished
//!    tail of the input is copied into the connection. A line longer than
//!    `--max-line` is refused while it is still arriving.
//! 4. A completed line stamps the connection's last-activity time; the
//!    timer wheel is not touched. When its entry fires, the connection is
//!    closed if really idle, else the entry is re-armed for the remainder.
//! 5. All replies of that turn's reads leave in one `write`. What the kernel does
//!    not take stays in the connection's buffer, and only then is WRITABLE
//!    interest registered. At `--max-pending-output` unsent bytes the
//!    connection pauses (no reading, no framing) until below half.
//! 6. When both buffers are empty they are freed: an idle connection owns
//!    no heap, and a ping-pong client borrows the loop's spare buffer
//!    instead of allocating.
//!
//! ## Connection states ([`conn::State`])
//!
//! | state | reads | writes | leaves when |
//! |---|---|---|---|
//! | `ProxyHeader` | the header only | — | header parsed → `Open` (bytes after it are lines); invalid, EOF or `--proxy-header-timeout` → close (`error`) |
//! | `Request` | an HTTP head | — | complete → the `/metrics` page (or 404/400) queued, `Flushing` |
//! | `Open` | yes, per budget | replies | EOF → `Flushing(Eof)`; too long → `Flushing(TooLong)`; backlog full → `Paused` |
//! | `Paused` | no | backlog | backlog < half → `Open` (buffered lines answered at once) |
//! | `Flushing(reason)` | no | backlog | backlog empty → close if the client's EOF was read, else `Lingering` |
//! | `Lingering` | discards | — (write side shut) | client EOF, 64 KiB or 2 s → close |
//!
//! A client over `--max-connections` starts in `Flushing(Busy)` with
//! `error: server busy` queued, then lingers like any error close (at most
//! 8 such per loop; beyond that it gets one write and a close).
//!
//! Closed is not a state: `Next::Close(reason)` makes the loop release the
//! socket and the slab slot in one place. Its timer entry is not searched
//! for: the entry carries the slot's generation and is dropped unread when
//! it fires (at most one idle timeout later), so the wheel holds at most one
//! stale entry per connection closed in the last idle period.
//! Idle timeout (`Lingering` has its own 2 s bound instead) and connection
//! reset close from any state.
//!
//! ## Where each SPEC rule lives
//!
//! - §1 framing, CRLF, opaque bytes, max-line: [`line`](mod@line).
//! - §1 EOF, error line then lingering close: [`conn`] (`end_of_input`,
//!   `too_long`, `finish`).
//! - §2 idle timeout: [`conn::Conn::deadline`] + [`timer`]; slow readers:
//!   `State::Paused`; fairness: the read budget and the ready list in
//!   [`event_loop`]; reset: `CloseReason::Reset`.
//! - §3 limits, `EMFILE` pause, shutdown, several loops: [`event_loop`]
//!   (`admit`, `accept`, `begin_shutdown`); options: [`config`]; binding,
//!   `RLIMIT_NOFILE`, systemd sockets: [`listener`]; signals, threads and
//!   `sd_notify`: `main.rs`; metrics: [`metrics`] plus the `Request` state;
//!   PROXY protocol: [`proxy`] plus the `ProxyHeader` state.

pub mod admission;
pub mod config;
pub mod conn;
pub mod event_loop;
pub mod line;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod timer;
