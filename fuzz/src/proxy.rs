//! Checks of the PROXY protocol header parser, [`echoloop::proxy::parse`],
//! for the `proxy` target (arbitrary bytes) and the `proxy_valid` target
//! (valid headers built by the `ppp` crate).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use echoloop::proxy::{self, MAX_LEN, Parsed, V1_MAX_LEN};
use ppp::{v1, v2};

use super::prefixes::first_final;
use super::recipe::Reader;

/// What the server does with a connection's first bytes: the answer of
/// [`proxy::parse`] without the log text of `Invalid`, which may name a
/// different flaw as more bytes show more of them. `None` is "read more".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Strip `len` header bytes; the client is `source` (or the socket peer).
    Done {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// Close the connection.
    Invalid,
}

/// [`proxy::parse`] as a [`Verdict`].
fn verdict(buf: &[u8]) -> Option<Verdict> {
    match proxy::parse(buf) {
        Parsed::Incomplete => None,
        Parsed::Done { len, source } => Some(Verdict::Done { len, source }),
        Parsed::Invalid(_) => Some(Verdict::Invalid),
    }
}

// ---------------------------------------------------------------------------
// `proxy`: arbitrary bytes
// ---------------------------------------------------------------------------

/// Arbitrary bytes as the start of a connection, split into reads in every
/// possible way: `parse` never panics, gives the same verdict for every
/// split, answers by the time the longest possible header is in, and every
/// header it accepts is one `ppp` decodes to the same client address.
pub fn check_bytes(input: &[u8]) {
    let answer = first_final(input, verdict);
    // The server buffers the longest prefix that is still incomplete.
    let buffered = answer.map_or(input.len(), |(at, _)| at.saturating_sub(1));
    assert!(buffered < MAX_LEN, "{buffered} bytes buffered");
    if input.starts_with(b"PROXY ") {
        assert!(
            buffered < V1_MAX_LEN,
            "{buffered} bytes of a v1 line buffered"
        );
    }
    match answer {
        Some((at, Verdict::Done { len, source })) => {
            // Done as soon as the last header byte arrives, not later.
            assert_eq!(
                at, len,
                "a {len}-byte header was accepted only at {at} bytes"
            );
            check_accepted(&input[..len], source);
        }
        Some((at, Verdict::Invalid)) => check_refused(&input[..at]),
        None => {}
    }
}

/// `header` was accepted with client address `source`: it is a v1 line of
/// at most 107 bytes or a v2 header that `ppp` decodes, and `source` is the
/// address it carries.
fn check_accepted(header: &[u8], source: Option<SocketAddr>) {
    if header.starts_with(v2::PROTOCOL_PREFIX) {
        let decoded = v2::Header::try_from(header).expect("ppp decodes an accepted v2 header");
        assert_eq!(decoded.len(), header.len());
        assert_eq!(
            source,
            v2_client(decoded.command, decoded.protocol, &decoded.addresses)
        );
        return;
    }
    assert!(header.starts_with(b"PROXY ") && header.ends_with(b"\r\n"));
    assert!(header.len() <= V1_MAX_LEN);
    assert_eq!(
        header.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one line"
    );
    if header.starts_with(b"PROXY UNKNOWN") {
        assert_eq!(source, None);
    } else {
        let decoded = v1::Header::try_from(header).expect("ppp decodes an accepted v1 line");
        assert_eq!(source, v1_client(&decoded.addresses));
    }
}

