//! Peer server for the benchmarks: the idiomatic tokio line echo. A
//! current-thread runtime, a task per connection, `read_until(b'\n')` on a
//! `BufReader` and one `write_all` per line.
//!
//! `--listen ADDR` (default 127.0.0.1:0), `--raw` for a plain echo;
//! prints `Echoing on ADDR` to stdout once bound.

use std::io::Write;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The reply to one line as received (terminator included when present).
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

/// Serves one connection until EOF (an unterminated last line is answered)
/// or an error.
async fn serve(stream: TcpStream, raw: bool) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    let mut out = Vec::new();
    loop {
        line.clear();
        if rd.read_until(b'\n', &mut line).await? == 0 {
            return wr.shutdown().await;
        }
        out.clear();
        reply(&line, raw, &mut out);
        wr.write_all(&out).await?;
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
