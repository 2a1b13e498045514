//! Client sockets: which 127.0.0.x source addresses the connections are
//! spread over, and how one non-blocking connection is opened with socket2
//! and handed to mio.

use mio::net::TcpStream;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

/// Connections per source address when the count is automatic: well below
/// the 28,232 ports of the default ephemeral range (32768-60999).
pub const CONNS_PER_SOURCE: usize = 20_000;

/// Highest number of source addresses (127.0.0.1 ..= 127.0.0.250).
pub const MAX_SOURCES: usize = 250;

/// Chooses the source addresses. Empty means "let the kernel choose" (no
/// bind). With a target on 127.0.0.0/8: `explicit` addresses if given, else
/// ceil(conns / 20,000); binding happens when that is more than one, or
/// always with `spread` (which then uses at least two).
pub fn plan_sources(
    target: SocketAddr,
    conns: usize,
    explicit: Option<usize>,
    spread: bool,
) -> Result<Vec<Ipv4Addr>, String> {
    let on_loopback = matches!(target.ip(), IpAddr::V4(ip) if ip.octets()[0] == 127);
    if !on_loopback {
        if explicit.is_some() || spread {
            return Err(format!(
                "--sources/--spread need a target on 127.0.0.0/8, not {target}"
            ));
        }
        return Ok(Vec::new());
    }
    let auto = conns.div_ceil(CONNS_PER_SOURCE).max(1);
    let k = match explicit {
        Some(k) => k,
        None if spread => auto.max(2),
        None => auto,
    };
    if k == 0 || k > MAX_SOURCES {
        return Err(format!("--sources must be 1..={MAX_SOURCES}, got {k}"));
    }
    if k == 1 && !spread && explicit.is_none() {
        return Ok(Vec::new());
    }
    Ok((1..=k).map(|i| Ipv4Addr::new(127, 0, 0, i as u8)).collect())
}

/// Starts a non-blocking connection to `target`, bound to `source` if given.
/// The connection is in progress when this returns: wait for writable, then
/// ask `connect_result`.
pub fn start_connect(target: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // Pick the port at connect() time from the full 4-tuple rather than
        // at bind() time, so ports are not reserved per source address.
        let one: libc::c_int = 1;
        // SAFETY: a valid socket, option value and length of a c_int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        sock.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(ip), 0)))?;
    }
    match sock.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}

/// The outcome of a connection in progress, asked after a writable event:
/// `None` while it is still connecting.
pub fn connect_result(stream: &TcpStream) -> Option<io::Result<()>> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return Some(Err(e)),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
        Err(e) => Some(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn few_conns_need_no_bind() {
        assert!(
            plan_sources(addr("127.0.0.1:1"), 100, None, false)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn many_conns_spread() {
        let s = plan_sources(addr("127.0.0.1:1"), 50_000, None, false).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], Ipv4Addr::new(127, 0, 0, 3));
    }

    #[test]
    fn spread_flag_and_override() {
        assert_eq!(
            plan_sources(addr("127.0.0.1:1"), 10, None, true)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            plan_sources(addr("127.0.0.1:1"), 10, Some(1), true)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            plan_sources(addr("127.0.0.1:1"), 10, Some(4), false)
                .unwrap()
                .len(),
            4
        );
        assert!(plan_sources(addr("127.0.0.1:1"), 10, Some(0), false).is_err());
        assert!(plan_sources(addr("[::1]:1"), 10, Some(2), false).is_err());
    }
}
