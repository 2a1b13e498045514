//! The trivially correct line echo the framing and connection targets
//! compare echoloop with: the whole client stream at once, no buffers, no
//! limits but `max_line`.

use echoloop::line::Mode;

/// What a correct server sends for the client's whole `stream`, and
/// whether it ends with the too-long error line. `ended`: the client
/// half-closed after `stream`, so an unterminated tail is a last line.
pub fn replies(mode: Mode, max_line: usize, stream: &[u8], ended: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..=i];
        let body = content(&line[..i]);
        if body.len() > max_line {
            return refused(out, max_line);
        }
        reply(mode, line, body, &mut out);
        rest = &rest[i + 1..];
    }
    // An unterminated tail is refused as soon as even a `\n` now could not
    // make it fit; at EOF it is a line of its own.
    if content(rest).len() > max_line {
        return refused(out, max_line);
    }
    if ended && !rest.is_empty() {
        reply(mode, rest, content(rest), &mut out);
    }
    (out, false)
}

/// The replies so far, then the error line.
fn refused(mut out: Vec<u8>, max_line: usize) -> (Vec<u8>, bool) {
    out.extend_from_slice(format!("error: line too long (max {max_line} bytes)\n").as_bytes());
    (out, true)
}

/// A line's content: one trailing `\r` removed.
fn content(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn reply(mode: Mode, line: &[u8], body: &[u8], out: &mut Vec<u8>) {
    match mode {
        Mode::Prefix => {
            out.extend_from_slice(b"you said: ");
            out.extend_from_slice(body);
            out.extend_from_slice(b"!\n");
        }
        Mode::Raw => out.extend_from_slice(line),
    }
}
