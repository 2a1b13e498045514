//! The live-upgrade hand-over format: what the old process tells the new
//! one about every loop it hands over, as bytes, and back.
//!
//! Pure code: bytes in, values out (and back), no sockets, no clocks. The
//! descriptors themselves travel beside these bytes (`upgrade.rs` sends
//! them with `SCM_RIGHTS`) in the order the bytes list them: for each loop,
//! its listeners, then its connections.
//!
//! # Layout, version 1 (integers little-endian)
//!
//! ```text
//! handover  := header · loop{loops}
//! header    := "ECHOLOOP" · version u32 · loops u32        (also the offer)
//! loop      := clock_origin_ns u64 · tick_ns u64 · counters
//!              · n u32 · service u8 {n} · m u32 · conn{m}
//! counters  := open i64 · accepted u64 · closed u64 {8} · lines u64
//!              · received u64 · sent u64
//! conn      := kind u8 · state · last_line tick
//!              · unanswered bytes · unsent bytes · head bytes · client addr
//! state     := 0 until:tick                       ProxyHeader
//!            | 1 until:tick                       Request
//!            | 2 fin u8                           Open
//!            | 3 fin u8 · then u8                 Paused
//!            | 4 reason u8 · then u8 · until opt  Flushing
//!            | 5 reason u8 · until:tick · allowance u32   Lingering
//! tick      := u64, not 0           opt := 0 | 1 tick
//! bytes     := len u32 · byte{len}
//! addr      := 0 | 4 ip[4] port u16 | 6 ip[16] port u16 flowinfo u32 scope u32
//! ```
//!
//! The header is also the *offer*: the first thing the old process sends,
//! so a new binary that reads another version refuses before anything is
//! handed over. [`decode`] refuses another magic or version, an unknown
//! tag, a zero tick, a length past the end and trailing bytes; it never
//! panics, and allocates in proportion to the input's length, never for a
//! length or count that the bytes left do not hold.
//!
//! It checks the format, not the connection's invariants: a state no
//! writer produces (a metrics connection `Open`, say) decodes and is served
//! as it says. The bytes come from the process that started this one.

use crate::admission::{Kind, Service};
use crate::conn::{AfterFlush, CloseReason, Resume, Saved, State};
use crate::metrics::Snapshot;
use crate::timer::Tick;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::num::NonZeroU64;

/// The first bytes of every hand-over.
pub const MAGIC: &[u8; 8] = b"ECHOLOOP";

/// The format this binary writes and reads.
pub const VERSION: u32 = 1;

/// The length of the [`header`]: magic, version, loop count.
pub const HEADER_LEN: usize = 16;

/// Everything one process hands to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// One entry per event loop, in loop order.
    pub loops: Vec<LoopState>,
}

/// One event loop's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopState {
    /// The start of its clock's tick 0, in `CLOCK_MONOTONIC` nanoseconds
    /// (the same clock in every process of the machine).
    pub clock_origin_ns: u64,
    /// The length of its tick, in nanoseconds.
    pub tick_ns: u64,
    /// Its counters, to continue from.
    pub counters: Snapshot,
    /// What each listener serves (one descriptor each).
    pub listeners: Vec<Service>,
    /// Its connections (one descriptor each, after the listeners').
    pub conns: Vec<ConnState>,
}

/// One connection: what it is to the server and its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnState {
    /// How it is counted.
    pub kind: Kind,
    /// Its state machine's data.
    pub saved: Saved,
}

impl Handover {
    /// The descriptors that travel with it: every listener and connection.
    pub fn descriptors(&self) -> usize {
        self.loops
            .iter()
            .map(|l| l.listeners.len() + l.conns.len())
            .sum()
    }
}

/// Why bytes are not a hand-over this binary can take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not the magic: not an echoloop hand-over at all.
    Magic,
    /// Another format version.
    Version(u32),
    /// It ends in the middle of a field.
    Truncated,
    /// A field holds a value no writer produces.
    Invalid(&'static str),
    /// Bytes after the last loop.
    Trailing,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Magic => f.write_str("not an echoloop hand-over (bad magic)"),
            Error::Version(v) => write!(
                f,
                "hand-over format version {v} is not supported (this binary reads version {VERSION})"
            ),
            Error::Truncated => f.write_str("hand-over cut short"),
            Error::Invalid(what) => write!(f, "hand-over holds an invalid {what}"),
            Error::Trailing => f.write_str("hand-over has bytes after its end"),
        }
    }
}

