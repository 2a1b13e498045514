//! Raw socket calls: binding listeners and classifying what `accept` says.
//!
//! Binding goes through socket2 so the options a daemon needs are explicit:
//! `SO_REUSEADDR` (restart while old connections sit in TIME_WAIT),
//! `SO_REUSEPORT` when several loops share one address (the kernel spreads
//! new connections over their listeners), `IPV6_V6ONLY` so `[::]:1234` and
//! `0.0.0.0:1234` can both be listed, non-blocking and close-on-exec.
//!
//! Under systemd, [`inherited`] takes the listening sockets it passed
//! instead (socket activation). [`raise_fd_limit`] lifts the open-file
//! limit as far as the hard limit allows.
//!
//! [`accept`] turns `io::Result` into an [`Accepted`] right at the call, so
//! the loop decides what to do from a name, not from an errno three frames
//! up: descriptor exhaustion pauses accepting, a transient failure of one
//! handshake is skipped, and nothing here ever stops the server.

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;

/// The kernel's accept queue length we ask for (capped by `somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Binds a non-blocking listener on `addr`; `reuse_port` lets the other
/// loops of this process bind the same address.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// What one `accept` call gave.
#[derive(Debug)]
pub enum Accepted {
    /// A new connection.
    Conn(TcpStream, SocketAddr),
    /// The accept queue is empty.
    WouldBlock,
    /// Out of descriptors or kernel memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
    /// `ENOMEM`): retrying at once would spin, so pause accepting.
    Exhausted(io::Error),
    /// One handshake failed (`ECONNABORTED`, `EPROTO`, `EPERM`, network
    /// down…, the list of accept(2)): skip it and accept the next.
    Transient(io::Error),
    /// Anything else (`EINVAL` on a socket that is not listening, …): it
    /// would fail again at once, so treat it like exhaustion and pause.
    Failed(io::Error),
}

/// Accepts one connection and names the outcome.
pub fn accept(listener: &TcpListener) -> Accepted {
    loop {
        return match listener.accept() {
            Ok((stream, peer)) => Accepted::Conn(stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Accepted::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_exhaustion(&e) => Accepted::Exhausted(e),
            Err(e) if is_transient(&e) => Accepted::Transient(e),
            Err(e) => Accepted::Failed(e),
        };
    }
}

/// The network errors accept(2) says to treat like `EAGAIN`, plus
/// `ECONNABORTED` and `EPERM` (a firewall rule refused the connection).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ETIMEDOUT
        )
    )
}

fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Listening sockets passed by systemd socket activation (`LISTEN_PID`
/// naming this process, `LISTEN_FDS` descriptors from fd 3), made
/// non-blocking; empty when the process was not socket-activated.
pub fn inherited() -> io::Result<Vec<std::net::TcpListener>> {
    use std::os::fd::FromRawFd;
    let mut listeners = Vec::new();
    for fd in sd_notify::listen_fds()? {
        // SAFETY: systemd hands these descriptors to this process (LISTEN_PID
        // was checked) and nothing else in the process owns them.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        if socket.r#type()? != Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited fd {fd} is not a stream socket"),
            ));
        }
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        listeners.push(socket.into());
    }
    Ok(listeners)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the
/// effective soft limit (SPEC §3: logged at start).
pub fn raise_fd_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_port_lets_two_listeners_share_an_address() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
    }

    #[test]
    fn a_taken_address_is_an_error() {
        let first = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let err = bind(first.local_addr().unwrap(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn exhaustion_is_told_apart_from_transient_errors() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
