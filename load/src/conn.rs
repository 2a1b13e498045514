//! One client connection: its socket, the lines it still has to write, and
//! the checker of its replies. Reads and writes follow the edge-triggered
//! rule: until `WouldBlock` (or a bounded budget, or a short read when the
//! caller knows a new edge will come), retrying `Interrupted`.

use crate::check::{Checker, Verdict};
use crate::line::{Head, LineFormat, Numbered};
use mio::net::TcpStream;
use rustix::net::{RecvFlags, SendFlags};
use std::io;
use std::time::Instant;

/// How many `Interrupted` results in a row a read or write loop tolerates.
const MAX_INTERRUPTS: u32 = 16;

/// Why a read loop stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// Everything available was read.
    Drained,
    /// The budget ran out with input possibly still waiting: read again
    /// without waiting for a new event.
    Budget,
    /// The peer closed its write side.
    Eof,
    /// A socket error.
    Failed(io::Error),
}

/// A client connection. Invariant: `out[out_pos..]` are bytes queued and
/// not yet written; every line queued was announced to `checker`.
#[derive(Debug)]
pub struct Conn {
    /// The connection id carried in every line it sends.
    pub id: u32,
    pub stream: TcpStream,
    /// When `connect()` was called; `Some` while the connection is in progress.
    pub connecting_since: Option<Instant>,
    pub checker: Checker,
    /// The next line to send (its sequence number is the count sent).
    next: Numbered,
    out: Vec<u8>,
    out_pos: usize,
}

impl Conn {
    /// A connection whose `connect()` was just started.
    pub fn new(id: u32, stream: TcpStream, format: LineFormat, now: Instant) -> Self {
        Conn {
            id,
            stream,
            connecting_since: Some(now),
            checker: Checker::new(id, format),
            next: Numbered::line(format, Head::new(id)),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Queues the next `n` lines, due at `intended`, at `now` (nanoseconds
    /// since the run's start; not written yet: call `flush`).
    pub fn queue_lines(&mut self, n: usize, intended: u64, now: u64) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        for _ in 0..n {
            self.next.append_to(&mut self.out);
            self.checker.sent(self.next.seq(), intended, now);
            self.next.advance();
        }
    }

    /// Lines sent so far.
    pub fn lines_sent(&self) -> u64 {
        self.next.seq()
    }

    /// Are queued bytes waiting to be written?
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Writes queued bytes until all are written (`Ok(true)`) or the socket
    /// is full (`Ok(false)`: wait for a writable event).
    pub fn flush(&mut self) -> io::Result<bool> {
        let mut interrupts = 0;
        while self.out_pos < self.out.len() {
            match send(&self.stream, &self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupts < MAX_INTERRUPTS => {
                    interrupts += 1;
                }
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    /// Reads at most `budget` times into `buf`, feeding every byte to the
    /// checker, which calls `on` once per complete reply line. With
    /// `short_read_drains`, a read that does not fill `buf` ends the loop
    /// as `Drained` (it emptied the socket; new data raises a new edge).
    pub fn read_some(
        &mut self,
        buf: &mut [u8],
        budget: usize,
        short_read_drains: bool,
        mut on: impl FnMut(Verdict),
    ) -> ReadEnd {
        let mut interrupts = 0;
        let mut reads = 0;
        while reads < budget {
            match recv(&self.stream, buf) {
                Ok(0) => return ReadEnd::Eof,
                Ok(n) => {
                    reads += 1;
                    self.checker.feed(&buf[..n], &mut on);
                    if short_read_drains && n < buf.len() {
                        return ReadEnd::Drained;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupts < MAX_INTERRUPTS => {
                    interrupts += 1;
                }
                Err(e) => return ReadEnd::Failed(e),
            }
        }
        ReadEnd::Budget
    }
}

/// `send(2)` with `MSG_NOSIGNAL`, as std's `write` on a socket, but as the
/// system call itself (rustix) rather than through libc's wrapper: that
/// wrapper is a thread-cancellation point, and its bookkeeping with the
/// wrapper's own for `recv` took 3-4 % of the tool's CPU in pipeline mode.
fn send(stream: &TcpStream, data: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(stream, data, SendFlags::NOSIGNAL)?)
}

/// `recv(2)`, as std's `read` on a socket, as the system call itself (see
/// `send`).
fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::net::recv(stream, buf, RecvFlags::empty())?.0)
}
