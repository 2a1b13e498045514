//! PROXY protocol header parsing: tells, from the bytes a connection has sent
//! so far, whether they hold a complete PROXY protocol v1 or v2 header, how
//! long it is, and which client address it carries.
//!
//! A load balancer in front of echoloop (HAProxy, nginx `stream`) writes one
//! header at the start of every connection, before the client's own bytes
//! (SPEC §3, `--proxy-protocol`). The header can arrive split across any
//! number of TCP segments, so [`parse`] is called again on the whole buffer
//! each time more bytes arrive, and answers one of:
//!
//! - [`Parsed::Incomplete`]: the bytes are a valid start of a header; read more.
//! - [`Parsed::Done`]: a whole header; strip `len` bytes, keep the rest as
//!   client data.
//! - [`Parsed::Invalid`]: these bytes can never become a header; close.
//!
//! This module is pure: no sockets, no clock. The caller owns the buffer and
//! the `--proxy-header-timeout`. Bounds are the protocol's own (see
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): a v1
//! header is at most [`V1_MAX_LEN`] bytes, a v2 header is [`V2_FIXED_LEN`]
//! bytes plus the length it declares (so at most 65,551 bytes).
//!
//! Field decoding is done by the `ppp` crate. Deciding where a header ends,
//! and whether a prefix can still become one, is done here, because `ppp`'s
//! streaming answers are not exact for v1: it rejects the valid prefix
//! `"PROXY TCP4 1.2.3.4 5.6.7.8 80 "`, and it never completes an `UNKNOWN`
//! line that carries more than four fields. So v1 bytes reach `ppp` only as
//! one complete CRLF-terminated line, and v2 bytes are checked tag byte by
//! tag byte as they arrive (`ppp` looks at them only once all 16 fixed bytes
//! are in).

use std::net::SocketAddr;

use ppp::PartialResult;
use ppp::{v1, v2};

/// The longest possible v1 header, CRLF included (the spec's worst case,
/// `PROXY UNKNOWN` with two full IPv6 addresses and two 5-digit ports).
pub const V1_MAX_LEN: usize = 107;

/// The fixed part of a v2 header: signature, version/command, family/protocol
/// and the big-endian length of what follows.
pub const V2_FIXED_LEN: usize = 16;

/// The longest header of either version (a v2 header declaring 65,535 bytes).
/// A caller never needs to buffer more than this before [`parse`] answers
/// something other than [`Parsed::Incomplete`].
pub const MAX_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;

/// What every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";

/// What every v2 header starts with (12 bytes, chosen never to be valid text).
const V2_SIGNATURE: &[u8] = v2::PROTOCOL_PREFIX;

/// Offset of the v2 version (high nibble) / command (low nibble) byte.
const V2_VERSION_COMMAND: usize = 12;

/// Offset of the v2 address family (high nibble) / transport (low nibble) byte.
const V2_FAMILY_TRANSPORT: usize = 13;

/// The outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes are a valid prefix of a header that is not complete yet.
    Incomplete,
    /// A complete header.
    Done {
        /// Number of header bytes at the start of the buffer. Everything after
        /// them is client data and must be kept.
        len: usize,
        /// The real client address, for v1 `TCP4`/`TCP6` and for v2 `PROXY`
        /// over TCP on IPv4/IPv6. `None` for v1 `UNKNOWN` and v2 `LOCAL`
        /// (load-balancer health checks), and for v2 `PROXY` with any other
        /// family or transport (UNIX, UDP, UNSPEC): as HAProxy does, the
        /// caller then uses the socket's own peer address.
        source: Option<SocketAddr>,
    },
    /// These bytes can never become a valid header; the reason is meant for
    /// a log line.
    Invalid(&'static str),
}

/// Parses the PROXY protocol header at the start of `buf`.
///
/// Call it with everything received so far, each time more arrives. It
/// never reads past the header, never allocates and never panics.
pub fn parse(buf: &[u8]) -> Parsed {
    if starts_like(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Parsed::Invalid("not a PROXY protocol header")
    }
}

/// True if `buf` and `expected` agree on their common length, i.e. `buf` is
/// a prefix of `expected` or starts with it.
fn starts_like(buf: &[u8], expected: &[u8]) -> bool {
    let n = buf.len().min(expected.len());
    buf[..n] == expected[..n]
}

// ---------------------------------------------------------------------------
// v1: one line of text, `PROXY <proto> [<src> <dst> <sport> <dport>]\r\n`
// ---------------------------------------------------------------------------

