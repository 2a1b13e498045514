//! Checks of the line framer, [`echoloop::line::Framer`], for the
//! `framing` target: arbitrary bytes split arbitrarily into reads, with a
//! small `max_line` and output bound, in prefix and raw mode.

use bytes::BytesMut;
use echoloop::line::{Framer, Mode, Rules, Stop};

use super::model;

/// The input's first three bytes choose the rules and the split; the rest
/// is the client's stream.
///
/// - byte 0: bit 0 raw mode, bits 1..=4 `max_line` (0..=15);
/// - byte 1: `max_output` (0 means unbounded);
/// - byte 2: the seed of the read sizes (1..=17 bytes each).
///
/// The replies equal the model's; `TooLong` comes exactly when the model
/// says; between reads the framer never holds more than `max_line + 1`
/// bytes (one unfinished line), and nothing once it refused a line.
pub fn check_framing(input: &[u8]) {
    let [flags, out_bound, seed, stream @ ..] = input else {
        return;
    };
    let rules = Rules {
        mode: if flags & 1 == 1 {
            Mode::Raw
        } else {
            Mode::Prefix
        },
        max_line: usize::from((flags >> 1) & 15),
        max_output: match out_bound {
            0 => usize::MAX,
            n => usize::from(*n),
        },
    };
    let (expected, expected_too_long) = model::replies(rules.mode, rules.max_line, stream, false);

    let mut framer = Framer::default();
    let mut out = BytesMut::new();
    let mut sent = Vec::new();
    let mut too_long = false;
    for chunk in reads(stream, *seed) {
        let mut framed = framer.push(chunk, rules, &mut out);
        while framed.stop == Stop::Full {
            assert!(out.len() >= rules.max_output, "Full below the bound");
            // The client reads everything; the waiting lines go next.
            sent.extend_from_slice(&out.split());
            framed = framer.resume(rules, &mut out);
        }
        if framed.stop == Stop::TooLong {
            assert_eq!(framer.capacity(), 0, "a refused line is dropped");
            too_long = true;
            break;
        }
        assert!(
            framer.len() <= rules.max_line + 1,
            "{} bytes held with max_line {}",
            framer.len(),
            rules.max_line
        );
    }
    sent.extend_from_slice(&out);
    if too_long {
        let error = format!("error: line too long (max {} bytes)\n", rules.max_line);
        sent.extend_from_slice(error.as_bytes());
    }
    assert_eq!(too_long, expected_too_long, "too long? (rules {rules:?})");
    assert!(
        sent == expected,
        "replies differ (rules {rules:?}):\n got {sent:02x?}\nwant {expected:02x?}"
    );
}

/// `stream` cut into reads of 1..=17 bytes, the sizes drawn from `seed`.
pub fn reads(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut rest = stream;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        // xorshift32: cheap, and the same sizes for the same seed.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (1 + state % 17) as usize;
        let (now, later) = rest.split_at(n.min(rest.len()));
        chunks.push(now);
        rest = later;
    }
    chunks
}
