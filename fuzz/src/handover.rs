//! Checks of the live-upgrade hand-over format, [`echoloop::handover`], for
//! the `handover` target (arbitrary bytes as what a new process reads from
//! the old one) and the `handover_valid` target (hand-overs built from a
//! recipe, encoded, decoded).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::num::NonZeroU64;

use echoloop::admission::{Kind, Service};
use echoloop::conn::{AfterFlush, CloseReason, Conn, Resume, Saved, State};
use echoloop::handover::{self, ConnState, Error, HEADER_LEN, Handover, LoopState};
use echoloop::metrics::Snapshot;
use echoloop::timer::Tick;

use super::alloc::peak_during;
use super::recipe::Reader;

/// The most heap `decode` may hold per input byte. A decoded connection
/// takes about six times the 24 bytes it takes at least on the wire, and a
/// growing `Vec` can hold twice what it needs: 12, rounded up.
const HEAP_PER_BYTE: usize = 16;

/// The heap `decode` may hold whatever the input (the first allocations of
/// each `Vec` are of a few elements).
const HEAP_BASE: usize = 4096;

/// Arbitrary bytes as a hand-over: `decode` never panics and holds at most
/// [`HEAP_PER_BYTE`] heap bytes per input byte (a length field is checked
/// against the bytes left before anything is allocated for it); it agrees
/// with `read_header` on the first 16 bytes; what it accepts encodes back
/// to the very same bytes (one spelling per value), is refused cut short
/// by a byte or with a byte more, counts its descriptors right, and every
/// connection in it survives `Conn::restore` then `Conn::save` unchanged.
pub fn check_handover(input: &[u8]) {
    let (decoded, heap) = peak_during(|| handover::decode(input));
    assert!(
        heap <= HEAP_BASE + HEAP_PER_BYTE * input.len(),
        "decoding {} bytes held {heap} heap bytes",
        input.len()
    );
    check_header(input, &decoded);
    if let Ok(h) = decoded {
        check_accepted(input, &h);
    }
}

/// `read_header` on the first 16 bytes and `decode` on all of them agree:
/// the same refusal of a magic or version, the same loop count otherwise.
fn check_header(input: &[u8], decoded: &Result<Handover, Error>) {
    let Some(offer) = input.first_chunk::<HEADER_LEN>() else {
        assert!(
            matches!(
                decoded,
                Err(Error::Magic | Error::Version(_) | Error::Truncated)
            ),
            "{} bytes, shorter than a header: {decoded:?}",
            input.len()
        );
        return;
    };
    match (handover::read_header(offer), decoded) {
        (Err(refused), _) => assert_eq!(decoded, &Err(refused), "the header was refused"),
        (Ok(loops), Ok(h)) => assert_eq!(h.loops.len(), loops as usize, "loop count"),
        (Ok(_), Err(e)) => assert!(
            !matches!(e, Error::Magic | Error::Version(_)),
            "read_header took the header, decode refused it: {e:?}"
        ),
    }
}

/// The checks of an accepted `input`, which decoded to `h`.
fn check_accepted(input: &[u8], h: &Handover) {
    let encoded = handover::encode(h);
    if let Some(at) = (0..input.len().max(encoded.len())).find(|&i| input.get(i) != encoded.get(i))
    {
        panic!(
            "{} bytes decode to a value that encodes to {} bytes, first differing at byte {at} \
             ({:?} read, {:?} written): {h:?}",
            input.len(),
            encoded.len(),
            input.get(at),
            encoded.get(at),
        );
    }

    let (cut, more) = (&input[..input.len() - 1], [input, &[0]].concat());
    assert_eq!(handover::decode(cut), Err(Error::Truncated), "cut short");
    assert_eq!(handover::decode(&more), Err(Error::Trailing), "a byte more");

    let (listeners, conns) = h.loops.iter().fold((0, 0), |(l, c), lp| {
        (l + lp.listeners.len(), c + lp.conns.len())
    });
    assert_eq!(h.descriptors(), listeners + conns, "descriptors");

    for (i, c) in h.loops.iter().flat_map(|lp| &lp.conns).enumerate() {
        let again = Conn::restore(c.saved.clone()).save();
        assert_eq!(again, c.saved, "connection {i} changed through a Conn");
    }
}

// ---------------------------------------------------------------------------
// `handover_valid`: hand-overs built from a recipe
// ---------------------------------------------------------------------------