/// Parses a buffer that starts like `"PROXY "`.
///
/// The same lexical rules are applied to a prefix and to a complete line, so
/// a prefix refused here could never have become a valid header, and the
/// answers only ever move from `Incomplete` to `Done` or `Invalid`.
fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let (line, complete) = match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf > 0 && window[lf - 1] == b'\r' => (&buf[..=lf], true),
        Some(_) => return Parsed::Invalid("v1 header line does not end in CRLF"),
        None if buf.len() >= V1_MAX_LEN => {
            return Parsed::Invalid("v1 header longer than 107 bytes");
        }
        None => (buf, false),
    };
    let Some(body) = line.get(V1_PREFIX.len()..) else {
        return Parsed::Incomplete; // still inside "PROXY "
    };
    // `body` without its CRLF, or without a lone CR still waiting for its LF.
    // `whole` means no more fields can follow.
    let (body, whole) = match body.strip_suffix(b"\r\n").or(body.strip_suffix(b"\r")) {
        Some(stripped) => (stripped, true),
        None => (body, false),
    };
    let (proto, fields) = match body.iter().position(|&b| b == b' ') {
        Some(space) => (&body[..space], Some(&body[space + 1..])),
        None => (body, None),
    };

    match proto {
        // "The receiver must ignore anything presented before the CRLF is
        // found" after UNKNOWN. (`ppp` would want at most four fields.)
        b"UNKNOWN" if complete => Parsed::Done {
            len: line.len(),
            source: None,
        },
        b"UNKNOWN" => Parsed::Incomplete,
        b"TCP4" | b"TCP6" => match fields {
            None if whole => Parsed::Invalid("v1 header is missing its addresses"),
            None => Parsed::Incomplete,
            Some(fields) if !tcp_fields_ok(fields, whole) => {
                Parsed::Invalid("v1 header has malformed addresses or ports")
            }
            Some(_) if complete => decode_v1_tcp(line),
            Some(_) => Parsed::Incomplete,
        },
        _ if !whole && fields.is_none() && could_be_v1_proto(proto) => Parsed::Incomplete,
        _ => Parsed::Invalid("v1 header has an unknown protocol"),
    }
}

