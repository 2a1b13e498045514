//! Checks the reply stream of one connection byte for byte against the
//! replies the server owes, in order, whatever segments the bytes came in.
//!
//! Replies are framed at `\n` (a correct reply ends at its first `\n`, see
//! `line::LineFormat`). Each complete received line is judged:
//! - the reply of the oldest outstanding line: correct;
//! - the reply of a later outstanding line: correct, and the older lines it
//!   overtook are set aside as *skipped*; a skipped line whose reply shows up
//!   later is `reordered`, one whose reply never comes is `missing`;
//! - the reply of a line answered recently: `duplicated`;
//! - anything else is a *suspect*, judged with the next line: if that next
//!   line is the reply owed for the oldest outstanding line, the suspect was
//!   `extra` (bytes nobody asked for); otherwise it was `altered` (it takes
//!   the place of the oldest outstanding line). A suspect still pending when
//!   the connection ends is `altered`, or `extra` when nothing was owed.
//!   (In ping-pong, a connection with a suspect waits for the end of the
//!   run: the server believes it answered.)
//! - except a line that is exactly the reply the *other* protocol owes for
//!   the due line (`raw` instead of `prefix` or back): that is a server in
//!   the other mode, and the run can stop at once with a hint.

use crate::line::{Head, LineFormat, Numbered, Proto};
use std::collections::VecDeque;

/// A line that was sent and awaits its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub seq: u64,
    /// When the line was due (rate mode: its place on the schedule; other
    /// modes: when it was sent), in nanoseconds since the run's start:
    /// plain integers, so the latency of a reply is one subtraction.
    pub intended: u64,
    /// When the line was handed to the socket (nanoseconds, as `intended`).
    pub sent: u64,
}

/// The judgement on one received reply line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The correct reply of an outstanding line.
    Answered(InFlight),
    /// The correct reply of a line that a later reply had overtaken.
    Reordered(InFlight),
    /// A second copy of the reply of line `seq`.
    Duplicated { seq: u64 },
    /// Wrong bytes where the reply of line `seq` was due.
    Altered {
        seq: u64,
        expected: Vec<u8>,
        got: Vec<u8>,
    },
    /// A reply while no line was outstanding.
    Extra { got: Vec<u8> },
    /// The reply the other protocol owes for line `seq`: the server runs
    /// in mode `answers_in`.
    OtherProto { seq: u64, answers_in: Proto },
}

/// How many answered sequence numbers are remembered to spot duplicates.
const RECENT: usize = 8;

/// The reply checker of one connection.
///
/// Invariants: `inflight` is in send order (ascending seq); every sent line
/// is in exactly one of `inflight`, `skipped`, or has been judged; `partial`
/// holds the bytes of the reply line being received (no `\n`) and never
/// grows past `format.max_reply_len()`.
#[derive(Debug)]
pub struct Checker {
    /// The head of the connection's lines (its id).
    head: Head,
    format: LineFormat,
    inflight: VecDeque<InFlight>,
    skipped: Vec<InFlight>,
    /// The last `RECENT` answered sequence numbers, as a ring written at
    /// `remembered % RECENT`.
    recent: [u64; RECENT],
    /// How many lines were answered (the ring holds the last of them).
    remembered: u64,
    partial: Vec<u8>,
    /// An oversized line was reported; drop bytes up to the next `\n`.
    discarding: bool,
    /// A received line that matched nothing, judged with the next one.
    suspect: Option<Vec<u8>>,
    /// The reply expected next in the common case (the one after the last
    /// answered line), compared whole instead of read field by field.
    expected: Numbered,
}

impl Checker {
    pub fn new(conn: u32, format: LineFormat) -> Self {
        Checker {
            head: Head::new(conn),
            format,
            inflight: VecDeque::new(),
            skipped: Vec::new(),
            recent: [0; RECENT],
            remembered: 0,
            partial: Vec::new(),
            discarding: false,
            suspect: None,
            expected: Numbered::reply(format, Head::new(conn)),
        }
    }

    /// Notes that line `seq`, due at `intended`, was sent at `sent`.
    /// Sequence numbers must rise.
    pub fn sent(&mut self, seq: u64, intended: u64, sent: u64) {
        debug_assert!(self.inflight.back().is_none_or(|l| l.seq < seq));
        self.inflight.push_back(InFlight {
            seq,
            intended,
            sent,
        });
    }

    /// Lines sent whose reply has not arrived (outstanding or skipped).
    pub fn outstanding(&self) -> usize {
        self.inflight.len() + self.skipped.len()
    }

