//! Line framing and reply building: pure functions from bytes to bytes.
//!
//! Nothing here touches a socket, a clock or the event loop, so every rule of
//! SPEC §1 about *bytes* is decided here and tested here without I/O:
//!
//! - a line ends at `\n`; its *content* drops the `\n` and one trailing `\r`
//!   (Ruby's `chomp`);
//! - prefix mode answers `you said: <content>!\n`, raw mode echoes the line
//!   exactly as it arrived, terminator included;
//! - bytes are opaque: nothing is decoded;
//! - a line whose content exceeds `max_line` is [`Frame::TooLong`], and this
//!   is decided while the line is still arriving, so an unterminated line can
//!   never grow a buffer past `max_line + 1` bytes.
//!
//! The contract of [`next_line`] follows mini-redis's `parse_frame`: check,
//! parse, report how much was consumed; `Incomplete` is not an error. The
//! caller keeps the unconsumed tail and calls again when more bytes arrive.
//! Splitting the same input at any offsets gives the same replies (see the
//! property tests at the bottom).

use bytes::BytesMut;

/// How replies are built from lines (`--raw` picks [`Mode::Raw`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `you said: <content>!\n` for every line (the Ruby tutorial).
    Prefix,
    /// The line back exactly as it arrived (the Elixir `gen_tcp` echo).
    Raw,
}

/// What the start of a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line of `len` bytes, its `\n` included.
    Line { len: usize },
    /// No `\n` yet, and what is there may still become a valid line.
    Incomplete,
    /// The first line's content is (or must become) longer than `max_line`.
    TooLong,
}

/// The prefix of every reply in prefix mode.
pub const PREFIX: &[u8] = b"you said: ";
/// The suffix of every reply in prefix mode.
pub const SUFFIX: &[u8] = b"!\n";

/// Finds the first line in `buf`.
///
/// A line of content `max_line` bytes is accepted, `max_line + 1` is
/// [`Frame::TooLong`]. For an unterminated buffer the answer is `TooLong` as
/// soon as no `\n` could make the content fit: more than `max_line + 1` bytes,
/// or exactly `max_line + 1` bytes not ending in a `\r` that `chomp` would
/// remove.
pub fn next_line(buf: &[u8], max_line: usize) -> Frame {
    match memchr::memchr(b'\n', buf) {
        Some(nl) => {
            if content(&buf[..=nl]).len() > max_line {
                Frame::TooLong
            } else {
                Frame::Line { len: nl + 1 }
            }
        }
        None if unterminated_too_long(buf, max_line) => Frame::TooLong,
        None => Frame::Incomplete,
    }
}

/// True when `partial`, a line without its `\n` yet, can no longer fit.
pub fn unterminated_too_long(partial: &[u8], max_line: usize) -> bool {
    partial.len() > max_line.saturating_add(1)
        || (partial.len() == max_line.saturating_add(1) && partial.last() != Some(&b'\r'))
}

/// The content of a line: without its `\n`, then without one `\r`.
///
/// Also used for the final unterminated line at EOF, which has no `\n`.
pub fn content(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Appends the reply to one line (`line` as it arrived, `\n` included unless
/// it is the final unterminated line at EOF).
pub fn write_reply(mode: Mode, line: &[u8], out: &mut BytesMut) {
    match mode {
        Mode::Prefix => {
            let content = content(line);
            out.reserve(PREFIX.len() + content.len() + SUFFIX.len());
            out.extend_from_slice(PREFIX);
            out.extend_from_slice(content);
            out.extend_from_slice(SUFFIX);
        }
        Mode::Raw => out.extend_from_slice(line),
    }
}

/// Why [`answer_lines`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// All complete lines were answered; the rest (if any) is a partial line.
    Incomplete,
    /// The next line is too long; the lines before it were answered.
    TooLong,
    /// `out` reached `max_out` bytes at a line boundary; the rest is unread.
    Full,
}

/// The result of [`answer_lines`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    /// Bytes of the input consumed (whole lines only).
    pub consumed: usize,
    /// Lines answered.
    pub lines: usize,
    /// Why it stopped.
    pub stop: Stop,
}

