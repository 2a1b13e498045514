//! The bytes on the wire: the request line sent for (connection, sequence)
//! and the exact reply the server owes for it, in prefix and raw mode.
//!
//! Both are pure functions of their arguments, so a reply never needs to be
//! stored. The hot paths (a line per send, a reply check per reply) step a
//! `Numbered` line or reply to the next sequence number in place, and
//! `is_reply` checks any other reply without building it.

/// Which reply the server must give for a line (SPEC section 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// `you said: <content>!\n`, content = line without `\n` and one `\r`.
    Prefix,
    /// The line echoed back exactly as sent, terminator included.
    Raw,
}

/// The reply prefix of prefix mode.
const PREFIX: &[u8] = b"you said: ";
/// The reply suffix of prefix mode.
const SUFFIX: &[u8] = b"!\n";

/// How the lines sent by one run look. Invariant: a line's content never
/// contains `\r` or `\n`, so every reply ends at its first `\n`.
#[derive(Clone, Copy, Debug)]
pub struct LineFormat {
    /// Wanted total length of a line in bytes, terminator included. A line
    /// is longer only when its connection id and sequence number don't fit.
    pub line_len: usize,
    /// End lines with `\r\n` instead of `\n`.
    pub crlf: bool,
    /// The reply the server must give.
    pub proto: Proto,
}

impl Proto {
    /// The command-line spelling: `prefix` or `raw`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Prefix => "prefix",
            Proto::Raw => "raw",
        }
    }
}

/// The start of every line of one connection, `c<conn> s`, formatted once
/// when the connection is made rather than for every line and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// `c`, at most 10 digits, ` s`.
    bytes: [u8; 13],
    len: u8,
}

impl Head {
    /// The head of connection `conn`'s lines.
    pub fn new(conn: u32) -> Head {
        let mut bytes = [0; 13];
        let mut digits = itoa::Buffer::new();
        let id = digits.format(conn).as_bytes();
        bytes[0] = b'c';
        bytes[1..1 + id.len()].copy_from_slice(id);
        bytes[1 + id.len()..3 + id.len()].copy_from_slice(b" s");
        Head {
            bytes,
            len: (3 + id.len()) as u8,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// One connection's line, or the reply owed for it, for one sequence
/// number at a time, kept as bytes and stepped to the next number in place
/// (a carry over its digits) rather than formatted anew: the sender and the
/// checker each need one per line, in sequence order.
#[derive(Clone, Debug)]
pub struct Numbered {
    format: LineFormat,
    head: Head,
    /// The reply rather than the line.
    reply: bool,
    seq: u64,
    /// `bytes()` when it is at most `INLINE` bytes long, the rest zeros.
    inline: [u8; INLINE],
    /// The length of `bytes()`.
    len: usize,
    /// `bytes()` as `set` formats it, which it is when longer than `INLINE`.
    formatted: Vec<u8>,
    /// Where the digits of `seq` sit in `bytes()`.
    digits: std::ops::Range<usize>,
}

/// Lines and replies of up to this many bytes (the default line is 16, its
/// reply in prefix mode 28) are kept in the `Numbered` itself, in a block
/// of this fixed size, rather than behind a pointer: appending one is then
/// a copy of the whole block (see `append_to`).
const INLINE: usize = 32;

impl Numbered {
    /// Line 0 of connection `head`.
    pub fn line(format: LineFormat, head: Head) -> Numbered {
        Numbered::new(format, head, false)
    }

    /// The reply owed for line 0 of connection `head`.
    pub fn reply(format: LineFormat, head: Head) -> Numbered {
        Numbered::new(format, head, true)
    }

    fn new(format: LineFormat, head: Head, reply: bool) -> Numbered {
        let mut n = Numbered {
            format,
            head,
            reply,
            seq: 0,
            inline: [0; INLINE],
            len: 0,
            formatted: Vec::new(),
            digits: 0..0,
        };
        n.set(0);
        n
    }

    /// Its sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The bytes for `seq()`.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        if self.len <= INLINE {
            &self.inline[..self.len]
        } else {
            &self.formatted
        }
    }

    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len <= INLINE {
            &mut self.inline[..self.len]
        } else {
            &mut self.formatted
        }
    }

    /// Appends `bytes()` to `out`. This runs for every line sent: a short
    /// line is appended as the whole fixed-size `inline` block, then cut
    /// back to its length, which compiles to a few moves where a copy of a
    /// length known only at run time is a call to `memcpy`, dearer than
    /// the copy at this size.
    #[inline]
    pub fn append_to(&self, out: &mut Vec<u8>) {
        if self.len > INLINE {
            return out.extend_from_slice(&self.formatted);
        }
        let start = out.len();
        out.extend_from_slice(&self.inline);
        out.truncate(start + self.len);
    }