    /// Sequence numbers of the lines still without a reply, oldest first.
    pub fn outstanding_seqs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.skipped.iter().map(|l| l.seq).collect();
        v.extend(self.inflight.iter().map(|l| l.seq));
        v.sort_unstable();
        v
    }

    /// Bytes of an unfinished reply line received so far.
    pub fn partial(&self) -> &[u8] {
        &self.partial
    }

    /// Feeds received bytes; calls `on` once per complete reply line.
    pub fn feed(&mut self, data: &[u8], mut on: impl FnMut(Verdict)) {
        let mut rest = data;
        while !rest.is_empty() {
            rest = match self.take_owed(rest) {
                Some((len, line)) => {
                    on(Verdict::Answered(line));
                    &rest[len..]
                }
                None => self.frame(rest, &mut on),
            };
        }
    }

    /// Frames the line `data` starts with at `\n` and judges it, or keeps
    /// an unfinished one in `partial` (cut and judged once too long to be a
    /// reply); returns what follows. Kept out of `feed`'s loop, with `on`
    /// as a trait object, so that the loop of the common case stays small.
    fn frame<'d>(&mut self, data: &'d [u8], on: &mut dyn FnMut(Verdict)) -> &'d [u8] {
        let Some(i) = memchr::memchr(b'\n', data) else {
            if !self.discarding {
                self.partial.extend_from_slice(data);
                if self.partial.len() > self.format.max_reply_len() {
                    // Too long to be any reply: judge what we have and
                    // skip the rest of this line.
                    let got = std::mem::take(&mut self.partial);
                    self.judge(&got, on);
                    self.discarding = true;
                }
            }
            return &[];
        };
        let (line, tail) = data.split_at(i + 1);
        if self.discarding {
            self.discarding = false;
        } else if self.partial.is_empty() {
            self.judge(line, on);
        } else {
            let mut whole = std::mem::take(&mut self.partial);
            whole.extend_from_slice(line);
            self.judge(&whole, on);
            whole.clear();
            self.partial = whole;
        }
        tail
    }

    /// The common case, taken whole: when `data` starts with the reply of
    /// the oldest outstanding line, at a line boundary with nothing pending
    /// (no partial line, no suspect), settles that line as `judge` would
    /// and returns the reply's length and the line. The reply holds one
    /// `\n`, its last byte, so it is exactly the line that framing at `\n`
    /// would cut: one comparison instead of a search for `\n` and then a
    /// comparison.
    #[inline]
    fn take_owed(&mut self, data: &[u8]) -> Option<(usize, InFlight)> {
        let at_boundary = self.partial.is_empty() && !self.discarding && self.suspect.is_none();
        if !at_boundary || !self.expected.starts(data) {
            return None;
        }
        let len = self.expected.bytes().len();
        if self.inflight.front()?.seq != self.expected.seq() {
            return None;
        }
        let line = self.inflight.pop_front()?;
        self.remember(line.seq);
        Some((len, line))
    }

    /// Is `got` the reply owed for line `seq`?
    fn is_reply(&self, seq: u64, got: &[u8]) -> bool {
        if seq == self.expected.seq() {
            got == self.expected.bytes()
        } else {
            self.format.is_reply(got, &self.head, seq)
        }
    }

    /// Notes that line `seq` was answered: the reply of `seq + 1` is
    /// likely next.
    #[inline]
    fn remember(&mut self, seq: u64) {
        if seq == self.expected.seq() {
            self.expected.advance();
        } else if seq != u64::MAX {
            self.expected.set(seq + 1);
        }
        self.recent[(self.remembered % RECENT as u64) as usize] = seq;
        self.remembered += 1;
    }

    /// The answered sequence numbers the ring holds.
    fn recent(&self) -> &[u64] {
        &self.recent[..self.remembered.min(RECENT as u64) as usize]
    }

    /// The line whose reply is due: the oldest outstanding, else the oldest
    /// skipped one.
    fn due(&self) -> Option<InFlight> {
        self.inflight
            .front()
            .copied()
            .or_else(|| self.skipped.first().copied())
    }

    /// Settles a suspect line: `altered` in place of the due line, or
    /// `extra` when no line is due.
    fn settle_altered(&mut self, got: Vec<u8>, on: &mut dyn FnMut(Verdict)) {
        let Some(due) = self.due() else {
            on(Verdict::Extra { got });
            return;
        };
        if self.inflight.front() == Some(&due) {
            self.inflight.pop_front();
        } else {
            self.skipped.remove(0);
        }
        let mut expected = Vec::new();
        self.format.push_reply(&mut expected, &self.head, due.seq);
        self.remember(due.seq);
        on(Verdict::Altered {
            seq: due.seq,
            expected,
            got,
        });
    }

    /// Settles a pending suspect line when no more replies will come (the
    /// connection is about to close). Call before `outstanding`.
    pub fn finish(&mut self, mut on: impl FnMut(Verdict)) {
        if let Some(got) = self.suspect.take() {
            self.settle_altered(got, &mut on);
        }
    }

    /// Judges one received line (normally ending in `\n`).
    fn judge(&mut self, got: &[u8], on: &mut dyn FnMut(Verdict)) {
        if let Some(suspect) = self.suspect.take() {
            match self.due() {
                Some(due) if self.is_reply(due.seq, got) => on(Verdict::Extra { got: suspect }),
                _ => self.settle_altered(suspect, on),
            }
        }
        // The common case first: the reply of the oldest outstanding line.
        if let Some(head) = self.inflight.front().copied()
            && self.is_reply(head.seq, got)
        {
            self.inflight.pop_front();
            self.remember(head.seq);
            return on(Verdict::Answered(head));
        }
        for k in 1..self.inflight.len() {
            let cand = self.inflight[k];
            if self.is_reply(cand.seq, got) {
                self.skipped.extend(self.inflight.drain(..k));
                self.inflight.pop_front();
                self.remember(cand.seq);
                return on(Verdict::Answered(cand));
            }
        }
        for j in 0..self.skipped.len() {
            let cand = self.skipped[j];
            if self.is_reply(cand.seq, got) {
                self.skipped.remove(j);
                self.remember(cand.seq);
                return on(Verdict::Reordered(cand));
            }
        }
        if let Some(&seq) = self.recent().iter().find(|&&s| self.is_reply(s, got)) {
            return on(Verdict::Duplicated { seq });
        }
        if let Some(due) = self.due() {
            let other = self.format.other_proto();
            if other.is_reply(got, &self.head, due.seq) {
                return on(Verdict::OtherProto {
                    seq: due.seq,
                    answers_in: other.proto,
                });
            }
        }
        self.suspect = Some(got.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FMT: LineFormat = LineFormat {
        line_len: 16,
        crlf: false,
        proto: Proto::Prefix,
    };

    fn reply(seq: u64) -> Vec<u8> {
        let mut v = Vec::new();
        FMT.push_reply(&mut v, &Head::new(3), seq);
        v
    }

    fn run(sent: &[u64], stream: &[u8], chunk: usize) -> (Vec<Verdict>, Checker) {
        let mut c = Checker::new(3, FMT);
        for &s in sent {
            c.sent(s, 0, 0);
        }
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            c.feed(piece, |v| out.push(v));
        }
        c.finish(|v| out.push(v));
        (out, c)
    }

    fn names(v: &[Verdict]) -> Vec<&'static str> {
        v.iter()
            .map(|v| match v {
                Verdict::Answered(_) => "ok",
                Verdict::Reordered(_) => "reordered",
                Verdict::Duplicated { .. } => "duplicated",
                Verdict::Altered { .. } => "altered",
                Verdict::Extra { .. } => "extra",
                Verdict::OtherProto { .. } => "other_proto",
            })
            .collect()
    }

    #[test]
    fn in_order_replies_in_one_byte_segments() {
        let stream = [reply(0), reply(1), reply(2)].concat();
        let (v, c) = run(&[0, 1, 2], &stream, 1);
        assert_eq!(names(&v), ["ok", "ok", "ok"]);
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn swapped_replies_are_reordered() {
        let stream = [reply(1), reply(0)].concat();
        let (v, c) = run(&[0, 1], &stream, 5);
        assert_eq!(names(&v), ["ok", "reordered"]);
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn dropped_reply_stays_outstanding() {
        let stream = [reply(0), reply(2)].concat();
        let (v, c) = run(&[0, 1, 2], &stream, 64);
        assert_eq!(names(&v), ["ok", "ok"]);
        assert_eq!(c.outstanding_seqs(), [1]);
    }

    #[test]
    fn duplicate_and_extra() {
        let stream = [reply(0), reply(0), b"hello\n".to_vec()].concat();
        let (v, _) = run(&[0], &stream, 7);
        assert_eq!(names(&v), ["ok", "duplicated", "extra"]);
    }

    #[test]
    fn altered_byte_takes_the_due_line() {
        let mut bad = reply(0);
        bad[12] ^= 1;
        let stream = [bad, reply(1)].concat();
        let (v, c) = run(&[0, 1], &stream, 3);
        assert_eq!(names(&v), ["altered", "ok"]);
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn unrequested_line_before_a_reply_is_extra() {
        let stream = [b"hello\n".to_vec(), reply(0), reply(1)].concat();
        let (v, c) = run(&[0, 1], &stream, 4);
        assert_eq!(names(&v), ["extra", "ok", "ok"]);
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn altered_last_reply_is_settled_by_finish() {
        let mut bad = reply(0);
        bad[3] = b'!';
        let (v, c) = run(&[0], &bad, 64);
        assert_eq!(names(&v), ["altered"]);
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn oversized_line_is_cut() {
        let stream = [vec![b'y'; 500], b"\n".to_vec(), reply(1)].concat();
        let (v, c) = run(&[0, 1], &stream, 10);
        assert_eq!(names(&v), ["altered", "ok"]);
        assert!(c.partial().is_empty());
    }

    #[test]
    fn raw_echo_of_a_prefix_line_names_raw() {
        let mut line = Vec::new();
        FMT.push_line(&mut line, &Head::new(3), 0);
        let (v, _) = run(&[0], &line, 4);
        assert_eq!(
            v,
            [Verdict::OtherProto {
                seq: 0,
                answers_in: Proto::Raw
            }]
        );
    }

    #[test]
    fn whole_replies_are_judged_as_byte_by_byte() {
        // Streams fed whole take the common case (`take_owed`) wherever
        // it applies; fed a byte at a time they never do, as a reply is
        // only whole at its last byte. The verdicts must be the same (the
        // bytes kept of an oversized line may differ: they are cut where
        // the line was found too long).
        let mut bad = reply(1);
        bad[14] ^= 1;
        let mut raw = Vec::new();
        FMT.push_line(&mut raw, &Head::new(3), 1);
        let streams = [
            [reply(0), reply(1), reply(2), reply(3)].concat(),
            [reply(1), reply(0), reply(2), reply(3)].concat(),
            [reply(0), reply(0), reply(1), reply(2), reply(3)].concat(),
            [reply(0), bad, reply(2), reply(3)].concat(),
            [reply(0), b"hello\n".to_vec(), reply(1), reply(2)].concat(),
            [reply(0), vec![b'y'; 200], b"\n".to_vec(), reply(1)].concat(),
            [reply(0), raw].concat(),
            [reply(0), reply(2), reply(3), reply(1)].concat(),
            [reply(0), b"zz".to_vec(), reply(1), reply(2), reply(3)].concat(),
            [reply(2), reply(0), reply(1), reply(3)].concat(),
        ];
        for (stream, chunk) in streams
            .iter()
            .flat_map(|s| [5, 7, 31, s.len()].map(|c| (s, c)))
        {
            let (whole, c) = run(&[0, 1, 2, 3], stream, chunk);
            let (bytewise, _) = run(&[0, 1, 2, 3], stream, 1);
            let judged = |v: &[Verdict]| {
                let seqs = v.iter().map(|v| match v {
                    Verdict::Answered(l) | Verdict::Reordered(l) => Some(l.seq),
                    Verdict::Duplicated { seq } | Verdict::Altered { seq, .. } => Some(*seq),
                    Verdict::OtherProto { seq, .. } => Some(*seq),
                    Verdict::Extra { .. } => None,
                });
                names(v).into_iter().zip(seqs).collect::<Vec<_>>()
            };
            let shown = crate::line::show(stream, 200);
            assert_eq!(judged(&whole), judged(&bytewise), "{chunk}: {shown}");
            assert!(c.partial().is_empty());
        }
        // A whole reply right after an unfinished line belongs to that
        // line, also when the line is being dropped as too long.
        for unfinished in [b"zz".to_vec(), vec![b'y'; 200]] {
            let mut c = Checker::new(3, FMT);
            (0..3).for_each(|s| c.sent(s, 0, 0));
            let mut out = Vec::new();
            for piece in [[reply(0), unfinished].concat(), reply(1), reply(2)] {
                c.feed(&piece, |v| out.push(v));
            }
            assert_eq!(names(&out), ["ok", "altered", "ok"]);
        }
    }

    #[test]
    fn partial_reply_is_kept() {
        let r = reply(0);
        let (v, c) = run(&[0], &r[..5], 1);
        assert!(v.is_empty());
        assert_eq!(c.partial(), &r[..5]);
        assert_eq!(c.outstanding(), 1);
    }
}
