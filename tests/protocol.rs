//! SPEC §1, black-box: the real binary on port 0, raw bytes in, exact bytes
//! out (in the style of mini-redis's `tests/server.rs`).

mod common;

use common::*;
use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

#[test]
fn prefix_mode_answers_every_line() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    exchange(&mut c, b"hello\n", b"you said: hello!\n");
    exchange(&mut c, b"\n", b"you said: !\n");
    exchange(&mut c, b"two words\n", b"you said: two words!\n");
}

#[test]
fn raw_mode_echoes_lines_exactly() {
    let server = Server::start(&["--raw"]);
    let mut c = server.connect();
    exchange(&mut c, b"hello\n", b"hello\n");
    exchange(&mut c, b"crlf\r\n", b"crlf\r\n");
    exchange(&mut c, b"\n", b"\n");
}

#[test]
fn crlf_is_chomped_once() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    exchange(&mut c, b"telnet\r\n", b"you said: telnet!\n");
    exchange(&mut c, b"two\r\r\n", b"you said: two\r!\n");
}

#[test]
fn bytes_are_opaque() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    exchange(
        &mut c,
        b"nul\0 and \xff\xfe\xc3\x28\n",
        b"you said: nul\0 and \xff\xfe\xc3\x28!\n",
    );
    let raw = Server::start(&["--raw"]);
    let mut c = raw.connect();
    exchange(&mut c, b"\0\x01\x80\xff\n", b"\0\x01\x80\xff\n");
}

#[test]
fn ten_thousand_pipelined_lines_in_one_write() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let mut input = Vec::new();
    let mut expected = Vec::new();
    for i in 0..10_000 {
        input.extend_from_slice(format!("line {i}\n").as_bytes());
        expected.extend_from_slice(&said(format!("line {i}").as_bytes()));
    }
    let mut writer = c.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&input).unwrap());
    let got = read_n(&mut c, expected.len());
    sender.join().unwrap();
    assert!(got == expected, "replies differ from the lines, in order");
}

#[test]
fn a_line_split_byte_by_byte() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.set_nodelay(true).unwrap();
    for &b in b"split\r\nsecond\n" {
        c.write_all(&[b]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    let want = [said(b"split"), said(b"second")].concat();
    assert_eq!(read_n(&mut c, want.len()), want);
}

#[test]
fn eof_answers_the_unterminated_line_and_closes() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.write_all(b"a\nb").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), [said(b"a"), said(b"b")].concat());

    let raw = Server::start(&["--raw"]);
    let mut c = raw.connect();
    c.write_all(b"a\nb").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), b"a\nb");
}

#[test]
fn eof_flushes_every_pending_reply() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let mut input = Vec::new();
    for i in 0..2000 {
        input.extend_from_slice(format!("{i}\n").as_bytes());
    }
    c.write_all(&input).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = read_to_eof(&mut c);
    let want: Vec<u8> = (0..2000)
        .flat_map(|i| said(format!("{i}").as_bytes()))
        .collect();
    assert!(got == want);
}

#[test]
fn max_line_at_the_limit_is_answered() {
    let server = Server::start(&["--max-line", "16"]);
    let mut c = server.connect();
    let line = [b'x'; 16];
    exchange(&mut c, &[&line[..], b"\n"].concat(), &said(&line));
    // The \r of a CRLF does not count.
    exchange(&mut c, &[&line[..], b"\r\n"].concat(), &said(&line));
}

#[test]
fn max_line_plus_one_gets_the_error_after_earlier_replies() {
    let server = Server::start(&["--max-line", "16"]);
    let mut c = server.connect();
    c.write_all(b"fine\n").unwrap();
    c.write_all(&[b'x'; 17]).unwrap();
    c.write_all(b"\nnever answered\n").unwrap();
    let got = read_to_eof(&mut c);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "you said: fine!\nerror: line too long (max 16 bytes)\n"
    );
}

#[test]
fn default_max_line_is_64_kib() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let line = vec![b'y'; 65536];
    exchange(&mut c, &[&line[..], b"\n"].concat(), &said(&line));
    c.write_all(&vec![b'z'; 65537]).unwrap();
    assert_eq!(
        read_to_eof(&mut c),
        b"error: line too long (max 65536 bytes)\n"
    );
}

#[test]
fn a_line_that_never_ends_is_cut_off_and_memory_stays_bounded() {
    let server = Server::start(&["--max-line", "1KiB"]);
    let before = server.rss();
    let mut c = server.connect();
    let mut writer = c.try_clone().unwrap();
    // 32 MiB without a newline: the server must refuse it early, keep at
    // most ~1 KiB of it, and still get its error line to us.
    let sender = thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..512 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    use std::io::Read;
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        "error: line too long (max 1024 bytes)\n"
    );
    sender.join().unwrap();
    let grown = server.rss().saturating_sub(before);
    assert!(grown < 4 << 20, "server grew by {grown} bytes");
}

#[test]
fn replies_stay_in_order_however_segments_fall() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.set_nodelay(true).unwrap();
    let input = b"one\ntw".to_vec();
    c.write_all(&input).unwrap();
    thread::sleep(Duration::from_millis(20));
    c.write_all(b"o\nthree\nfo").unwrap();
    thread::sleep(Duration::from_millis(20));
    c.write_all(b"ur\n").unwrap();
    let want = [said(b"one"), said(b"two"), said(b"three"), said(b"four")].concat();
    assert_eq!(read_n(&mut c, want.len()), want);
}