    /// Does `data` start with `bytes()`? The same answer as
    /// `data.starts_with(bytes())`. This runs for every reply received: a
    /// short reply is compared as the two 16-byte lanes of `inline`, the
    /// second masked to the reply's length, rather than through a call to
    /// `memcmp` (and whole lanes, for the reason given in `advance`).
    #[inline]
    pub fn starts(&self, data: &[u8]) -> bool {
        let n = self.len;
        if !(16..=INLINE).contains(&n) || data.len() < INLINE {
            return data.starts_with(self.bytes());
        }
        let tail = u128::MAX.checked_shr(8 * (INLINE - n) as u32).unwrap_or(0);
        lane(data, 0) == lane(&self.inline, 0)
            && (lane(data, 16) ^ lane(&self.inline, 16)) & tail == 0
    }

    /// Moves to sequence number `seq`, formatting it.
    pub fn set(&mut self, seq: u64) {
        self.seq = seq;
        self.formatted.clear();
        let start = if self.reply && self.format.proto == Proto::Prefix {
            PREFIX.len()
        } else {
            0
        } + self.head.len as usize;
        if self.reply {
            self.format.push_reply(&mut self.formatted, &self.head, seq);
        } else {
            self.format.push_line(&mut self.formatted, &self.head, seq);
        }
        self.len = self.formatted.len();
        self.inline = [0; INLINE];
        if let Some(short) = self.inline.get_mut(..self.len) {
            short.copy_from_slice(&self.formatted);
        }
        let len = self.formatted[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        self.digits = start..start + len;
    }

    /// Moves to the next sequence number.
    #[inline]
    pub fn advance(&mut self) {
        let last = self.digits.end - 1;
        if self.len <= INLINE && self.inline[last] != b'9' {
            // The usual step, a last digit below 9, made as one add to the
            // whole 16-byte lane that holds it (a vector add of a one at
            // the digit's place). The lane's next readers, `append_to` and
            // `starts`, load it whole, and the CPU hands a load the bytes
            // of a store still on their way to the cache only when that one
            // store covers the whole load: after a one-byte store into the
            // lane, the load would wait for it.
            let at = last / 16 * 16;
            let unit = &UNIT[last - at];
            let lane: &mut [u8; 16] = (&mut self.inline[at..at + 16])
                .try_into()
                .expect("16 bytes");
            for i in 0..16 {
                lane[i] = lane[i].wrapping_add(unit[i]);
            }
            self.seq += 1;
            return;
        }
        let digits = self.digits.clone();
        for d in self.bytes_mut()[digits].iter_mut().rev() {
            if *d == b'9' {
                *d = b'0';
            } else {
                *d += 1;
                self.seq += 1;
                return;
            }
        }
        // All nines: one digit more, and less padding.
        self.set(self.seq + 1);
    }
}

/// `UNIT[i]` is 1 at byte `i` and 0 elsewhere: the step of a digit at byte
/// `i` of a 16-byte lane, for `Numbered::advance`.
static UNIT: [[u8; 16]; 16] = {
    let mut unit = [[0; 16]; 16];
    let mut i = 0;
    while i < 16 {
        unit[i][i] = 1;
        i += 1;
    }
    unit
};

/// The 16 bytes of `bytes` from `at`, as one number (little-endian).
fn lane(bytes: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(bytes[at..at + 16].try_into().expect("16 bytes"))
}

impl LineFormat {
    /// Length of the terminator: 1 for `\n`, 2 for `\r\n`.
    fn terminator_len(&self) -> usize {
        self.terminator().len()
    }

    fn terminator(&self) -> &'static [u8] {
        if self.crlf { b"\r\n" } else { b"\n" }
    }

    /// Content bytes wanted before the terminator.
    fn content_len(&self) -> usize {
        self.line_len.saturating_sub(self.terminator_len())
    }

    /// Appends the content of line (`head`, `seq`): `c<conn> s<seq> `
    /// padded with `x` up to `line_len` minus the terminator.
    fn push_content(&self, out: &mut Vec<u8>, head: &Head, seq: u64) {
        let start = out.len();
        // itoa rather than `write!`, and the head formatted once per
        // connection (the hot paths step a `Numbered` instead).
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        out.push(b' ');
        let have = out.len() - start;
        if have < self.content_len() {
            out.resize(start + self.content_len(), b'x');
        }
    }

    /// Appends the request line for (`head`, `seq`), terminator included.
    pub fn push_line(&self, out: &mut Vec<u8>, head: &Head, seq: u64) {
        self.push_content(out, head, seq);
        out.extend_from_slice(self.terminator());
    }