/// True if `word` is the start of one of the v1 protocol words.
fn could_be_v1_proto(word: &[u8]) -> bool {
    [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
        .iter()
        .any(|proto| proto.starts_with(word))
}

/// Lexical check of `<src> <dst> <sport> <dport>` or of a prefix of it
/// (`whole == false`): non-empty space-separated fields (only the last one of
/// a prefix may be empty, it is being typed), address characters in the
/// first two, digits in the ports, four fields in a whole line.
///
/// Whether the addresses and port numbers really parse is `ppp`'s job, once
/// the line is complete.
fn tcp_fields_ok(fields: &[u8], whole: bool) -> bool {
    let count = fields.split(|&b| b == b' ').count();
    if count > 4 || (whole && count != 4) {
        return false;
    }
    fields.split(|&b| b == b' ').enumerate().all(|(i, field)| {
        let being_typed = !whole && i + 1 == count;
        let allowed = |&b: &u8| match i {
            0 | 1 => b.is_ascii_hexdigit() || b == b'.' || b == b':',
            _ => b.is_ascii_digit(),
        };
        (being_typed || !field.is_empty()) && field.iter().all(allowed)
    })
}

/// Decodes a complete, lexically valid `TCP4`/`TCP6` line with `ppp`.
fn decode_v1_tcp(line: &[u8]) -> Parsed {
    use v1::ParseError as E;
    match v1::Header::try_from(line) {
        Ok(header) => {
            let source = match header.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Parsed::Done {
                len: line.len(),
                source,
            }
        }
        Err(v1::BinaryParseError::Parse(
            E::InvalidSourceAddress(_) | E::InvalidDestinationAddress(_),
        )) => Parsed::Invalid("v1 header has an invalid address"),
        Err(v1::BinaryParseError::Parse(
            E::InvalidSourcePort(_) | E::InvalidDestinationPort(_),
        )) => Parsed::Invalid("v1 header has an invalid port"),
        Err(_) => Parsed::Invalid("malformed v1 header"),
    }
}

// ---------------------------------------------------------------------------
// v2: binary, 16 fixed bytes then `len` bytes of addresses and TLVs
// ---------------------------------------------------------------------------

/// Parses a buffer that starts like the v2 signature.
fn parse_v2(buf: &[u8]) -> Parsed {
    if let Some(&version_command) = buf.get(V2_VERSION_COMMAND) {
        if version_command >> 4 != 2 {
            return Parsed::Invalid("v2 header has an unsupported version");
        }
        if version_command & 0x0F > 1 {
            return Parsed::Invalid("v2 header has an unknown command");
        }
    }
    if let Some(&family_transport) = buf.get(V2_FAMILY_TRANSPORT) {
        if family_transport >> 4 > 3 {
            return Parsed::Invalid("v2 header has an unknown address family");
        }
        if family_transport & 0x0F > 2 {
            return Parsed::Invalid("v2 header has an unknown transport protocol");
        }
    }
    match v2::Header::try_from(buf) {
        Ok(header) => Parsed::Done {
            len: header.len(),
            source: v2_source(&header),
        },
        Err(e) if e.is_incomplete() => Parsed::Incomplete,
        Err(v2::ParseError::InvalidAddresses(..)) => {
            Parsed::Invalid("v2 header is too short for its address family")
        }
        Err(_) => Parsed::Invalid("malformed v2 header"),
    }
}

/// The client address of a complete v2 header: only a `PROXY` command over
/// TCP on IPv4 or IPv6 carries one we can use (HAProxy's rule too).
fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command != v2::Command::Proxy || header.protocol != v2::Protocol::Stream {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// Asserts that every strict prefix of `header` is `Incomplete`, and that
    /// `header` followed by `payload` is `Done` with the header's length.
    fn assert_streams(header: &[u8], payload: &[u8], source: Option<SocketAddr>) {
        for end in 0..header.len() {
            assert_eq!(
                parse(&header[..end]),
                Parsed::Incomplete,
                "prefix of {end} bytes: {:?}",
                String::from_utf8_lossy(&header[..end])
            );
        }
        let mut buf = header.to_vec();
        buf.extend_from_slice(payload);
        for end in header.len()..=buf.len() {
            assert_eq!(
                parse(&buf[..end]),
                Parsed::Done {
                    len: header.len(),
                    source
                }
            );
        }
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    /// Builds a v2 header by hand, independently of `ppp`.
    fn v2_header(version_command: u8, family_transport: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(version_command);
        h.push(family_transport);
        h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn inet_body(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                b.extend_from_slice(&s.octets());
                b.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                b.extend_from_slice(&s.octets());
                b.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        b.extend_from_slice(&src.port().to_be_bytes());
        b.extend_from_slice(&dst.port().to_be_bytes());
        b.extend_from_slice(tlvs);
        b
    }

    /// A NOOP TLV and an AUTHORITY TLV.
    const TLVS: &[u8] = b"\x04\x00\x02xx\x02\x00\x0bexample.com";

    // ----- v1 -------------------------------------------------------------

    #[test]
    fn v1_tcp4() {
        assert_streams(
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1234\r\n",
            b"hello\n",
            addr("192.0.2.7:56324"),
        );
    }

    #[test]
    fn v1_tcp6() {
        assert_streams(
            b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 1234\r\n",
            b"hello\n",
            addr("[2001:db8::7]:56324"),
        );
    }

    #[test]
    fn v1_unknown() {
        assert_streams(b"PROXY UNKNOWN\r\n", b"ping\n", None);
    }

    #[test]
    fn v1_unknown_ignores_what_follows() {
        assert_streams(b"PROXY UNKNOWN a b c d e f\r\n", b"", None);
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                      ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_streams(worst, b"x", None);
    }

    #[test]
    fn v1_longest_tcp6() {
        let h = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                  ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(h.len(), V1_MAX_LEN - 3); // "TCP6" is 3 bytes shorter than "UNKNOWN"
        assert_streams(
            h,
            b"",
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
    }

    #[test]
    fn v1_too_long_without_crlf() {
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.resize(V1_MAX_LEN - 1, b'a');
        assert_eq!(parse(&h), Parsed::Incomplete);
        h.push(b'a');
        assert_eq!(
            parse(&h),
            Parsed::Invalid("v1 header longer than 107 bytes")
        );
        // A CRLF beyond byte 107 does not rescue it.
        h.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
    }

    #[test]
    fn v1_invalid() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"hello\n",
            b"proxy TCP4",
            b"PROXY\r\n",
            b"PROXY  TCP4",
            b"PROXY TCP5",
            b"PROXY tcp4 ",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4\r",
            b"PROXY TCP4 1.2.3.4\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\rX",
            b"PROXY TCP4 1.2.3.4  5.6.7.8",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 9",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 8x",
            b"PROXY TCP4 hostname",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
            b"PROXY TCP4 1.2.3.999 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 ::1 ::1 80 443\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n",
        ];
        for case in cases {
            assert!(
                matches!(parse(case), Parsed::Invalid(_)),
                "{:?} -> {:?}",
                String::from_utf8_lossy(case),
                parse(case)
            );
        }
    }

    #[test]
    fn v1_invalid_reasons() {
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.999 5.6.7.8 80 443\r\n"),
            Parsed::Invalid("v1 header has an invalid address")
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n"),
            Parsed::Invalid("v1 header has an invalid port")
        );
        assert_eq!(
            parse(b"PROXY SCTP"),
            Parsed::Invalid("v1 header has an unknown protocol")
        );
    }

    // ----- v2 -------------------------------------------------------------

    #[test]
    fn v2_proxy_inet_with_tlvs() {
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let h = v2_header(0x21, 0x11, &inet_body(src, dst, TLVS));
        assert_eq!(h.len(), V2_FIXED_LEN + 12 + TLVS.len());
        assert_streams(&h, b"hello\n", Some(src));
    }

    #[test]
    fn v2_proxy_inet6_with_tlvs() {
        let src: SocketAddr = "[2001:db8::9]:40000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:1234".parse().unwrap();
        let h = v2_header(0x21, 0x21, &inet_body(src, dst, TLVS));
        assert_eq!(h.len(), V2_FIXED_LEN + 36 + TLVS.len());
        assert_streams(&h, b"\r\n\r\n", Some(src));
    }

    #[test]
    fn v2_local() {
        // HAProxy's health check: LOCAL, UNSPEC, no body.
        assert_streams(&v2_header(0x20, 0x00, b""), b"ping\n", None);
        // LOCAL with addresses: they are ignored.
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let h = v2_header(0x20, 0x11, &inet_body(src, src, b""));
        assert_streams(&h, b"", None);
    }

    #[test]
    fn v2_proxy_without_usable_address() {
        // UNSPEC family, UNIX family and UDP transport: use the socket peer.
        assert_streams(&v2_header(0x21, 0x00, b""), b"", None);
        assert_streams(&v2_header(0x21, 0x31, &[0u8; 216]), b"", None);
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        assert_streams(&v2_header(0x21, 0x12, &inet_body(src, src, b"")), b"", None);
    }

    #[test]
    fn v2_invalid() {
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let body = inet_body(src, src, b"");
        let mut bad_sig = v2_header(0x21, 0x11, &body);
        bad_sig[11] = b'X';
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bad_sig[..12].to_vec(), "not a PROXY protocol header"),
            (
                v2_header(0x11, 0x11, &body)[..13].to_vec(),
                "v2 header has an unsupported version",
            ),
            (
                v2_header(0x22, 0x11, &body)[..13].to_vec(),
                "v2 header has an unknown command",
            ),
            (
                v2_header(0x21, 0x41, &body)[..14].to_vec(),
                "v2 header has an unknown address family",
            ),
            (
                v2_header(0x21, 0x13, &body)[..14].to_vec(),
                "v2 header has an unknown transport protocol",
            ),
            (
                v2_header(0x21, 0x11, &body[..11]),
                "v2 header is too short for its address family",
            ),
            (
                v2_header(0x21, 0x21, &body),
                "v2 header is too short for its address family",
            ),
        ];
        for (bytes, reason) in cases {
            assert_eq!(parse(&bytes), Parsed::Invalid(reason), "{bytes:02x?}");
        }
    }

    #[test]
    fn v2_declared_length_is_awaited() {
        // A header may declare up to 65535 body bytes; until they are all in
        // it is incomplete, and the payload after it is not looked at.
        let h = v2_header(0x21, 0x11, &vec![0u8; 65535]);
        assert_eq!(parse(&h[..h.len() - 1]), Parsed::Incomplete);
        assert!(matches!(parse(&h), Parsed::Done { len: MAX_LEN, .. }));
    }

    #[test]
    fn empty_buffer_is_incomplete() {
        assert_eq!(parse(b""), Parsed::Incomplete);
    }

    // ----- properties -----------------------------------------------------

    /// A random (v1 or v2) header with the source address it must yield.
    fn header_strategy() -> impl Strategy<Value = (Vec<u8>, Option<SocketAddr>)> {
        let v4 = (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port)));
        let v6 = (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port)));
        let pair = prop_oneof![(v4.clone(), v4), (v6.clone(), v6)];
        let tlvs = proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..4,
        );
        prop_oneof![
            // v1 TCP4 / TCP6
            pair.clone().prop_map(|(src, dst)| {
                let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
                let line = format!(
                    "PROXY {proto} {} {} {} {}\r\n",
                    src.ip(),
                    dst.ip(),
                    src.port(),
                    dst.port()
                );
                (line.into_bytes(), Some(src))
            }),
            // v1 UNKNOWN with optional ignored fields
            "( [a-zA-Z0-9.:]{1,15}){0,6}"
                .prop_map(|rest| { (format!("PROXY UNKNOWN{rest}\r\n").into_bytes(), None) }),
            // v2 PROXY over TCP, with TLVs
            (pair.clone(), tlvs.clone()).prop_map(|((src, dst), tlvs)| {
                let mut raw = Vec::new();
                for (kind, value) in tlvs {
                    raw.push(kind);
                    raw.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
                    raw.extend_from_slice(&value);
                }
                let family = if src.is_ipv4() { 0x11 } else { 0x21 };
                (
                    v2_header(0x21, family, &inet_body(src, dst, &raw)),
                    Some(src),
                )
            }),
            // v2 LOCAL, with or without addresses
            (pair, any::<bool>()).prop_map(|((src, dst), with_addresses)| {
                if with_addresses {
                    let family = if src.is_ipv4() { 0x11 } else { 0x21 };
                    (v2_header(0x20, family, &inet_body(src, dst, b"")), None)
                } else {
                    (v2_header(0x20, 0x00, b""), None)
                }
            }),
        ]
    }

    /// Byte strings near the header grammars, to reach the corner cases that
    /// uniform random bytes never do.
    fn almost_headers() -> impl Strategy<Value = Vec<u8>> {
        let v1 = "PROXY (TCP4|TCP6|UNKNOWN|TCP|UNK|X)?[ 0-9a-fA-F.:+\r\n]{0,120}"
            .prop_map(String::into_bytes);
        let tag = |known: Vec<u8>| prop_oneof![proptest::sample::select(known), any::<u8>(),];
        let v2 = (
            tag(vec![0x20, 0x21]),
            tag(vec![0x00, 0x11, 0x12, 0x21, 0x31]),
            0u16..80,
            proptest::collection::vec(any::<u8>(), 0..120),
        )
            .prop_map(|(version_command, family_transport, len, rest)| {
                let mut h = V2_SIGNATURE.to_vec();
                h.extend_from_slice(&[version_command, family_transport]);
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&rest);
                h
            });
        prop_oneof![v1, v2]
    }

    proptest! {
        #[test]
        fn every_prefix_is_incomplete_until_the_header_is_done(
            (header, source) in header_strategy(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = header.clone();
            buf.extend_from_slice(&payload);
            for end in 0..header.len() {
                prop_assert_eq!(parse(&buf[..end]), Parsed::Incomplete, "prefix {}", end);
            }
            for end in header.len()..=buf.len() {
                prop_assert_eq!(parse(&buf[..end]), Parsed::Done { len: header.len(), source });
            }
        }

        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&buf);
        }

        #[test]
        fn garbage_after_a_signature_never_panics(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut buf = if v2 { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            buf.extend_from_slice(&tail);
            if let Parsed::Done { len, .. } = parse(&buf) {
                prop_assert!(len <= buf.len());
            }
        }

        /// Feeding more bytes only ever moves `Incomplete` to `Done` or
        /// `Invalid`, and a `Done` stays the same `Done`: the caller may act
        /// on the first answer that is not `Incomplete`.
        #[test]
        fn answers_are_final(buf in almost_headers()) {
            let mut first_final = None;
            for end in 0..=buf.len() {
                let answer = parse(&buf[..end]);
                match (first_final, answer) {
                    (None, Parsed::Incomplete) => {}
                    (None, answer) => first_final = Some(answer),
                    (Some(Parsed::Invalid(_)), answer) => {
                        prop_assert!(matches!(answer, Parsed::Invalid(_)), "{:?} at {}", answer, end);
                    }
                    (Some(done), answer) => prop_assert_eq!(answer, done),
                }
            }
        }
    }
}
