//! # echoloop: a TCP line-echo daemon on a hand-rolled readiness loop
//!
//! Every line a client sends is answered `you said: <line>!` (or echoed as
//! it came, with `--raw`). The contract with clients and operators is
//! `SPEC.md` at the root of the repository; this page is the map, and the
//! [`guide`] is a tour of the code in nine chapters, each with an experiment.
//!
//! ## The files, one job each
//!
//! - `main.rs`: command line → [`config::Config`], logger, raise
//!   `RLIMIT_NOFILE`, bind, print `Echoing on ADDR`, start N loops, wait for
//!   SIGINT/SIGTERM on a small `Poll` of its own and shut every loop down
//!   (SIGUSR2: run a live upgrade on a thread), exit status.
//! - [`config`]: every option and limit, with its default and its doc.
//! - [`listener`]: the raw socket calls: bind with socket2
//!   (`SO_REUSEPORT`, v6-only), `accept` outcomes named (`EMFILE` pauses,
//!   `ECONNABORTED` is skipped), the descriptor limit, systemd sockets.
//! - [`event_loop`]: the loop, mechanism only: poll, decode tokens, drive
//!   connections, serve the ready list, fire timers, close. The only file
//!   that touches a connection's registration with `mio::Poll`.
//! - [`admission`]: what a new connection becomes (client, busy, metrics
//!   scrape): a pure function of the limits and the counts.
//! - [`conn`]: one connection as a state machine; the loop hands it the
//!   socket (or a test's script), its buffers and the time, and it reads,
//!   frames, writes and answers what it wants next.
//! - [`line`](mod@line): pure framing and reply building ([`line::Framer`]),
//!   property tested against a model.
//! - [`proxy`]: pure PROXY protocol v1/v2 header parsing.
//! - [`metrics`]: per-loop counters, the Prometheus page, the close reasons,
//!   the `GET /metrics` request check (pure).
//! - [`timer`]: deadlines on a hashed timer wheel in coarse ticks.
//! - [`upgrade`]: the live upgrade (SIGUSR2) between the old process and
//!   the new binary: start it, freeze the loops, send the sockets, commit
//!   or fall back. [`handover`]: what crosses, as pure bytes, versioned.
//!   [`pid_file`]: `--pid-file`, written atomically.
//!
//! Calls flow one way: `event_loop` calls `admission` and `conn`; `conn`
//! calls `line`, `proxy` and `metrics`; nothing calls the loop back: a
//! connection answers queries ([`conn::Conn::interest`],
//! [`conn::Conn::deadline`]) and returns a verdict ([`conn::Next`]).
//!
//! ## The life of one line
//!
//! 1. epoll reports a connection's token readable. [`event_loop::EventLoop::run`]
//!    decodes it into a slab key plus a generation, and `EventLoop::drive`
//!    lends the connection the loop's read buffer and calls
//!    [`conn::Conn::handle_io`].
//! 2. `Conn::drive`, the one switch over [`conn::State`], is in
//!    [`conn::State::Open`]: `Reader::read` reads once into the loop's
//!    buffer (until `WouldBlock`, a short read, EOF or the 64 KiB turn
//!    budget; a spent budget makes the verdict [`conn::Next::Again`], and
//!    the loop serves it again next turn, since edge-triggered readiness
//!    would not remind us).
//! 3. [`line::Framer::push`] joins the bytes with the unfinished line kept
//!    from earlier reads; [`line::answer_lines`] finds each `\n`
//!    ([`line::next_line`]: memchr), strips one `\r`, and
//!    [`line::write_reply`] appends `you said: ..!\n` to the output. Only the
//!    unfinished tail is kept. A line longer than `--max-line` is refused
//!    while it is still arriving.
//! 4. A completed line stamps the connection's last-activity time; the
//!    timer wheel is not touched. When its entry fires, the connection is
//!    closed if really idle, else the entry is re-armed for the remainder.
//! 5. When the reads are done, `write_out` sends all the turn's replies in
//!    one write phase (one `write` unless the socket fills up). What the
//!    kernel does not take stays queued, and
//!    `EventLoop::settle` registers WRITABLE only then (only when
//!    [`conn::Conn::interest`] changed). At `--max-pending-output` unsent
//!    bytes the connection pauses (no reading, no framing) until below half.
//! 6. When both buffers are empty they are freed: an idle connection owns
//!    no heap, and a ping-pong client borrows the loop's spare buffer
//!    ([`conn::Scratch`]) instead of allocating.
//!
//! So one line passes through `run` → `EventLoop::drive` → `handle_io` →
//! `Conn::turn` → `Conn::drive` → `Reader::read` → `Framer::push` → `answer_lines` →
//! `next_line` → `write_reply` → `write_out` → `EventLoop::settle`.
//!
//! ## Connection states ([`conn::State`])
//!
//! | state | reads | writes | leaves when |
//! |---|---|---|---|
//! | `ProxyHeader` | the header only | — | header parsed → `Open` (bytes after it are lines); invalid, EOF or `--proxy-header-timeout` → close (`proxy`) |
//! | `Request` | an HTTP head | — | complete → the `/metrics` page (or 404/405/400) queued, `Flushing`; EOF or the request timeout → close |
//! | `Open` | yes, per budget | replies | EOF → `Flushing` (then close); too long → `Flushing` (then linger); backlog full → `Paused` |
//! | `Paused` | no | backlog | backlog < half → `Open` (buffered lines answered at once), or `Flushing` when shutting down or when a buffered line is too long |
//! | `Flushing` | no | backlog | backlog empty → close if the client's EOF was read, else `Lingering` |
//! | `Lingering` | discards | — (write side shut) | client EOF, 64 KiB or 2 s → close |
//!
//! A client over `--max-connections` starts in `Flushing` with
//! `error: server busy` queued, then lingers like any error close (at most
//! 8 such per loop; beyond that it gets one write and a close). A shutdown
//! reads what the client already sent, answers it, and moves `Open` to
//! `Flushing` (a `Paused` connection remembers it in [`conn::Resume`]).
//!
//! Closed is not a state: `Next::Close(reason)` makes the loop release the
//! socket and the slab slot in one place. Its timer entry is not searched
//! for: the entry carries the slot's generation and is dropped unread when
//! it fires (at most one idle timeout later), so the wheel holds at most one
//! stale entry per connection closed in the last idle period.
//! The idle timeout closes `Open`, `Paused` and `Flushing` echo clients
//! (`ProxyHeader`, `Request`, busy and metrics connections and `Lingering`
//! have their own bounds instead); a reset closes from any state.
//!
//! ## Where each SPEC.md rule lives
//!
//! - §1 framing, CRLF, opaque bytes, max-line: [`line`](mod@line).
//! - §1 EOF, error line then lingering close: [`conn`] (the `Open`,
//!   `Flushing` and `Lingering` arms of `Conn::drive`).
//! - §2 idle timeout: [`conn::Conn::deadline`] + [`timer`]; slow readers:
//!   `State::Paused`; fairness: the read budget and the ready list in
//!   [`event_loop`]; reset: `CloseReason::Reset`.
//! - §3 limits: [`admission`]; `EMFILE` pause, shutdown, several loops:
//!   [`event_loop`] (`accept`, `begin_shutdown`); options: [`config`];
//!   binding, `RLIMIT_NOFILE`, systemd sockets: [`listener`]; signals,
//!   threads and `sd_notify`: `main.rs`; metrics: [`metrics`] plus the
//!   `Request` state; PROXY protocol: [`proxy`] plus the `ProxyHeader` state;
//!   live upgrade: [`upgrade`] (the two processes), [`handover`] (the
//!   bytes), `EventLoop::take_over` and `LoopHandle::freeze` in
//!   [`event_loop`], `Conn::save`/`Conn::restore` in [`conn`].

#![deny(missing_docs)]

pub mod admission;
pub mod config;
pub mod conn;
pub mod event_loop;
pub mod guide;
pub mod handover;
pub mod line;
pub mod listener;
pub mod metrics;
pub mod pid_file;
pub mod proxy;
pub mod timer;
pub mod upgrade;
