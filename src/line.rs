//! Line framing and reply building: pure code from bytes to bytes.
//!
//! Nothing here touches a socket, a clock or the event loop, so every rule of
//! SPEC.md §1 about *bytes* is decided here and tested here without I/O:
//!
//! - a line ends at `\n`; its *content* drops the `\n` and one trailing `\r`
//!   (Ruby's `chomp`);
//! - prefix mode answers `you said: <content>!\n`, raw mode echoes the line
//!   exactly as it arrived, terminator included;
//! - bytes are opaque: nothing is decoded;
//! - a line whose content exceeds `max_line` is [`Frame::TooLong`], and this
//!   is decided while the line is still arriving, so an unterminated line
//!   never grows a buffer past `max_line + 1` bytes plus one read.
//!
//! [`Framer`] is what a connection uses: it owns the unfinished line between
//! reads, joins it with the next read, and answers every complete line into
//! the connection's output until that output is full. Underneath,
//! [`next_line`] follows mini-redis's `parse_frame`: check, parse, report how
//! much was consumed; `Incomplete` is not an error. Splitting the same input
//! at any offsets gives the same replies: the property tests at the bottom
//! run the real [`Framer`] against a model over arbitrary splits.

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
    Line {
        /// The line's length in bytes, `\n` included.
        len: usize,
    },
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
fn unterminated_too_long(partial: &[u8], max_line: usize) -> bool {
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

/// The limits and mode a [`Framer`] answers by (from the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Prefix or raw replies.
    pub mode: Mode,
    /// The longest content a line may have (`--max-line`).
    pub max_line: usize,
    /// Lines are answered only while fewer reply bytes than this are
    /// queued (`--max-pending-output`).
    pub max_output: usize,
}

/// What one [`Framer`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framed {
    /// Lines answered.
    pub lines: usize,
    /// Why it stopped: [`Stop::Incomplete`] (all answered), [`Stop::Full`]
    /// (the output reached `max_output`; the rest waits in the framer) or
    /// [`Stop::TooLong`] (the framer is emptied; the caller sends the error).
    pub stop: Stop,
}

/// The input side of a connection: the bytes read but not answered yet.
///
/// Invariant: after [`Framer::push`] or [`Framer::resume`] returned
/// [`Stop::Incomplete`], the framer holds at most one unfinished line (no
/// `\n`) of at most `max_line + 1` bytes. After [`Stop::Full`] it may also
/// hold whole lines, and a tail not checked yet (at most one read in all);
/// then only [`Framer::resume`] may be called until it answers `Incomplete`
/// again. An empty framer owns no heap.
#[derive(Debug, Default)]
pub struct Framer {
    /// Unanswered input.
    pending: BytesMut,
}

impl Framer {
    /// Frames freshly read bytes after the unfinished line kept from earlier
    /// reads, answering complete lines into `out`.
    pub fn push(&mut self, data: &[u8], rules: Rules, out: &mut BytesMut) -> Framed {
        if self.pending.is_empty() {
            return self.answer(data, rules, out);
        }
        // What is kept is one unfinished line: only the new bytes are searched.
        let Some(nl) = memchr::memchr(b'\n', data) else {
            self.pending.extend_from_slice(data);
            if unterminated_too_long(&self.pending, rules.max_line) {
                self.clear();
                return Framed {
                    lines: 0,
                    stop: Stop::TooLong,
                };
            }
            return Framed {
                lines: 0,
                stop: Stop::Incomplete,
            };
        };
        self.pending.extend_from_slice(&data[..=nl]);
        let joined = std::mem::take(&mut self.pending);
        let first = self.answer(&joined, rules, out);
        let rest = &data[nl + 1..];
        match first.stop {
            Stop::Incomplete => {
                let more = self.answer(rest, rules, out);
                Framed {
                    lines: first.lines + more.lines,
                    stop: more.stop,
                }
            }
            Stop::Full => {
                self.pending.extend_from_slice(rest);
                first
            }
            Stop::TooLong => first,
        }
    }

    /// Answers the lines that waited while the output was full.
    pub fn resume(&mut self, rules: Rules, out: &mut BytesMut) -> Framed {
        let kept = std::mem::take(&mut self.pending);
        self.answer(&kept, rules, out)
    }

