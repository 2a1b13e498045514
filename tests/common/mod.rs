//! Shared test support: start the real `echoloop` binary on port 0, read its
//! `Echoing on ADDR` line, talk to it over real sockets, inspect it in /proc.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single read in a test may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    /// The `Metrics on ADDR` listener, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
    pub stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `echoloop --listen 127.0.0.1:0 <args>`.
    pub fn start(args: &[&str]) -> Server {
        let mut full = vec!["--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Server::start_raw(&full, 1)
    }

    /// Starts `echoloop <args>` and waits for `lines` startup lines
    /// (`Echoing on ADDR` or `Metrics on ADDR`).
    pub fn start_raw(args: &[&str], lines: usize) -> Server {
        Server::start_cmd(Command::new(env!("CARGO_BIN_EXE_echoloop")), args, lines)
    }

    /// Like [`Server::start`], with the open-file limit of the server
    /// process set to `nofile` (soft and hard) before it starts.
    pub fn start_with_nofile(args: &[&str], nofile: u64) -> Server {
        let mut full = vec!["--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Server::start_cmd(with_nofile(nofile), &full, 1)
    }

    /// Starts `cmd <args>` (a command that runs echoloop, perhaps through a
    /// wrapper) and waits for `lines` startup lines.
    pub fn start_cmd(mut cmd: Command, args: &[&str], lines: usize) -> Server {
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start echoloop");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut addrs = Vec::new();
        let mut metrics = None;
        for _ in 0..lines {
            let mut line = String::new();
            out.read_line(&mut line).expect("read startup line");
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("Echoing on ") {
                addrs.push(addr.parse().unwrap());
            } else if let Some(addr) = line.strip_prefix("Metrics on ") {
                metrics = Some(addr.parse().unwrap());
            } else {
                panic!("unexpected startup line {line:?}");
            }
        }
        Server {
            child,
            addrs,
            metrics,
            stderr,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connected client with read/write timeouts.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr())
    }

    /// Open descriptors of the server process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Resident memory of the server, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap();
        kb * 1024
    }

    /// CPU time (user + system) of the server so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields are counted after the command name, which is in
        // parentheses and may hold spaces: utime and stime are fields 14
        // and 15 of the line, 12 and 13 after the `)`.
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
    }

    /// Waits until `pred` holds for the server, or panics after `within`.
    pub fn wait_until(&self, within: Duration, what: &str, mut pred: impl FnMut(&Server) -> bool) {
        let start = Instant::now();
        while !pred(self) {
            assert!(start.elapsed() < within, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of our own child.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the server to exit and returns its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(start.elapsed() < within, "server did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read reply");
    buf
}

/// Reads until EOF and returns everything.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read to EOF");
    buf
}

/// Sends `line` and returns exactly `expected.len()` bytes of reply.
pub fn exchange(s: &mut TcpStream, line: &[u8], expected: &[u8]) {
    s.write_all(line).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&read_n(s, expected.len())),
        String::from_utf8_lossy(expected)
    );
}

/// Blocks until the peer closes: `read` returns 0 (or a reset).
/// Returns the time it took.
pub fn wait_closed(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("waiting for close: {e}"),
        }
    }
}

/// The reply prefix mode gives for `content`.
pub fn said(content: &[u8]) -> Vec<u8> {
    let mut v = b"you said: ".to_vec();
    v.extend_from_slice(content);
    v.extend_from_slice(b"!\n");
    v
}

/// Raises this test process's soft open-file limit to the hard limit.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).expect("raise RLIMIT_NOFILE")
}

/// A command that runs echoloop with its open-file limit (soft and hard)
/// set to `nofile`.
pub fn with_nofile(nofile: u64) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_echoloop"));
    // SAFETY: between fork and exec the closure only calls setrlimit(2),
    // which is async-signal-safe, allocates nothing and touches no memory
    // of the parent.
    unsafe {
        cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
    }
    cmd
}

/// Lowers the open-file limit (soft and hard) of the running process
/// `pid`, one of our children.
pub fn lower_nofile_of(pid: u32, nofile: u64) {
    rlimit::prlimit(
        pid as rlimit::pid_t,
        rlimit::Resource::NOFILE,
        Some((nofile, nofile)),
        None,
    )
    .expect("prlimit on our own child");
}

/// Clock ticks per second, the unit of the times in /proc/PID/stat.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf(3) only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).expect("sysconf(_SC_CLK_TCK)")
}