/// `buf` was refused: `ppp` does not decode a header from it either.
///
/// For v1, only a first line that ends in CRLF within the length bound is
/// given to `ppp`: `ppp` also takes a bare LF as the end of the line, which
/// the protocol does not allow.
fn check_refused(buf: &[u8]) {
    if buf.starts_with(v2::PROTOCOL_PREFIX) {
        assert!(
            v2::Header::try_from(buf).is_err(),
            "refused a v2 header that ppp decodes: {buf:02x?}"
        );
    } else if let Some(lf) = buf.iter().position(|&b| b == b'\n') {
        let line = &buf[..=lf];
        if line.len() <= V1_MAX_LEN && line.ends_with(b"\r\n") {
            assert!(
                v1::Header::try_from(line).is_err(),
                "refused a v1 line that ppp decodes: {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}

/// The client address a v2 header names: only a `PROXY` command over TCP
/// on IPv4 or IPv6 names one (HAProxy's rule).
fn v2_client(
    command: v2::Command,
    protocol: v2::Protocol,
    addresses: &v2::Addresses,
) -> Option<SocketAddr> {
    if command != v2::Command::Proxy || protocol != v2::Protocol::Stream {
        return None;
    }
    match addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}

/// The client address of decoded v1 addresses (`None` for `UNKNOWN`).
fn v1_client(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

// ---------------------------------------------------------------------------
// `proxy_valid`: headers built by `ppp` from a recipe
// ---------------------------------------------------------------------------

/// The input read as a recipe for a valid header, which `ppp` builds and
/// which is followed by client data: every strict prefix of the header is
/// incomplete, and from its last byte on, with any client data after it, it
/// is accepted with its exact length and client address.
pub fn check_valid(input: &[u8]) {
    let Some((header, source, payload)) = build(input) else {
        return;
    };
    let mut buf = header.clone();
    buf.extend_from_slice(payload);
    let answer = first_final(&buf, verdict);
    let expected = Verdict::Done {
        len: header.len(),
        source,
    };
    assert_eq!(
        answer,
        Some((header.len(), expected)),
        "header {header:02x?} ({:?})",
        String::from_utf8_lossy(&header)
    );
}

/// Builds the header a recipe describes, with `ppp`; returns it, the client
/// address it names and the client data that follows it. `None` if the TLVs
/// do not fit in a header (`ppp` refuses to build it).
///
/// A recipe is read field by field, and reads zeros past the end of the
/// input (as the `arbitrary` crate does), so every input is some recipe:
///
/// | field | bytes | meaning |
/// |---|---|---|
/// | kind | 1 | modulo 7: v1 `TCP4`, v1 `TCP6`, v1 `UNKNOWN`, v2 IPv4, v2 IPv6, v2 UNIX, v2 UNSPEC |
/// | command | 1 (v2) | low bit: `LOCAL` (0) or `PROXY` (1) |
/// | transport | 1 (v2) | modulo 3: UNSPEC, STREAM (TCP), DGRAM |
/// | addresses | 12, 36 or 216 | source, destination, source port, destination port (big-endian); none for `UNKNOWN`/UNSPEC |
/// | TLV count | 1 (v2) | modulo 8 |
/// | each TLV | 2 + length | type, length (0..=255), value |
/// | client data | the rest | sent right after the header |
pub fn build(input: &[u8]) -> Option<(Vec<u8>, Option<SocketAddr>, &[u8])> {
    let mut r = Reader(input);
    let kind = r.byte() % 7;
    if kind < 3 {
        let addresses = match kind {
            0 => {
                let (src, dst) = (Ipv4Addr::from(r.array()), Ipv4Addr::from(r.array()));
                v1::Addresses::new_tcp4(src, dst, r.u16(), r.u16())
            }
            1 => {
                let (src, dst) = (Ipv6Addr::from(r.array()), Ipv6Addr::from(r.array()));
                v1::Addresses::new_tcp6(src, dst, r.u16(), r.u16())
            }
            _ => v1::Addresses::Unknown,
        };
        let header = addresses.to_string().into_bytes();
        return Some((header, v1_client(&addresses), r.0));
    }

    let command = if r.byte() & 1 == 1 {
        v2::Command::Proxy
    } else {
        v2::Command::Local
    };
    let protocol = match r.byte() % 3 {
        0 => v2::Protocol::Unspecified,
        1 => v2::Protocol::Stream,
        _ => v2::Protocol::Datagram,
    };
    let addresses: v2::Addresses = match kind {
        3 => v2::IPv4::new(
            Ipv4Addr::from(r.array()),
            Ipv4Addr::from(r.array()),
            r.u16(),
            r.u16(),
        )
        .into(),
        4 => v2::IPv6::new(
            Ipv6Addr::from(r.array()),
            Ipv6Addr::from(r.array()),
            r.u16(),
            r.u16(),
        )
        .into(),
        5 => v2::Unix::new(r.array(), r.array()).into(),
        _ => v2::Addresses::Unspecified,
    };
    let client = v2_client(command, protocol, &addresses);
    let mut builder = v2::Builder::with_addresses(v2::Version::Two | command, protocol, addresses);
    for _ in 0..r.byte() % 8 {
        let kind = r.byte();
        let len = usize::from(r.byte());
        builder = builder.write_tlv(kind, r.take(len)).ok()?;
    }
    Some((builder.build().ok()?, client, r.0))
}