impl std::error::Error for Error {}

/// The header (the offer): magic, [`VERSION`], `loops`.
pub fn header(loops: u32) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..].copy_from_slice(&loops.to_le_bytes());
    h
}

/// The loop count of an offer, if its magic and version are ours.
pub fn read_header(h: &[u8; HEADER_LEN]) -> Result<u32, Error> {
    let mut r = Reader(h);
    r.header()
}

/// The hand-over as bytes.
pub fn encode(h: &Handover) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(&header(len32(h.loops.len())));
    for l in &h.loops {
        w.u64(l.clock_origin_ns);
        w.u64(l.tick_ns);
        w.counters(&l.counters);
        w.u32(len32(l.listeners.len()));
        for s in &l.listeners {
            w.u8(match s {
                Service::Echo => 0,
                Service::Metrics => 1,
            });
        }
        w.u32(len32(l.conns.len()));
        for c in &l.conns {
            w.conn(c);
        }
    }
    w.0
}

/// The hand-over those bytes describe.
pub fn decode(bytes: &[u8]) -> Result<Handover, Error> {
    let mut r = Reader(bytes);
    let loops = r.header()?;
    let mut out = Vec::new();
    for _ in 0..loops {
        let clock_origin_ns = r.u64()?;
        let tick_ns = r.u64()?;
        if tick_ns == 0 {
            return Err(Error::Invalid("tick length"));
        }
        let counters = r.counters()?;
        let mut listeners = Vec::new();
        for _ in 0..r.u32()? {
            listeners.push(match r.u8()? {
                0 => Service::Echo,
                1 => Service::Metrics,
                _ => return Err(Error::Invalid("listener service")),
            });
        }
        let mut conns = Vec::new();
        for _ in 0..r.u32()? {
            conns.push(r.conn()?);
        }
        out.push(LoopState {
            clock_origin_ns,
            tick_ns,
            counters,
            listeners,
            conns,
        });
    }
    if !r.0.is_empty() {
        return Err(Error::Trailing);
    }
    Ok(Handover { loops: out })
}

/// Counts fit in a `u32`: they are bounded by the descriptor limit, and
/// lengths by the output bound.
fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("a count or length beyond 4 GiB")
}

fn reason_code(r: CloseReason) -> u8 {
    CloseReason::ALL
        .iter()
        .position(|&x| x == r)
        .map_or(u8::MAX, |i| i as u8)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn tick(&mut self, t: Tick) {
        self.u64(t.get());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(len32(b.len()));
        self.0.extend_from_slice(b);
    }

    fn counters(&mut self, c: &Snapshot) {
        self.u64(c.open as u64);
        self.u64(c.accepted);
        c.closed.iter().for_each(|&n| self.u64(n));
        self.u64(c.lines);
        self.u64(c.received_bytes);
        self.u64(c.sent_bytes);
    }

    fn conn(&mut self, c: &ConnState) {
        self.u8(match c.kind {
            Kind::Client => 0,
            Kind::Busy => 1,
            Kind::Metrics => 2,
        });
        self.state(&c.saved.state);
        self.tick(c.saved.last_line);
        self.bytes(&c.saved.unanswered);
        self.bytes(&c.saved.unsent);
        self.bytes(&c.saved.head);
        self.addr(c.saved.client);
    }

    fn state(&mut self, s: &State) {
        match *s {
            State::ProxyHeader { until } => {
                self.u8(0);
                self.tick(until);
            }
            State::Request { until } => {
                self.u8(1);
                self.tick(until);
            }
            State::Open { fin } => {
                self.u8(2);
                self.u8(fin.into());
            }
            State::Paused { fin, then } => {
                self.u8(3);
                self.u8(fin.into());
                self.u8(match then {
                    Resume::Read => 0,
                    Resume::Finish => 1,
                });
            }
            State::Flushing {
                reason,
                then,
                until,
            } => {
                self.u8(4);
                self.u8(reason_code(reason));
                self.u8(match then {
                    AfterFlush::Close => 0,
                    AfterFlush::Linger => 1,
                });
                match until {
                    None => self.u8(0),
                    Some(t) => {
                        self.u8(1);
                        self.tick(t);
                    }
                }
            }
            State::Lingering {
                reason,
                until,
                allowance,
            } => {
                self.u8(5);
                self.u8(reason_code(reason));
                self.tick(until);
                self.u32(allowance);
            }
        }
    }

    fn addr(&mut self, a: Option<SocketAddr>) {
        match a {
            None => self.u8(0),
            Some(SocketAddr::V4(a)) => {
                self.u8(4);
                self.0.extend_from_slice(&a.ip().octets());
                self.0.extend_from_slice(&a.port().to_le_bytes());
            }
            Some(SocketAddr::V6(a)) => {
                self.u8(6);
                self.0.extend_from_slice(&a.ip().octets());
                self.0.extend_from_slice(&a.port().to_le_bytes());
                self.u32(a.flowinfo());
                self.u32(a.scope_id());
            }
        }
    }
}

