//! Checks of the live-upgrade hand-over format, [`echoloop::handover`], for
//! the `handover` target: arbitrary bytes as what a new process reads from
//! the old one.

use echoloop::conn::Conn;
use echoloop::handover::{self, Error, HEADER_LEN, Handover};

use super::alloc::peak_during;

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
