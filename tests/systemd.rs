//! systemd integration, black-box against the real binary: socket
//! activation (`LISTEN_PID`/`LISTEN_FDS`, the socket on fd 3) and readiness
//! notification (`READY=1` and `STOPPING=1` datagrams to `NOTIFY_SOCKET`).
//!
//! The activated process is started through
//! `sh -c 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"'` so that `LISTEN_PID`
//! names the pid echoloop runs as, exactly as systemd sets it.

mod common;

use common::*;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// `program` with `RUST_LOG=debug` and none of the systemd variables the
/// test process itself may have inherited.
fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("RUST_LOG", "debug");
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A command that runs echoloop with `listener` as its fd 3, `LISTEN_FDS=1`
/// and `LISTEN_PID` set to the pid echoloop itself will run as (`sh`
/// execs it, keeping the pid).
fn activated(listener: &impl AsRawFd, args: &[&str]) -> Command {
    let mut cmd = command("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_echoloop"))
        .args(args);
    with_fd3(&mut cmd, listener);
    cmd
}

/// Makes `listener` the child's fd 3, open across exec.
fn with_fd3(cmd: &mut Command, listener: &impl AsRawFd) {
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and
    // exec, on a descriptor that stays open in the parent until spawn
    // returns.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself would keep FD_CLOEXEC: clear it.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A fresh directory for a `NOTIFY_SOCKET`, removed again when dropped.
fn temp_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("echoloop-{what}-"))
        .tempdir()
        .expect("create temp dir")
}

/// Receives datagrams until one contains `wanted`; returns every datagram
/// seen. Panics after `within`.
fn recv_until(
    sock: &UnixDatagram,
    wanted: &str,
    within: Duration,
    seen: &mut Vec<String>,
    daemon: &mut Server,
) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "no datagram with {wanted:?} within {within:?}; got {seen:?}; \
             echoloop exit status {:?}; stderr:\n{}",
            daemon.child.try_wait(),
            daemon.stderr()
        );
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = msg.lines().any(|l| l == wanted);
                seen.push(msg);
                if found {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv on NOTIFY_SOCKET: {e}"),
        }
    }
}

#[test]
fn serves_on_the_socket_systemd_passes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let daemon = Server::start_cmd(activated(&listener, &[]), &[], 1);
    // From here on only echoloop holds the socket: if it had not taken it,
    // connections would be refused.
    drop(listener);
    assert_eq!(
        daemon.addr(),
        addr,
        "the startup line must name the inherited socket; stderr:\n{}",
        daemon.stderr()
    );
    for _ in 0..3 {
        let mut c = connect(addr);
        exchange(&mut c, b"x\n", &said(b"x"));
    }
}