/// A hand-over built from a recipe ([`build`]) decodes from its encoding to
/// the same value, and that encoding passes every check of
/// [`check_handover`].
pub fn check_valid(input: &[u8]) {
    let h = build(input);
    let encoded = handover::encode(&h);
    assert_eq!(
        handover::decode(&encoded).as_ref(),
        Ok(&h),
        "{encoded:02x?}"
    );
    check_handover(&encoded);
}

/// Builds the hand-over a recipe describes: every value the types allow,
/// but for a tick length of 0 (a clock's tick is at least 1 ms). Integers
/// are big-endian; a tick of 0 reads as 1.
///
/// | field | bytes | meaning |
/// |---|---|---|
/// | loops | 1 | modulo 4 |
/// | each loop | 16 + 104 | clock origin, tick length, the 13 counters |
/// | listeners | 1 + 1 each | modulo 4; low bit: echo (0) or metrics (1) |
/// | connections | 1 | modulo 8, each as below |
/// | kind | 1 | modulo 3: client, busy, metrics |
/// | state | 1 + its fields | modulo 6, in the order of `handover.rs`'s layout; flags are low bits, a close reason is modulo 8 |
/// | last line | 8 | a tick |
/// | unanswered, unsent, head | 1 + length each | length 0..=255, then the bytes |
/// | client | 1 + 0, 6 or 26 | modulo 3: none, IPv4 (address, port), IPv6 (address, port, flow info, scope) |
pub fn build(input: &[u8]) -> Handover {
    let mut r = Reader(input);
    let loops = (0..r.byte() % 4).map(|_| one_loop(&mut r)).collect();
    Handover { loops }
}

fn one_loop(r: &mut Reader) -> LoopState {
    let clock_origin_ns = r.u64();
    let tick_ns = r.u64().max(1);
    let counters = Snapshot {
        open: r.u64() as i64,
        accepted: r.u64(),
        closed: [(); CloseReason::ALL.len()].map(|()| r.u64()),
        lines: r.u64(),
        received_bytes: r.u64(),
        sent_bytes: r.u64(),
    };
    let listeners = (0..r.byte() % 4)
        .map(|_| match r.bit() {
            false => Service::Echo,
            true => Service::Metrics,
        })
        .collect();
    let conns = (0..r.byte() % 8).map(|_| conn(r)).collect();
    LoopState {
        clock_origin_ns,
        tick_ns,
        counters,
        listeners,
        conns,
    }
}

fn conn(r: &mut Reader) -> ConnState {
    let kind = [Kind::Client, Kind::Busy, Kind::Metrics][usize::from(r.byte() % 3)];
    let state = state(r);
    let last_line = tick(r);
    let mut bytes = || {
        let len = usize::from(r.byte());
        r.take(len).to_vec()
    };
    let (unanswered, unsent, head) = (bytes(), bytes(), bytes());
    let client = match r.byte() % 3 {
        0 => None,
        1 => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(r.array()),
            r.u16(),
        ))),
        _ => Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(r.array()),
            r.u16(),
            r.u32(),
            r.u32(),
        ))),
    };
    ConnState {
        kind,
        saved: Saved {
            state,
            last_line,
            unanswered,
            unsent,
            head,
            client,
        },
    }
}

fn state(r: &mut Reader) -> State {
    match r.byte() % 6 {
        0 => State::ProxyHeader { until: tick(r) },
        1 => State::Request { until: tick(r) },
        2 => State::Open { fin: r.bit() },
        3 => State::Paused {
            fin: r.bit(),
            then: match r.bit() {
                false => Resume::Read,
                true => Resume::Finish,
            },
        },
        4 => State::Flushing {
            reason: reason(r),
            then: match r.bit() {
                false => AfterFlush::Close,
                true => AfterFlush::Linger,
            },
            until: r.bit().then(|| tick(r)),
        },
        _ => State::Lingering {
            reason: reason(r),
            until: tick(r),
            allowance: r.u32(),
        },
    }
}

fn tick(r: &mut Reader) -> Tick {
    Tick::from(NonZeroU64::new(r.u64()).unwrap_or(NonZeroU64::MIN))
}

fn reason(r: &mut Reader) -> CloseReason {
    CloseReason::ALL[usize::from(r.byte()) % CloseReason::ALL.len()]
}
