//! Checks of the `/metrics` request framing, [`echoloop::metrics::parse_request`],
//! and of the answer [`echoloop::metrics::response`] builds, for the
//! `metrics_request` target (arbitrary bytes as a metrics client's input).

use std::sync::Arc;

use echoloop::metrics::{self, Counters, MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS, Request};

use super::prefixes::first_final;

/// The status codes a metrics connection may answer with.
const STATUSES: [u16; 4] = [200, 400, 404, 405];

/// Arbitrary bytes as a metrics client's input, split into reads in every
/// possible way: `parse_request` never panics and gives the same answer for
/// every split; it answers by the time [`MAX_REQUEST_HEAD`] bytes are in
/// (nothing more is ever buffered) and by the blank line that ends a head;
/// the answer is a well-framed HTTP response with status 200, 400, 404 or
/// 405; a complete head within the bound gets 400 exactly when it is not
/// valid HTTP, and otherwise 200 for `GET` or `HEAD /metrics` (with or
/// without a query), 405 for any other method there, 404 elsewhere; an
/// answer to `HEAD` has the headers and no body.
pub fn check_request(input: &[u8]) {
    let answer = first_final(input, |buf| match metrics::parse_request(buf) {
        Request::Incomplete => None,
        request => Some(request),
    });
    let end = head_end(input);
    let Some((at, request)) = answer else {
        assert!(
            input.len() < MAX_REQUEST_HEAD,
            "{} bytes buffered",
            input.len()
        );
        assert_eq!(end, None, "a complete head was never answered");
        return;
    };
    assert!(at <= MAX_REQUEST_HEAD, "answered only after {at} bytes");
    if let Some(end) = end {
        assert!(at <= end, "answered at {at}, the head ended at {end}");
    }

    let counters = [Arc::new(Counters::new())];
    let response = metrics::response(request, &counters).expect("a final answer has a response");
    let (method, path) = request_line(input);
    let status = check_framing(&response, method == b"HEAD");
    assert!(
        STATUSES.contains(&status),
        "status {status} for {request:?}"
    );
    if status != 400 {
        // A well-formed request is answered exactly when its head ends.
        assert_eq!(Some(at), end, "{request:?} answered at {at}");
    }
    if let Some(end) = end.filter(|&end| end <= MAX_REQUEST_HEAD) {
        let head = &input[..end];
        assert_eq!(
            status != 400,
            is_valid(head),
            "status {status} for {head:?}"
        );
        if status != 400 {
            let expected = match (path, method) {
                (b"/metrics", b"GET" | b"HEAD") => 200,
                (b"/metrics", _) => 405,
                _ => 404,
            };
            assert_eq!(status, expected, "status {status} for {head:?}");
        }
    }
}

/// Whether `head`, a whole request head within the size bound, is one the
/// server must answer as HTTP: `httparse` takes it in full with at most
/// `MAX_REQUEST_HEADERS` headers. (`parse_request` uses `httparse` too; what
/// this checks is echoloop's part: the bounds, and that nothing but the
/// head decides the answer.)
fn is_valid(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    matches!(request.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len())
}

/// Where a request head in `input` ends, by a model simpler than HTTP's:
/// after leading empty lines (which HTTP/1.1 servers skip), the first empty
/// line, `\n` or `\r\n`, that follows a line end. `None` if there is none.
fn head_end(input: &[u8]) -> Option<usize> {
    let start = input.len() - skip_empty_lines(input).len();
    let rest = &input[start..];
    let lf_lf = rest.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let lf_crlf = rest.windows(3).position(|w| w == b"\n\r\n").map(|i| i + 3);
    let end = match (lf_lf, lf_crlf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(start + end)
}

/// `bytes` without the empty lines (`\n` or `\r\n`) it starts with.
fn skip_empty_lines(mut bytes: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = bytes.strip_prefix(b"\n") {
            bytes = rest;
        } else if let Some(rest) = bytes.strip_prefix(b"\r\n") {
            bytes = rest;
        } else {
            return bytes;
        }
    }
}

/// The method and the path (the target without its query) of the request
/// line that starts `input` after leading empty lines, split at spaces.
fn request_line(input: &[u8]) -> (&[u8], &[u8]) {
    let line = skip_empty_lines(input);
    let mut words = line.split(|&b| b == b' ');
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    (method, path)
}

/// Asserts that `response` is an HTTP/1.1 response whose `Content-Length`
/// is its body's length (for `HEAD`: no body, the length of the `GET`
/// answer's) and which announces `Connection: close`; returns its status
/// code.
fn check_framing(response: &[u8], is_head: bool) -> u16 {
    let text = std::str::from_utf8(response).expect("responses are UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(&str, &str)> = lines.filter_map(|line| line.split_once(": ")).collect();
    let length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.parse::<usize>().expect("a numeric Content-Length"));
    if is_head && status != 400 && status != 405 {
        assert!(body.is_empty(), "a body in the answer to HEAD");
        assert!(
            length.is_some(),
            "HEAD is answered with the GET's Content-Length"
        );
    } else {
        assert_eq!(length, Some(body.len()), "Content-Length");
    }
    assert!(
        headers.contains(&("Connection", "close")),
        "Connection: close"
    );
    status
}