#[test]
fn activation_for_another_pid_is_ignored() {
    // sd_listen_fds(3): when LISTEN_PID names another process the variables
    // were not meant for this one, so `--listen` is bound as usual.
    let decoy = TcpListener::bind("127.0.0.1:0").unwrap();
    let decoy_addr = decoy.local_addr().unwrap();
    let mut cmd = command(env!("CARGO_BIN_EXE_echoloop"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1");
    with_fd3(&mut cmd, &decoy);
    let daemon = Server::start_cmd(cmd, &[], 1);
    drop(decoy);
    assert_ne!(daemon.addr(), decoy_addr, "took a socket meant for pid 1");
    let mut c = connect(daemon.addr());
    exchange(&mut c, b"x\n", &said(b"x"));
}

#[test]
fn notifies_ready_and_stopping() {
    let dir = temp_dir("notify");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    let mut cmd = command(env!("CARGO_BIN_EXE_echoloop"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path);
    let mut daemon = Server::start_cmd(cmd, &[], 1);

    let mut seen = Vec::new();
    recv_until(
        &sock,
        "READY=1",
        Duration::from_secs(10),
        &mut seen,
        &mut daemon,
    );
    assert!(
        !seen.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING before READY: {seen:?}"
    );
    // Ready means listening.
    let mut c = connect(daemon.addr());
    exchange(&mut c, b"ready?\n", &said(b"ready?"));
    drop(c);

    daemon.signal(libc::SIGTERM);
    let mut after = Vec::new();
    recv_until(
        &sock,
        "STOPPING=1",
        Duration::from_secs(10),
        &mut after,
        &mut daemon,
    );
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "stderr:\n{}",
        daemon.stderr()
    );
}

#[test]
fn activated_and_notifying_together() {
    // What the contrib units do: the socket comes from systemd and the
    // service is Type=notify.
    let dir = temp_dir("notify-activated");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cmd = activated(&listener, &[]);
    cmd.env("NOTIFY_SOCKET", &path);
    let mut daemon = Server::start_cmd(cmd, &[], 1);
    drop(listener);
    assert_eq!(daemon.addr(), addr);

    let mut seen = Vec::new();
    recv_until(
        &sock,
        "READY=1",
        Duration::from_secs(10),
        &mut seen,
        &mut daemon,
    );
    let mut c = connect(addr);
    exchange(&mut c, b"x\n", &said(b"x"));

    daemon.signal(libc::SIGTERM);
    recv_until(
        &sock,
        "STOPPING=1",
        Duration::from_secs(10),
        &mut seen,
        &mut daemon,
    );
    // The open, quiet client is closed by the shutdown.
    wait_closed(&mut c);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn listen_is_ignored_under_activation_with_a_warning() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let daemon = Server::start_cmd(activated(&listener, &["--listen", "127.0.0.1:0"]), &[], 1);
    drop(listener);
    assert_eq!(daemon.addr(), addr, "{}", daemon.stderr());
    // The log is read on a thread of its own: wait for the line.
    let warned = |s: &Server| {
        s.stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("--listen 127.0.0.1:0 ignored"))
    };
    daemon.wait_until(
        Duration::from_secs(5),
        "the ignored --listen warning",
        warned,
    );
    // Without --listen on the command line there is nothing to warn about.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let quiet = Server::start_cmd(activated(&listener, &[]), &[], 1);
    drop(listener);
    exchange(&mut connect(quiet.addr()), b"x\n", &said(b"x"));
    assert!(!quiet.stderr().contains("ignored"), "{}", quiet.stderr());
}

#[test]
fn a_passed_socket_that_is_not_a_stream_exits_1_naming_it() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = activated(&udp, &[]).output().expect("run echoloop");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let failures: Vec<&str> = err.lines().filter(|l| l.contains("systemd")).collect();
    assert_eq!(
        failures,
        [
            "echoloop: cannot use the sockets systemd passed (LISTEN_FDS): \
          inherited fd 3 is not a stream socket"
        ],
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

// ----- live upgrade (SIGUSR2) ------------------------------------------------

/// A `NOTIFY_SOCKET` that learns each sender's pid (`SO_PASSCRED`), as
/// systemd's does to tell the main process from others (`NotifyAccess=`).
fn notify_socket_with_pids(path: &std::path::Path) -> UnixDatagram {
    let sock = UnixDatagram::bind(path).expect("bind NOTIFY_SOCKET");
    let on: libc::c_int = 1;
    // SAFETY: setsockopt(2) reads `on` for the given length, and nothing else.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_PASSCRED: {}", std::io::Error::last_os_error());
    sock
}

/// One datagram and the pid of the process that sent it, or `None` when
/// nothing came within `timeout`.
fn recv_with_pid(sock: &UnixDatagram, timeout: Duration) -> Option<(String, u32)> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    // Room for one SCM_CREDENTIALS message, aligned for cmsghdr.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg(2) writes only into `buf` and `control`, whose
    // lengths `msg` states, and both outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted => return None,
            _ => panic!("recvmsg on NOTIFY_SOCKET: {e}"),
        }
    }
    let mut pid = None;
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in,
    // within the length it set; SCM_CREDENTIALS data is a `ucred`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
            {
                let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                pid = Some(cred.pid as u32);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
    Some((text, pid.expect("no sender credentials on the datagram")))
}

