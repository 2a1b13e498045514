//! A faulty server for the soak's spin check (`load/tests/soak.rs`): a
//! prefix-mode line echo, one thread per connection, that busy-loops a core
//! whenever it has served clients and none is left, the way a loop that
//! forgets to sleep once its last connection closes would. It runs as its
//! own process so its spinning shows in its own CPU time only.
//!
//! `--listen ADDR` (default 127.0.0.1:0); prints `Echoing on ADDR` to
//! stdout once bound.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What the connection threads and the spinner share.
#[derive(Default)]
struct Shared {
    /// Connections open now.
    open: AtomicUsize,
    /// Has any connection been accepted yet?
    served: AtomicBool,
}

/// Echoes `you said: <line>!` for every line until EOF or an error.
fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        out.write_all(&[b"you said: ", content, b"!\n"].concat())?;
    }
}

/// The fault: burns a core while no client is connected after the first.
fn spin(shared: &Shared) {
    loop {
        if shared.served.load(Ordering::Relaxed) && shared.open.load(Ordering::Relaxed) == 0 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = match args.iter().position(|a| a == "--listen") {
        Some(i) => args.get(i + 1).map(String::as_str).unwrap_or_default(),
        None => "127.0.0.1:0",
    };
    let listener = TcpListener::bind(listen)?;
    println!("Echoing on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let shared = Arc::new(Shared::default());
    let spinner = Arc::clone(&shared);
    std::thread::spawn(move || spin(&spinner));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        shared.open.fetch_add(1, Ordering::Relaxed);
        shared.served.store(true, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let _ = serve(stream);
            shared.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    Ok(())
}
