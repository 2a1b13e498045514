//! Micro-benchmark of line framing and reply building
//! (`echoloop::line::answer_lines`), the pure work a connection does per
//! read.
//!
//! - long lines (4 KiB and 64 KiB, 1 MiB of input per iteration) are
//!   reported in bytes of input per second: the cost is the `\n` search
//!   (memchr) and the copy into the reply buffer;
//! - short lines (16 bytes, 64 Ki lines per iteration) are reported in lines
//!   per second: the cost is the per-line overhead.
//!
//! Both modes are measured: `prefix` (`you said: <content>!\n`) and `raw`
//! (the line back as it came). The output buffer is reused between
//! iterations, as the server reuses its buffers.
//!
//! Run: `cargo bench --bench framing`.

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use echoloop::line::{Mode, answer_lines};
use std::hint::black_box;
use std::time::Duration;

/// The server's default `--max-line`.
const MAX_LINE: usize = 65536;
/// Input bytes per iteration for the long-line cases.
const LONG_INPUT: usize = 1 << 20;
/// Lines per iteration for the short-line case.
const SHORT_LINES: usize = 64 * 1024;
/// Bytes per short line, `\n` included.
const SHORT_LEN: usize = 16;

/// `count` lines of `len` bytes each, the last byte of each a `\n`.
fn lines(count: usize, len: usize) -> Vec<u8> {
    let mut input = Vec::with_capacity(count * len);
    for i in 0..count {
        let fill = b'a' + (i % 26) as u8;
        input.extend(std::iter::repeat_n(fill, len - 1));
        input.push(b'\n');
    }
    input
}

/// Answers all of `input` into `out` (cleared first) and returns the lines.
fn answer_all(input: &[u8], mode: Mode, out: &mut BytesMut) -> usize {
    out.clear();
    let answered = answer_lines(input, mode, MAX_LINE, out, usize::MAX);
    answered.lines
}

fn modes() -> [(&'static str, Mode); 2] {
    [("prefix", Mode::Prefix), ("raw", Mode::Raw)]
}

/// Bytes per second for 4 KiB and 64 KiB lines.
fn long_lines(c: &mut Criterion) {
    let mut group = c.benchmark_group("answer_lines/long");
    for line_len in [4 * 1024, 64 * 1024] {
        let input = lines(LONG_INPUT / line_len, line_len);
        group.throughput(Throughput::Bytes(input.len() as u64));
        for (name, mode) in modes() {
            let mut out = BytesMut::with_capacity(input.len() * 2);
            let id = BenchmarkId::new(name, format!("{} KiB lines", line_len / 1024));
            group.bench_with_input(id, &input, |b, input| {
                b.iter(|| answer_all(black_box(input), mode, &mut out));
            });
        }
    }
    group.finish();
}

/// Lines per second for 16-byte lines.
fn short_lines(c: &mut Criterion) {
    let mut group = c.benchmark_group("answer_lines/short");
    let input = lines(SHORT_LINES, SHORT_LEN);
    group.throughput(Throughput::Elements(SHORT_LINES as u64));
    for (name, mode) in modes() {
        let mut out = BytesMut::with_capacity(input.len() * 2);
        let id = BenchmarkId::new(name, format!("{SHORT_LEN} B lines"));
        group.bench_with_input(id, &input, |b, input| {
            b.iter(|| {
                let answered = answer_all(black_box(input), mode, &mut out);
                assert_eq!(answered, SHORT_LINES);
            });
        });
    }
    group.finish();
}

/// Short enough that `cargo bench` stays quick, long enough to be stable.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = framing;
    config = config();
    targets = long_lines, short_lines
}
criterion_main!(framing);