    /// Appends the exact reply the server owes for line (`head`, `seq`).
    pub fn push_reply(&self, out: &mut Vec<u8>, head: &Head, seq: u64) {
        match self.proto {
            Proto::Raw => self.push_line(out, head, seq),
            Proto::Prefix => {
                out.extend_from_slice(PREFIX);
                self.push_content(out, head, seq);
                out.extend_from_slice(SUFFIX);
            }
        }
    }

    /// Is `got` exactly the reply owed for line (`head`, `seq`)? The same
    /// answer as comparing it with `push_reply`'s bytes, without building
    /// them: this runs for every reply received.
    pub fn is_reply(&self, got: &[u8], head: &Head, seq: u64) -> bool {
        let content = match self.proto {
            Proto::Raw => got.strip_suffix(self.terminator()),
            Proto::Prefix => got
                .strip_prefix(PREFIX)
                .and_then(|g| g.strip_suffix(SUFFIX)),
        };
        content.is_some_and(|c| self.is_content(c, head, seq))
    }

    /// Is `content` what `push_content` appends for (`head`, `seq`)? The
    /// digits are read rather than `seq` formatted: cheaper, and the only
    /// spelling `push_content` makes is the shortest one.
    fn is_content(&self, content: &[u8], head: &Head, seq: u64) -> bool {
        let Some(rest) = content.strip_prefix(head.as_bytes()) else {
            return false;
        };
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let shortest = digits == 1 || (digits > 1 && rest[0] != b'0');
        let value = rest[..digits].iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        });
        let Some(padding) = rest[digits..].strip_prefix(b" ") else {
            return false;
        };
        let have = content.len() - padding.len();
        shortest
            && value == Some(seq)
            && padding.len() == self.content_len().saturating_sub(have)
            && padding.iter().all(|&b| b == b'x')
    }

    /// The same lines, answered in the other protocol: what a server in
    /// the other mode sends back.
    pub fn other_proto(&self) -> LineFormat {
        let proto = match self.proto {
            Proto::Prefix => Proto::Raw,
            Proto::Raw => Proto::Prefix,
        };
        LineFormat { proto, ..*self }
    }

    /// An upper bound on the length of any reply of this run: a received
    /// line longer than this can't be a correct reply.
    pub fn max_reply_len(&self) -> usize {
        // "c4294967295 s18446744073709551615 " is 34 bytes.
        let content = self.line_len.max(34 + self.terminator_len());
        content + PREFIX.len() + SUFFIX.len()
    }
}

/// The reply the server owes for any one received line, `\n` included if
/// it had one (a final line before EOF may not): SPEC section 1, for lines
/// of arbitrary bytes rather than this tool's own.
pub fn reply_to(proto: Proto, line: &[u8]) -> Vec<u8> {
    match proto {
        Proto::Raw => line.to_vec(),
        Proto::Prefix => {
            let content = line.strip_suffix(b"\n").unwrap_or(line);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            [PREFIX, content, SUFFIX].concat()
        }
    }
}