/// Answers every complete line at the start of `input` into `out`.
///
/// Stops at the first incomplete or too-long line, or once `out` holds at
/// least `max_out` bytes (backpressure for slow readers: the unanswered lines
/// stay with the caller, at a line boundary).
pub fn answer_lines(
    input: &[u8],
    mode: Mode,
    max_line: usize,
    out: &mut BytesMut,
    max_out: usize,
) -> Answered {
    let mut consumed = 0;
    let mut lines = 0;
    let stop = loop {
        if out.len() >= max_out {
            break Stop::Full;
        }
        match next_line(&input[consumed..], max_line) {
            Frame::Line { len } => {
                write_reply(mode, &input[consumed..consumed + len], out);
                consumed += len;
                lines += 1;
            }
            Frame::Incomplete => break Stop::Incomplete,
            Frame::TooLong => break Stop::TooLong,
        }
    };
    Answered {
        consumed,
        lines,
        stop,
    }
}

/// The error line sent before closing a connection whose line is too long.
pub fn too_long_error(max_line: usize) -> Vec<u8> {
    format!("error: line too long (max {max_line} bytes)\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn replies(mode: Mode, input: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let a = answer_lines(input, mode, 1 << 20, &mut out, usize::MAX);
        assert_eq!(a.stop, Stop::Incomplete);
        out.to_vec()
    }

    #[test]
    fn prefix_reply_chomps_one_cr() {
        assert_eq!(replies(Mode::Prefix, b"hi\n"), b"you said: hi!\n");
        assert_eq!(replies(Mode::Prefix, b"hi\r\n"), b"you said: hi!\n");
        assert_eq!(replies(Mode::Prefix, b"hi\r\r\n"), b"you said: hi\r!\n");
        assert_eq!(replies(Mode::Prefix, b"\n"), b"you said: !\n");
    }

    #[test]
    fn raw_reply_is_the_line_as_it_came() {
        assert_eq!(replies(Mode::Raw, b"a\r\nb\n"), b"a\r\nb\n");
    }

    #[test]
    fn bytes_are_opaque() {
        assert_eq!(
            replies(Mode::Prefix, b"\0\xff\xfe\n"),
            b"you said: \0\xff\xfe!\n"
        );
    }

    #[test]
    fn partial_tail_is_left_unconsumed() {
        let mut out = BytesMut::new();
        let a = answer_lines(b"a\nb\nc", Mode::Prefix, 10, &mut out, usize::MAX);
        assert_eq!(
            a,
            Answered {
                consumed: 4,
                lines: 2,
                stop: Stop::Incomplete
            }
        );
    }

    #[test]
    fn max_line_is_inclusive() {
        assert_eq!(next_line(b"abcd\n", 4), Frame::Line { len: 5 });
        assert_eq!(next_line(b"abcd\r\n", 4), Frame::Line { len: 6 });
        assert_eq!(next_line(b"abcde\n", 4), Frame::TooLong);
    }

    #[test]
    fn unterminated_line_is_too_long_once_it_cannot_fit() {
        assert_eq!(next_line(b"abcd", 4), Frame::Incomplete);
        // `abcd\r` may still be `abcd\r\n`, whose content is 4 bytes.
        assert_eq!(next_line(b"abcd\r", 4), Frame::Incomplete);
        assert_eq!(next_line(b"abcde", 4), Frame::TooLong);
        assert_eq!(next_line(b"abcd\r\r", 4), Frame::TooLong);
    }

    #[test]
    fn lines_before_a_too_long_one_are_answered() {
        let mut out = BytesMut::new();
        let a = answer_lines(b"ok\nabcdef\n", Mode::Prefix, 4, &mut out, usize::MAX);
        assert_eq!(a.stop, Stop::TooLong);
        assert_eq!(a.consumed, 3);
        assert_eq!(&out[..], b"you said: ok!\n");
    }

    #[test]
    fn full_output_stops_at_a_line_boundary() {
        let mut out = BytesMut::new();
        let a = answer_lines(b"a\nb\nc\n", Mode::Raw, 10, &mut out, 4);
        assert_eq!(a.stop, Stop::Full);
        assert_eq!(a.consumed, 4);
        assert_eq!(&out[..], b"a\nb\n");
    }

    #[test]
    fn too_long_error_names_the_limit() {
        assert_eq!(
            too_long_error(65536),
            b"error: line too long (max 65536 bytes)\n"
        );
    }

    /// Feeds `input` in the given chunks the way a connection does: keep the
    /// unconsumed tail, append the next chunk, answer again. Returns the
    /// replies and whether the stream ended in `TooLong`, plus the largest
    /// tail ever kept.
    fn feed(mode: Mode, max_line: usize, chunks: &[&[u8]]) -> (Vec<u8>, bool, usize) {
        let mut tail: Vec<u8> = Vec::new();
        let mut out = BytesMut::new();
        let mut biggest = 0;
        for chunk in chunks {
            tail.extend_from_slice(chunk);
            let a = answer_lines(&tail, mode, max_line, &mut out, usize::MAX);
            tail.drain(..a.consumed);
            if a.stop == Stop::TooLong {
                return (out.to_vec(), true, biggest);
            }
            biggest = biggest.max(tail.len());
        }
        (out.to_vec(), false, biggest)
    }

    fn split_at_all<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for c in cuts {
            chunks.push(&input[start..c]);
            start = c;
        }
        chunks.push(&input[start..]);
        chunks
    }

    fn input_strategy() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct bytes so that `\n` and `\r` are common.
        proptest::collection::vec(
            prop_oneof![
                Just(b'\n'),
                Just(b'\r'),
                Just(b'a'),
                Just(0u8),
                Just(0xffu8)
            ],
            0..200,
        )
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_replies(
            input in input_strategy(),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            max_line in 0usize..12,
            raw in any::<bool>(),
        ) {
            let mode = if raw { Mode::Raw } else { Mode::Prefix };
            let whole = feed(mode, max_line, &[&input]);
            let split = feed(mode, max_line, &split_at_all(&input, &cuts));
            prop_assert_eq!(&whole.0, &split.0);
            prop_assert_eq!(whole.1, split.1);
            // max-line is enforced for every split: the kept tail never
            // exceeds max_line + 1 bytes.
            prop_assert!(split.2 <= max_line + 1);
        }

        #[test]
        fn byte_by_byte_equals_one_read(input in input_strategy(), max_line in 0usize..12) {
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let (whole, whole_too_long, _) = feed(Mode::Prefix, max_line, &[&input]);
            let (split, split_too_long, _) = feed(Mode::Prefix, max_line, &bytes);
            prop_assert_eq!(whole, split);
            prop_assert_eq!(whole_too_long, split_too_long);
        }

        #[test]
        fn raw_mode_echoes_every_complete_line(input in input_strategy()) {
            let (out, too_long, _) = feed(Mode::Raw, 1 << 20, &[&input]);
            prop_assert!(!too_long);
            let end = input.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            prop_assert_eq!(out, input[..end].to_vec());
        }

        #[test]
        fn prefix_mode_answers_each_line(input in input_strategy()) {
            let (out, _, _) = feed(Mode::Prefix, 1 << 20, &[&input]);
            let mut expected = Vec::new();
            let end = input.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            for line in input[..end].split_inclusive(|&b| b == b'\n') {
                expected.extend_from_slice(PREFIX);
                expected.extend_from_slice(content(line));
                expected.extend_from_slice(SUFFIX);
            }
            prop_assert_eq!(out, expected);
        }
    }
}