/// Reads fields off the front of the bytes left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(Error::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn flag(&mut self) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::Invalid("flag")),
        }
    }
    fn tick(&mut self) -> Result<Tick, Error> {
        NonZeroU64::new(self.u64()?)
            .map(Tick::from)
            .ok_or(Error::Invalid("tick"))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Error> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn header(&mut self) -> Result<u32, Error> {
        if self.take(MAGIC.len()).map_err(|_| Error::Magic)? != MAGIC {
            return Err(Error::Magic);
        }
        match self.u32()? {
            VERSION => self.u32(),
            other => Err(Error::Version(other)),
        }
    }

    fn counters(&mut self) -> Result<Snapshot, Error> {
        let open = self.u64()? as i64;
        let accepted = self.u64()?;
        let mut closed = [0; CloseReason::ALL.len()];
        for n in closed.iter_mut() {
            *n = self.u64()?;
        }
        Ok(Snapshot {
            open,
            accepted,
            closed,
            lines: self.u64()?,
            received_bytes: self.u64()?,
            sent_bytes: self.u64()?,
        })
    }

    fn conn(&mut self) -> Result<ConnState, Error> {
        let kind = match self.u8()? {
            0 => Kind::Client,
            1 => Kind::Busy,
            2 => Kind::Metrics,
            _ => return Err(Error::Invalid("connection kind")),
        };
        let state = self.state()?;
        Ok(ConnState {
            kind,
            saved: Saved {
                state,
                last_line: self.tick()?,
                unanswered: self.bytes()?,
                unsent: self.bytes()?,
                head: self.bytes()?,
                client: self.addr()?,
            },
        })
    }

    fn reason(&mut self) -> Result<CloseReason, Error> {
        CloseReason::ALL
            .get(self.u8()? as usize)
            .copied()
            .ok_or(Error::Invalid("close reason"))
    }

    fn state(&mut self) -> Result<State, Error> {
        Ok(match self.u8()? {
            0 => State::ProxyHeader {
                until: self.tick()?,
            },
            1 => State::Request {
                until: self.tick()?,
            },
            2 => State::Open { fin: self.flag()? },
            3 => State::Paused {
                fin: self.flag()?,
                then: match self.u8()? {
                    0 => Resume::Read,
                    1 => Resume::Finish,
                    _ => return Err(Error::Invalid("resume")),
                },
            },
            4 => State::Flushing {
                reason: self.reason()?,
                then: match self.u8()? {
                    0 => AfterFlush::Close,
                    1 => AfterFlush::Linger,
                    _ => return Err(Error::Invalid("after-flush")),
                },
                until: match self.flag()? {
                    false => None,
                    true => Some(self.tick()?),
                },
            },
            5 => State::Lingering {
                reason: self.reason()?,
                until: self.tick()?,
                allowance: self.u32()?,
            },
            _ => return Err(Error::Invalid("state")),
        })
    }

    fn addr(&mut self) -> Result<Option<SocketAddr>, Error> {
        Ok(match self.u8()? {
            0 => None,
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Some(SocketAddr::V4(SocketAddrV4::new(ip, self.u16()?)))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                let flowinfo = self.u32()?;
                let scope = self.u32()?;
                Some(SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope)))
            }
            _ => return Err(Error::Invalid("address")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tick() -> impl Strategy<Value = Tick> {
        (1u64..).prop_map(|n| Tick::from(NonZeroU64::new(n).unwrap()))
    }

    fn reason() -> impl Strategy<Value = CloseReason> {
        prop::sample::select(CloseReason::ALL.to_vec())
    }

    fn state() -> impl Strategy<Value = State> {
        prop_oneof![
            tick().prop_map(|until| State::ProxyHeader { until }),
            tick().prop_map(|until| State::Request { until }),
            any::<bool>().prop_map(|fin| State::Open { fin }),
            (any::<bool>(), any::<bool>()).prop_map(|(fin, finish)| State::Paused {
                fin,
                then: if finish { Resume::Finish } else { Resume::Read },
            }),
            (reason(), any::<bool>(), prop::option::of(tick())).prop_map(
                |(reason, linger, until)| State::Flushing {
                    reason,
                    then: if linger {
                        AfterFlush::Linger
                    } else {
                        AfterFlush::Close
                    },
                    until,
                }
            ),
            (reason(), tick(), any::<u32>()).prop_map(|(reason, until, allowance)| {
                State::Lingering {
                    reason,
                    until,
                    allowance,
                }
            }),
        ]
    }

    fn conn() -> impl Strategy<Value = ConnState> {
        let bytes = || prop::collection::vec(any::<u8>(), 0..40);
        (
            prop::sample::select(vec![Kind::Client, Kind::Busy, Kind::Metrics]),
            state(),
            tick(),
            (bytes(), bytes(), bytes()),
            prop::option::of(any::<SocketAddr>()),
        )
            .prop_map(
                |(kind, state, last_line, (unanswered, unsent, head), client)| ConnState {
                    kind,
                    saved: Saved {
                        state,
                        last_line,
                        unanswered,
                        unsent,
                        head,
                        client,
                    },
                },
            )
    }

    fn handover() -> impl Strategy<Value = Handover> {
        let counters = (any::<i64>(), any::<[u64; 8]>(), any::<[u64; 4]>()).prop_map(
            |(open, closed, [accepted, lines, received_bytes, sent_bytes])| Snapshot {
                open,
                accepted,
                closed,
                lines,
                received_bytes,
                sent_bytes,
            },
        );
        let services = prop::collection::vec(
            prop::sample::select(vec![Service::Echo, Service::Metrics]),
            0..4,
        );
        let one_loop = (
            any::<u64>(),
            1u64..,
            counters,
            services,
            prop::collection::vec(conn(), 0..6),
        )
            .prop_map(
                |(clock_origin_ns, tick_ns, counters, listeners, conns)| LoopState {
                    clock_origin_ns,
                    tick_ns,
                    counters,
                    listeners,
                    conns,
                },
            );
        prop::collection::vec(one_loop, 0..4).prop_map(|loops| Handover { loops })
    }

    proptest! {
        #[test]
        fn what_is_encoded_decodes_to_the_same(h in handover()) {
            let bytes = encode(&h);
            prop_assert_eq!(decode(&bytes), Ok(h));
        }

        #[test]
        fn every_cut_short_hand_over_is_refused(h in handover(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&h);
            let n = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..n]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn the_offer_is_the_header() {
        let h = Handover { loops: vec![] };
        assert_eq!(&encode(&h)[..], &header(0)[..]);
        assert_eq!(read_header(&header(3)), Ok(3));
    }

    #[test]
    fn another_version_is_refused_naming_both() {
        let mut h = header(1);
        h[8..12].copy_from_slice(&99u32.to_le_bytes());
        let err = read_header(&h).unwrap_err();
        assert_eq!(err, Error::Version(99));
        assert_eq!(
            err.to_string(),
            "hand-over format version 99 is not supported (this binary reads version 1)"
        );
        assert_eq!(decode(&h), Err(Error::Version(99)));
    }

    #[test]
    fn another_magic_and_trailing_bytes_are_refused() {
        assert_eq!(
            read_header(b"NOTMAGIC\x01\0\0\0\0\0\0\0"),
            Err(Error::Magic)
        );
        let mut bytes = encode(&Handover { loops: vec![] });
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(Error::Trailing));
    }
}