/// Renders bytes for an error message: printable ASCII as is, the rest
/// escaped (`\n`, `\x00`), cut after `max` bytes.
pub fn show(bytes: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(max) {
        s.extend(std::ascii::escape_default(b).map(char::from));
    }
    if bytes.len() > max {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(line_len: usize, crlf: bool, proto: Proto) -> LineFormat {
        LineFormat {
            line_len,
            crlf,
            proto,
        }
    }

    #[test]
    fn line_is_padded_to_line_len() {
        let mut v = Vec::new();
        fmt(16, false, Proto::Prefix).push_line(&mut v, &Head::new(7), 3);
        assert_eq!(v, b"c7 s3 xxxxxxxxx\n");
        assert_eq!(v.len(), 16);
    }

    #[test]
    fn line_grows_when_ids_do_not_fit() {
        let mut v = Vec::new();
        fmt(4, false, Proto::Raw).push_line(&mut v, &Head::new(12345), 678);
        assert_eq!(v, b"c12345 s678 \n");
    }

    #[test]
    fn prefix_reply_chomps_crlf() {
        let f = fmt(10, true, Proto::Prefix);
        let (mut line, mut reply) = (Vec::new(), Vec::new());
        f.push_line(&mut line, &Head::new(1), 2);
        f.push_reply(&mut reply, &Head::new(1), 2);
        assert_eq!(line, b"c1 s2 xx\r\n");
        assert_eq!(reply, b"you said: c1 s2 xx!\n");
        assert!(reply.len() <= f.max_reply_len());
    }

    #[test]
    fn raw_reply_is_the_line() {
        let f = fmt(12, true, Proto::Raw);
        let (mut line, mut reply) = (Vec::new(), Vec::new());
        f.push_line(&mut line, &Head::new(9), 9);
        f.push_reply(&mut reply, &Head::new(9), 9);
        assert_eq!(line, reply);
    }

    #[test]
    fn reply_to_any_line_follows_the_spec() {
        assert_eq!(reply_to(Proto::Prefix, b"a\r\n"), b"you said: a!\n");
        assert_eq!(reply_to(Proto::Prefix, b"a\r\r\n"), b"you said: a\r!\n");
        assert_eq!(reply_to(Proto::Prefix, b"tail"), b"you said: tail!\n");
        assert_eq!(reply_to(Proto::Raw, b"\x00\xff\r\n"), b"\x00\xff\r\n");
        assert_eq!(reply_to(Proto::Raw, b"tail"), b"tail");
    }

    #[test]
    fn is_reply_agrees_with_push_reply_byte_for_byte() {
        let formats = [4, 16, 40].into_iter().flat_map(|len| {
            [
                (false, Proto::Prefix),
                (true, Proto::Prefix),
                (false, Proto::Raw),
                (true, Proto::Raw),
            ]
            .map(|(crlf, proto)| fmt(len, crlf, proto))
        });
        for f in formats {
            for (conn, seq) in [(0, 10), (7, 3), (u32::MAX, u64::MAX), (12, 99)] {
                let head = Head::new(conn);
                let mut reply = Vec::new();
                f.push_reply(&mut reply, &head, seq);
                assert!(f.is_reply(&reply, &head, seq), "{f:?} {}", show(&reply, 99));
                assert!(!f.is_reply(&reply, &head, seq ^ 1));
                assert!(!f.is_reply(&reply, &Head::new(conn ^ 1), seq));
                assert!(!f.is_reply(&reply, &head, seq / 10));
                for i in 0..reply.len() {
                    assert!(!f.is_reply(&reply[..i], &head, seq));
                    let mut bad = reply.clone();
                    bad[i] ^= 0x20;
                    assert!(!f.is_reply(&bad, &head, seq), "{f:?} byte {i}");
                    let mut longer = reply.clone();
                    longer.insert(i, b'x');
                    assert!(!f.is_reply(&longer, &head, seq), "{f:?} x at {i}");
                }
            }
        }
    }

    #[test]
    fn numbered_steps_like_formatting_anew() {
        for f in [fmt(16, false, Proto::Prefix), fmt(4, true, Proto::Raw)] {
            let head = Head::new(42);
            let (mut line, mut reply) = (Numbered::line(f, head), Numbered::reply(f, head));
            for seq in 0..1200 {
                let (mut want_line, mut want_reply) = (Vec::new(), Vec::new());
                f.push_line(&mut want_line, &head, seq);
                f.push_reply(&mut want_reply, &head, seq);
                assert_eq!((line.seq(), line.bytes()), (seq, &want_line[..]));
                assert_eq!((reply.seq(), reply.bytes()), (seq, &want_reply[..]));
                let mut out = b"before ".to_vec();
                line.append_to(&mut out);
                assert_eq!(out, [&b"before "[..], &want_line].concat());
                line.advance();
                reply.advance();
            }
            reply.set(u64::MAX);
            assert!(f.is_reply(reply.bytes(), &head, u64::MAX));
        }
    }

    #[test]
    fn append_and_starts_agree_with_slices_at_every_length() {
        // Lengths 4..=45 cover both storages (inline up to 32 bytes) and
        // both comparisons (blocks from 16 to 32 bytes); stepping over 9s
        // changes the lengths as it goes.
        for (line_len, proto) in (4..=45).flat_map(|l| [(l, Proto::Raw), (l, Proto::Prefix)]) {
            let f = fmt(line_len, false, proto);
            let (mut line, mut reply) = (
                Numbered::line(f, Head::new(1)),
                Numbered::reply(f, Head::new(1)),
            );
            for seq in 0..120 {
                for n in [&line, &reply] {
                    let want = n.bytes().to_vec();
                    let what = format!("{proto:?} line_len {line_len} s{seq}");
                    let mut out = vec![b'#'; 3];
                    n.append_to(&mut out);
                    assert_eq!(out, [&b"###"[..], &want].concat(), "{what}");
                    for more in [&b""[..], b"more", &[b'#'; 40]] {
                        let data = [&want, more].concat();
                        assert!(n.starts(&data), "{what}");
                        assert!(!n.starts(&data[..want.len() - 1]), "{what}");
                        for i in 0..want.len() {
                            let mut bad = data.clone();
                            bad[i] ^= 1;
                            assert!(!n.starts(&bad), "{what} byte {i}");
                        }
                    }
                }
                line.advance();
                reply.advance();
            }
        }
    }

    #[test]
    fn show_escapes() {
        assert_eq!(show(b"a\n\x00", 10), "a\\n\\x00");
        assert_eq!(show(b"abcdef", 3), "abc...");
    }
}