    /// End of input: what is left without a `\n` is a final line and gets
    /// its reply. Returns the number of lines answered (0 or 1).
    pub fn finish(&mut self, mode: Mode, out: &mut BytesMut) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        write_reply(mode, &self.pending, out);
        self.clear();
        1
    }

    /// Drops unanswered input and its allocation.
    pub fn clear(&mut self) {
        self.pending = BytesMut::new();
    }

    /// A framer holding `pending` as its unanswered input (a connection
    /// handed over by a live upgrade).
    pub fn holding(pending: &[u8]) -> Framer {
        Framer {
            pending: BytesMut::from(pending),
        }
    }

    /// The unanswered input.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Heap bytes held.
    pub fn capacity(&self) -> usize {
        self.pending.capacity()
    }

    /// Answers the complete lines at the start of `input` (the framer is
    /// empty here) and keeps what is left, unless the line was too long.
    fn answer(&mut self, input: &[u8], rules: Rules, out: &mut BytesMut) -> Framed {
        let a = answer_lines(input, rules.mode, rules.max_line, out, rules.max_output);
        match a.stop {
            Stop::TooLong => self.clear(),
            Stop::Incomplete | Stop::Full => self.pending.extend_from_slice(&input[a.consumed..]),
        }
        Framed {
            lines: a.lines,
            stop: a.stop,
        }
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

    // ----- the real framer against a model, over arbitrary splits --------

    /// The trivially correct answer for the whole input at once: the reply
    /// to every line before the first too-long one, and whether there was
    /// one (an unterminated tail is too long once even a `\n` now could not
    /// make it fit).
    fn model(mode: Mode, max_line: usize, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut rest = input;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..=i];
            let mut body = &line[..i];
            if body.last() == Some(&b'\r') {
                body = &body[..body.len() - 1];
            }
            if body.len() > max_line {
                return (out, true);
            }
            match mode {
                Mode::Prefix => out.extend([b"you said: ", body, b"!\n"].concat()),
                Mode::Raw => out.extend_from_slice(line),
            }
            rest = &rest[i + 1..];
        }
        let fits_with_newline = rest.len() - usize::from(rest.last() == Some(&b'\r')) <= max_line;
        (out, !fits_with_newline)
    }

    /// Feeds `chunks` to a real [`Framer`] the way a connection does: push
    /// each read; when the output is full, let the client take everything
    /// and resume. Returns the replies, whether it ended in `TooLong`, and
    /// the most bytes the framer held between reads.
    fn run_framer(rules: Rules, chunks: &[&[u8]]) -> (Vec<u8>, bool, usize) {
        let mut framer = Framer::default();
        let mut out = BytesMut::new();
        let mut taken = Vec::new();
        let mut held = 0;
        for chunk in chunks {
            let mut framed = framer.push(chunk, rules, &mut out);
            while framed.stop == Stop::Full {
                assert!(out.len() >= rules.max_output);
                taken.extend_from_slice(&out.split());
                framed = framer.resume(rules, &mut out);
            }
            if framed.stop == Stop::TooLong {
                assert!(framer.is_empty() && framer.capacity() == 0);
                taken.extend_from_slice(&out);
                return (taken, true, held);
            }
            held = held.max(framer.len());
        }
        taken.extend_from_slice(&out);
        (taken, false, held)
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

    fn rules_strategy() -> impl Strategy<Value = Rules> {
        (
            any::<bool>(),
            0usize..12,
            prop_oneof![Just(usize::MAX), 1usize..40],
        )
            .prop_map(|(raw, max_line, max_output)| Rules {
                mode: if raw { Mode::Raw } else { Mode::Prefix },
                max_line,
                max_output,
            })
    }

    #[test]
    fn framer_joins_a_line_split_over_reads() {
        let rules = Rules {
            mode: Mode::Prefix,
            max_line: 16,
            max_output: usize::MAX,
        };
        let (out, too_long, held) = run_framer(rules, &[b"he", b"l", b"lo\nwor", b"ld\n"]);
        assert_eq!(out, b"you said: hello!\nyou said: world!\n");
        assert!(!too_long);
        assert_eq!(held, 3, "`wor` waited for its end");
    }

    #[test]
    fn framer_refuses_a_line_while_it_is_still_arriving() {
        let rules = Rules {
            mode: Mode::Raw,
            max_line: 4,
            max_output: usize::MAX,
        };
        let mut framer = Framer::default();
        let mut out = BytesMut::new();
        assert_eq!(framer.push(b"ok\nabc", rules, &mut out).lines, 1);
        assert_eq!(framer.push(b"de", rules, &mut out).stop, Stop::TooLong);
        assert_eq!(&out[..], b"ok\n");
        assert_eq!(framer.capacity(), 0, "the refused line is dropped");
    }

    #[test]
    fn framer_finish_answers_the_unterminated_tail() {
        let mut framer = Framer::default();
        let mut out = BytesMut::new();
        let rules = Rules {
            mode: Mode::Prefix,
            max_line: 8,
            max_output: usize::MAX,
        };
        let _ = framer.push(b"a\nb\r", rules, &mut out);
        assert_eq!(framer.finish(Mode::Prefix, &mut out), 1);
        assert_eq!(&out[..], b"you said: a!\nyou said: b!\n");
        assert_eq!(framer.finish(Mode::Prefix, &mut out), 0);
    }

    proptest! {
        #[test]
        fn framer_over_any_split_equals_the_model(
            input in input_strategy(),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            rules in rules_strategy(),
        ) {
            let (expected, expected_too_long) = model(rules.mode, rules.max_line, &input);
            let (out, too_long, held) = run_framer(rules, &split_at_all(&input, &cuts));
            prop_assert_eq!(out, expected);
            prop_assert_eq!(too_long, expected_too_long);
            // max-line holds for every split: between reads the framer
            // keeps at most one unfinished line of max_line + 1 bytes.
            prop_assert!(held <= rules.max_line + 1);
        }

        #[test]
        fn framer_byte_by_byte_equals_the_model(input in input_strategy(), rules in rules_strategy()) {
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let (expected, expected_too_long) = model(rules.mode, rules.max_line, &input);
            let (out, too_long, _) = run_framer(rules, &bytes);
            prop_assert_eq!(out, expected);
            prop_assert_eq!(too_long, expected_too_long);
        }
    }
}
