//! The bytes on the wire: the request line sent for (connection, sequence)
//! and the exact reply the server owes for it, in prefix and raw mode.
//!
//! Both are pure functions of their arguments, so a reply never needs to be
//! stored: the checker rebuilds the expected bytes when the reply arrives.

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

impl LineFormat {
    /// Length of the terminator: 1 for `\n`, 2 for `\r\n`.
    fn terminator_len(&self) -> usize {
        if self.crlf { 2 } else { 1 }
    }

    /// Appends the content of line (`conn`, `seq`): `c<conn> s<seq> ` padded
    /// with `x` up to `line_len` minus the terminator.
    fn push_content(&self, out: &mut Vec<u8>, conn: u32, seq: u64) {
        let start = out.len();
        // itoa rather than `write!`: this runs twice per line (the line and
        // its expected reply), and fmt was a sixth of the tool's CPU.
        out.push(b'c');
        out.extend_from_slice(itoa::Buffer::new().format(conn).as_bytes());
        out.extend_from_slice(b" s");
        out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        out.push(b' ');
        let want = self.line_len.saturating_sub(self.terminator_len());
        let have = out.len() - start;
        if have < want {
            out.resize(start + want, b'x');
        }
    }

    /// Appends the request line for (`conn`, `seq`), terminator included.
    pub fn push_line(&self, out: &mut Vec<u8>, conn: u32, seq: u64) {
        self.push_content(out, conn, seq);
        out.extend_from_slice(if self.crlf { b"\r\n" } else { b"\n" });
    }

    /// Appends the exact reply the server owes for line (`conn`, `seq`).
    pub fn push_reply(&self, out: &mut Vec<u8>, conn: u32, seq: u64) {
        match self.proto {
            Proto::Raw => self.push_line(out, conn, seq),
            Proto::Prefix => {
                out.extend_from_slice(PREFIX);
                self.push_content(out, conn, seq);
                out.extend_from_slice(SUFFIX);
            }
        }
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
        fmt(16, false, Proto::Prefix).push_line(&mut v, 7, 3);
        assert_eq!(v, b"c7 s3 xxxxxxxxx\n");
        assert_eq!(v.len(), 16);
    }

    #[test]
    fn line_grows_when_ids_do_not_fit() {
        let mut v = Vec::new();
        fmt(4, false, Proto::Raw).push_line(&mut v, 12345, 678);
        assert_eq!(v, b"c12345 s678 \n");
    }

    #[test]
    fn prefix_reply_chomps_crlf() {
        let f = fmt(10, true, Proto::Prefix);
        let (mut line, mut reply) = (Vec::new(), Vec::new());
        f.push_line(&mut line, 1, 2);
        f.push_reply(&mut reply, 1, 2);
        assert_eq!(line, b"c1 s2 xx\r\n");
        assert_eq!(reply, b"you said: c1 s2 xx!\n");
        assert!(reply.len() <= f.max_reply_len());
    }

    #[test]
    fn raw_reply_is_the_line() {
        let f = fmt(12, true, Proto::Raw);
        let (mut line, mut reply) = (Vec::new(), Vec::new());
        f.push_line(&mut line, 9, 9);
        f.push_reply(&mut reply, 9, 9);
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
    fn show_escapes() {
        assert_eq!(show(b"a\n\x00", 10), "a\\n\\x00");
        assert_eq!(show(b"abcdef", 3), "abc...");
    }
}
