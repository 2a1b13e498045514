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

// ----- live upgrade (SIGUSR2) ----------------------------------------------

/// What a successful hand-over logged, checked against both sides' lines:
/// the old process's `upgrade: N listeners and M connections handed to pid
/// P` and the new one's `upgrade: took over N listeners and M connections
/// from pid P`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handover {
    pub listeners: usize,
    pub connections: usize,
    pub from: u32,
    pub to: u32,
}

/// A server started from its own copy of the binary, in a fresh directory,
/// with `--pid-file` there: an upgrade runs whatever that path then holds,
/// so a test breaks an upgrade by replacing the file.
///
/// After an upgrade the serving process is no longer our child. When
/// dropped, every process the pid file ever named is killed (SIGKILL) if it
/// still runs our copy of the binary; nothing else is touched.
pub struct Upgradable {
    /// The process we started, its startup lines and the log of every
    /// process after it (they inherit its stderr).
    pub server: Server,
    pub exe: std::path::PathBuf,
    pub pid_file: std::path::PathBuf,
    /// Every pid read from the pid file.
    named: Mutex<Vec<u32>>,
    dir: tempfile::TempDir,
}

impl Upgradable {
    /// Starts `echoloop --listen 127.0.0.1:0 <args> --pid-file PATH`.
    pub fn start(args: &[&str]) -> Upgradable {
        let mut full = vec!["--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Upgradable::start_with(|_| {}, &full, 1)
    }

    /// Starts `echoloop <args> --pid-file PATH` from a copy of the binary,
    /// after `setup` has adjusted the command (environment, limits), waits
    /// for `lines` startup lines and for the pid file to name it.
    pub fn start_with(setup: impl FnOnce(&mut Command), args: &[&str], lines: usize) -> Upgradable {
        let dir = tempfile::Builder::new()
            .prefix("echoloop-upgrade-")
            .tempdir()
            .expect("create temp dir");
        let exe = dir.path().join("echoloop");
        install_executable(
            &exe,
            &std::fs::read(env!("CARGO_BIN_EXE_echoloop")).unwrap(),
        );
        let pid_file = dir.path().join("echoloop.pid");
        let mut full = args.to_vec();
        let pid_arg = pid_file.to_str().unwrap().to_owned();
        full.extend_from_slice(&["--pid-file", &pid_arg]);
        let mut cmd = Command::new(&exe);
        only_standard_fds(&mut cmd);
        setup(&mut cmd);
        let server = Server::start_cmd(cmd, &full, lines);
        let up = Upgradable {
            server,
            exe,
            pid_file,
            named: Mutex::new(Vec::new()),
            dir,
        };
        let pid = up.server.pid();
        up.wait_until(Duration::from_secs(5), "the pid file", |_| {
            up.pid_file_pid() == Some(pid)
        });
        up
    }

    /// The pid the pid file names, if it exists. Panics if it holds
    /// anything but `<pid>\n` (it is written whole, by a rename).
    pub fn pid_file_pid(&self) -> Option<u32> {
        let pid = read_pid_file(&self.pid_file).unwrap_or_else(|e| panic!("{e}"))?;
        let mut named = self.named.lock().unwrap();
        if !named.contains(&pid) {
            named.push(pid);
        }
        Some(pid)
    }

    /// The pid of the process serving now, as the pid file names it.
    pub fn serving(&self) -> u32 {
        self.pid_file_pid()
            .unwrap_or_else(|| panic!("no pid file; log:\n{}", self.server.stderr()))
    }

    /// Sends `sig` to the process serving now.
    pub fn signal(&self, sig: i32) {
        signal_pid(self.serving(), sig);
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }

    /// Waits until `pred` holds, or panics after `within` showing the log.
    pub fn wait_until(
        &self,
        within: Duration,
        what: &str,
        mut pred: impl FnMut(&Upgradable) -> bool,
    ) {
        let start = Instant::now();
        while !pred(self) {
            assert!(
                start.elapsed() < within,
                "timed out waiting for {what}; log:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process we started to exit; its status code. Panics
    /// after `within`, showing the log.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.server.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < within,
                "pid {} did not exit; log:\n{}",
                self.server.pid(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads from `c` until EOF; panics on an error, showing the log.
    pub fn read_to_eof(&self, c: &mut TcpStream) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = c.read_to_end(&mut buf) {
            panic!(
                "read to EOF: {e} after {:?}; log:\n{}",
                String::from_utf8_lossy(&buf),
                self.stderr()
            );
        }
        buf
    }

    /// Sends SIGUSR2 to the serving process and waits until the hand-over
    /// is done: both sides logged it, the pid file names the new process,
    /// the old one exited (with status 0, when it is our child) and did not
    /// remove the pid file on its way out.
    pub fn upgrade(&mut self) -> Handover {
        let from = self.serving();
        let done = handovers(&self.stderr()).len();
        signal_pid(from, libc::SIGUSR2);
        let within = Duration::from_secs(10);
        self.wait_until(within, "the old process's hand-over line", |u| {
            handovers(&u.stderr()).len() > done
        });
        let (listeners, connections, to) = handovers(&self.stderr())[done];
        self.wait_until(within, "the new process's take-over line", |u| {
            takeovers(&u.stderr()).contains(&(listeners, connections, from))
        });
        self.wait_until(within, "the pid file to name the new process", |_| {
            self.pid_file_pid() == Some(to)
        });
        let log = self.stderr();
        assert!(
            log.contains(&format!("upgrade: starting {}", self.exe.display())),
            "no `upgrade: starting {}` line:\n{log}",
            self.exe.display()
        );
        if from == self.server.pid() {
            let status = self.wait_exit(within);
            assert_eq!(
                status,
                Some(0),
                "old process's exit status; log:\n{}",
                self.stderr()
            );
        } else {
            self.wait_until(within, "the old process to exit", |_| !alive(from));
        }
        assert_eq!(
            self.pid_file_pid(),
            Some(to),
            "the old process touched the pid file after handing over"
        );
        Handover {
            listeners,
            connections,
            from,
            to,
        }
    }

    /// Replaces the binary upgrades run (by a rename, as a package manager
    /// would) with `contents`, executable.
    pub fn replace_exe(&self, contents: &[u8]) {
        let next = self.dir.path().join("echoloop.next");
        install_executable(&next, contents);
        std::fs::rename(&next, &self.exe).expect("rename over the binary");
    }

    /// Puts the real binary back.
    pub fn restore_exe(&self) {
        self.replace_exe(&std::fs::read(env!("CARGO_BIN_EXE_echoloop")).unwrap());
    }

    pub fn remove_exe(&self) {
        std::fs::remove_file(&self.exe).expect("remove the binary");
    }

    /// Installs `contents`, executable, as `name` in this server's
    /// directory (so that the guards know a process running it for ours);
    /// its path.
    pub fn install_beside(&self, name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        install_executable(&path, contents);
        path
    }

    /// Whether `pid` is running a binary from this server's directory (our
    /// copy, or the copy an upgrade replaced).
    fn runs_our_binary(&self, pid: u32) -> bool {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|exe| exe.starts_with(self.dir.path()))
    }
}

impl Drop for Upgradable {
    fn drop(&mut self) {
        let mut named = std::mem::take(&mut *self.named.lock().unwrap());
        named.extend(read_pid_file(&self.pid_file).ok().flatten());
        for pid in named {
            if pid != self.server.pid() && self.runs_our_binary(pid) {
                signal_pid(pid, libc::SIGKILL);
            }
        }
    }
}

/// The pid a pid file names: `Ok(None)` if there is no such file, an error
/// if it holds anything but `<pid>\n`.
fn read_pid_file(path: &std::path::Path) -> Result<Option<u32>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    match text.strip_suffix('\n').map(str::parse::<u32>) {
        Some(Ok(pid)) => Ok(Some(pid)),
        _ => Err(format!("the pid file holds {text:?}, not \"<pid>\\n\"")),
    }
}

/// Writes `contents` to `path`, mode 755. A child process writes it: a
/// descriptor open for writing here could leak into a process another test
/// thread is forking at that moment, and while it lives, running the file
/// fails with "text file busy".
fn install_executable(path: &std::path::Path, contents: &[u8]) {
    let mut sh = Command::new("sh")
        .args(["-c", r#"cat > "$0" && chmod 755 "$0""#])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run sh");
    sh.stdin.take().unwrap().write_all(contents).unwrap();
    assert!(sh.wait().unwrap().success(), "install {}", path.display());
}

/// Starts what `cmd` runs with only stdin, stdout and stderr open, not
/// with the descriptors the test harness leaves open across exec (cargo's
/// jobserver pipe), so that descriptor counts say what the server opened.
fn only_standard_fds(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls close_range(2),
    // which is async-signal-safe; CLOSE_RANGE_CLOEXEC leaves the
    // descriptors open until the exec, which std's own report pipe needs.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `sig` to `pid` (ours, or one a pid file of ours named).
pub fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects on this process.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The log's messages: each line without env_logger's `[time LEVEL target] `.
pub fn messages(log: &str) -> impl Iterator<Item = &str> {
    log.lines()
        .map(|l| l.split_once("] ").map_or(l, |(_, msg)| msg))
}

/// `N listener(s) and M connection(s) <rest>` → (N, M, rest).
fn counts(text: &str) -> Option<(usize, usize, &str)> {
    let mut words = text.splitn(6, ' ');
    let n = words.next()?.parse().ok()?;
    words.next().filter(|w| w.starts_with("listener"))?;
    words.next().filter(|w| *w == "and")?;
    let m = words.next()?.parse().ok()?;
    words.next().filter(|w| w.starts_with("connection"))?;
    Some((n, m, words.next()?))
}

/// Every `upgrade: N listeners and M connections handed to pid P` line, in
/// order: (N, M, P).
pub fn handovers(log: &str) -> Vec<(usize, usize, u32)> {
    messages(log)
        .filter_map(|m| {
            let (n, c, rest) = counts(m.strip_prefix("upgrade: ")?)?;
            Some((n, c, rest.strip_prefix("handed to pid ")?.parse().ok()?))
        })
        .collect()
}

/// Every `upgrade: took over N listeners and M connections from pid P`
/// line, in order: (N, M, P).
pub fn takeovers(log: &str) -> Vec<(usize, usize, u32)> {
    messages(log)
        .filter_map(|m| {
            let (n, c, rest) = counts(m.strip_prefix("upgrade: took over ")?)?;
            Some((n, c, rest.strip_prefix("from pid ")?.parse().ok()?))
        })
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'))
}

/// The live children of `pid` (read from every process's /proc stat).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // After the `)`: state, then the parent's pid.
        let mut fields = stat[stat.rfind(')').unwrap() + 2..].split_whitespace();
        let state = fields.next();
        if fields.next() == Some(pid.to_string().as_str()) && state != Some("Z") {
            kids.push(child);
        }
    }
    kids
}

/// What each open descriptor of `pid` points at (`socket:[123]`, a path…),
/// by descriptor number.
pub fn fd_targets(pid: u32) -> Vec<(u32, String)> {
    let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

/// One TCP socket of this network namespace, as /proc/net/tcp{,6} shows it.
#[derive(Clone, Debug)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Bytes received that its owner has not read yet.
    pub rx_queue: u64,
    pub inode: u64,
}

/// Every TCP socket of this network namespace.
pub fn tcp_sockets() -> Vec<TcpEntry> {
    let mut all = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote)) = (proc_net_addr(f[1]), proc_net_addr(f[2])) else {
                continue;
            };
            let rx_queue = u64::from_str_radix(f[4].split_once(':').unwrap().1, 16).unwrap();
            all.push(TcpEntry {
                local,
                remote,
                rx_queue,
                inode: f[9].parse().unwrap(),
            });
        }
    }
    all
}

