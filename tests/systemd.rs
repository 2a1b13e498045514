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