/// Receives datagrams until one from `pid` has the line `wanted`; returns
/// the ones seen, with their senders. Panics after 10 s.
fn recv_from_until(
    sock: &UnixDatagram,
    wanted: &str,
    pid: u32,
    up: &Upgradable,
) -> Vec<(String, u32)> {
    let within = Duration::from_secs(10);
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = within.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "no {wanted:?} from pid {pid} within {within:?}; got {seen:?}; log:\n{}",
            up.stderr()
        );
        if let Some((msg, from)) = recv_with_pid(sock, left) {
            let found = from == pid && msg.lines().any(|l| l == wanted);
            seen.push((msg, from));
            if found {
                return seen;
            }
        }
    }
}

/// CLOCK_MONOTONIC now, in microseconds, as `MONOTONIC_USEC=` counts it.
fn monotonic_usec() -> u64 {
    // SAFETY: clock_gettime(2) writes only the timespec it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Checks that a `RELOADING=1` from `pid` came before the last datagram of
/// `seen`, with a `MONOTONIC_USEC=` of about now in the same datagram, as
/// `Type=notify-reload` requires.
fn assert_reloading_from(seen: &[(String, u32)], pid: u32) {
    let (reloading, _) = seen[..seen.len() - 1]
        .iter()
        .find(|(msg, from)| *from == pid && msg.lines().any(|l| l == "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 from pid {pid} before READY=1: {seen:?}"));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"))
        .parse()
        .expect("MONOTONIC_USEC= a number");
    let now = monotonic_usec();
    assert!(
        usec <= now && now - usec < 30_000_000,
        "MONOTONIC_USEC={usec} is not a recent CLOCK_MONOTONIC time (now {now})"
    );
}

#[test]
fn an_upgrade_notifies_reloading_then_the_new_main_pid_and_ready() {
    let dir = temp_dir("notify-upgrade");
    let path = dir.path().join("notify.sock");
    let sock = notify_socket_with_pids(&path);
    let mut up = Upgradable::start_with(
        |cmd| {
            for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                cmd.env_remove(var);
            }
            cmd.env("NOTIFY_SOCKET", &path);
        },
        &["--listen", "127.0.0.1:0"],
        1,
    );
    let first = up.server.pid();
    recv_from_until(&sock, "READY=1", first, &up);
    let mut c = up.server.connect();
    exchange(&mut c, b"x\n", &said(b"x"));

    let h = up.upgrade();
    let seen = recv_from_until(&sock, "READY=1", h.to, &up);
    assert_reloading_from(&seen, first);
    let main_pid = format!("MAINPID={}", h.to);
    let told = seen
        .iter()
        .position(|(msg, from)| *from == h.to && msg.lines().any(|l| l == main_pid))
        .unwrap_or_else(|| panic!("no {main_pid} from the new process: {seen:?}"));
    let ready = seen.len() - 1;
    assert!(told <= ready, "{main_pid} after READY=1: {seen:?}");
    assert!(
        !seen.iter().any(|(msg, _)| msg.contains("STOPPING=1")),
        "an upgrade is no stop: {seen:?}"
    );
    exchange(&mut c, b"y\n", &said(b"y"));

    // A failed upgrade is a reload that ended: ready again, same main pid.
    up.remove_exe();
    up.signal(libc::SIGUSR2);
    let seen = recv_from_until(&sock, "READY=1", h.to, &up);
    assert_reloading_from(&seen, h.to);
    up.server
        .wait_until(Duration::from_secs(5), "the upgrade failure", |s| {
            s.stderr().contains("upgrade failed: ")
        });
    assert!(
        !seen.iter().any(|(msg, _)| msg.contains("MAINPID=")),
        "a failed upgrade named another main pid: {seen:?}"
    );
    exchange(&mut c, b"z\n", &said(b"z"));
}