/// `0100007F:1F90` (the address as the kernel's 32-bit words in host
/// order, the port in hex) → `127.0.0.1:8080`.
fn proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in (0..ip.len()).step_by(8) {
        let w = u32::from_str_radix(ip.get(word..word + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The server's end of the client connection `c`.
pub fn server_end(c: &TcpStream) -> Option<TcpEntry> {
    let (ours, theirs) = (c.local_addr().ok()?, c.peer_addr().ok()?);
    tcp_sockets()
        .into_iter()
        .find(|e| e.local == theirs && e.remote == ours)
}

/// Waits until the server has read everything `c` sent (its end's receive
/// queue is empty), so what was sent is in the server's own buffers.
pub fn wait_read_by_server(server: &Server, c: &TcpStream) {
    server.wait_until(
        Duration::from_secs(5),
        "the server to read what we sent",
        |_| server_end(c).is_some_and(|e| e.rx_queue == 0),
    );
}

// ----- metrics ---------------------------------------------------------------

/// Sends `request` to the metrics address and returns the whole answer.
pub fn http(addr: SocketAddr, request: &str) -> String {
    let mut c = connect(addr);
    c.write_all(request.as_bytes()).unwrap();
    String::from_utf8(read_to_eof(&mut c)).unwrap()
}

/// `GET path` from the metrics address; the whole answer.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
}

/// The value of the metric `name` on a metrics page.
pub fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in:\n{page}"))
        .trim()
        .parse()
        .unwrap()
}

/// Sets the open-file limit (soft and hard) of what `cmd` starts.
pub fn limit_nofile(cmd: &mut Command, nofile: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls setrlimit(2),
    // which is async-signal-safe, allocates nothing and touches no memory
    // of the parent.
    unsafe {
        cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
    }
}
