//! What a process's `/proc` files say: its CPU time, resident memory,
//! open descriptors and context switches, and the machine's CPU times and
//! load average. One reader for the load generator and the c10k bench; CPU
//! ticks are converted with the clock tick the system reports (AT_CLKTCK,
//! what `sysconf(_SC_CLK_TCK)` answers), not an assumed 100 Hz.

use std::fs;
use std::io;

/// Clock ticks per second of the times in `/proc/PID/stat` and `/proc/stat`.
pub fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second()
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unreadable {what}"))
}

/// CPU time (user + system) the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks() as f64)
        .ok_or_else(|| invalid("/proc/PID/stat"))
}

/// utime + stime in ticks from the text of /proc/PID/stat. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted
/// after the last `)`: field 3 (state) is first there, utime is field 14
/// and stime field 15.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The value of a `Name:   123 ...` line of a /proc status file.
fn status_field(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resident memory of the process in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status_field(&status, "VmRSS")
        .map(|kb| kb * 1024)
        .ok_or_else(|| invalid("VmRSS in /proc/PID/status"))
}

/// Context switches (voluntary + involuntary) summed over all threads of
/// the process: each is a wake-up or a preemption.
pub fn context_switches(pid: u32) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("status");
        // A thread may exit between listing and reading: skip it.
        let Ok(status) = fs::read_to_string(path) else {
            continue;
        };
        total += status_field(&status, "voluntary_ctxt_switches").unwrap_or(0);
        total += status_field(&status, "nonvoluntary_ctxt_switches").unwrap_or(0);
    }
    Ok(total)
}

/// Open file descriptors of the process (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The machine's CPU time over all cores since boot, in ticks: (all,
/// idle), idle counting iowait, from the `cpu` line of `/proc/stat`.
pub fn system_cpu_ticks() -> io::Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat")?;
    parse_system_cpu(&stat).ok_or_else(|| invalid("/proc/stat"))
}

/// (all, idle) from the text of `/proc/stat`: the first line is
/// `cpu user nice system idle iowait irq softirq steal ...`.
fn parse_system_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((fields.iter().sum(), idle))
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> io::Result<f64> {
    let text = fs::read_to_string("/proc/loadavg")?;
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| invalid("/proc/loadavg"))
}

/// Does a process with this id exist (and can we read it)?
pub fn process_exists(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}/stat")).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_name() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 9 1 1";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
    }

    #[test]
    fn parses_status_fields() {
        let s = "Name:\tx\nVmRSS:\t  2048 kB\nvoluntary_ctxt_switches:\t5\nnonvoluntary_ctxt_switches:\t2\n";
        assert_eq!(status_field(s, "VmRSS"), Some(2048));
        assert_eq!(status_field(s, "voluntary_ctxt_switches"), Some(5));
        assert_eq!(status_field(s, "nonvoluntary_ctxt_switches"), Some(2));
    }

    #[test]
    fn parses_system_cpu_line() {
        let s = "cpu  10 1 5 100 4 0 2 0 0 0\ncpu0 1 1 1 1 1 1 1 1 1 1\n";
        assert_eq!(parse_system_cpu(s), Some((122, 104)));
        assert_eq!(parse_system_cpu("intr 1 2\n"), None);
    }

    #[test]
    fn reads_own_process_and_the_machine() {
        let me = std::process::id();
        assert!(process_exists(me));
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(context_switches(me).unwrap() > 0);
        assert!(open_fds(me).unwrap() >= 3);
        let (all, idle) = system_cpu_ticks().unwrap();
        assert!(all >= idle && all > 0);
        assert!(load_average().unwrap() >= 0.0);
        // The kernel's USER_HZ: 100 on every common Linux build.
        assert!((1..=10_000).contains(&clock_ticks()));
    }
}
