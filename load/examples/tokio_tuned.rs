//! Peer server for the benchmarks: a tuned tokio line echo. A
//! current-thread runtime, a task per connection; each read is answered
//! with one write: all complete lines of the read are turned into replies
//! in one output buffer, and the partial last line waits for the next read.
//!
//! `--listen ADDR` (default 127.0.0.1:0), `--raw` for a plain echo;
//! prints `Echoing on ADDR` to stdout once bound.

use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes asked for per read.
const READ_CHUNK: usize = 16 * 1024;

/// Appends the reply to one line (terminator included when present).
fn reply(line: &[u8], raw: bool, out: &mut Vec<u8>) {
    if raw {
        out.extend_from_slice(line);
        return;
    }
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    out.extend_from_slice(b"you said: ");
    out.extend_from_slice(content);
    out.extend_from_slice(b"!\n");
}

/// Serves one connection. Invariant: `pending` holds the bytes of an
/// incomplete line (no `\n`) between reads.
async fn serve(mut stream: TcpStream, raw: bool) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        let start = pending.len();
        pending.reserve(READ_CHUNK);
        let n = stream.read_buf(&mut pending).await?;
        if n == 0 {
            // EOF: an unterminated last line still gets its reply.
            if !pending.is_empty() {
                out.clear();
                reply(&pending, raw, &mut out);
                stream.write_all(&out).await?;
            }
            return stream.shutdown().await;
        }
        // Only the new bytes can hold a `\n` (the rest was searched before).
        let Some(last_nl) = pending[start..].iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let complete = start + last_nl + 1;
        out.clear();
        for line in pending[..complete].split_inclusive(|&b| b == b'\n') {
            reply(line, raw, &mut out);
        }
        stream.write_all(&out).await?;
        pending.drain(..complete);
    }
}

/// `--listen ADDR` and `--raw` from the command line.
fn parse_args() -> Result<(String, bool), String> {
    let mut listen = "127.0.0.1:0".to_string();
    let mut raw = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--raw" => raw = true,
            _ => {
                return Err(format!(
                    "unknown argument {a} (usage: [--listen ADDR] [--raw])"
                ));
            }
        }
    }
    Ok((listen, raw))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (listen, raw) = parse_args().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let listener = TcpListener::bind(&listen).await.unwrap_or_else(|e| {
        eprintln!("error: cannot listen on {listen}: {e}");
        std::process::exit(1)
    });
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    println!("Echoing on {addr}");
    let _ = std::io::stdout().flush();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = serve(stream, raw).await;
                });
            }
            // Out of descriptors and the like: back off briefly instead of
            // spinning (a blocking pause of the only thread, but a rare one).
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}
