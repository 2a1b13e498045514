//! `--pid-file`: the pid of the process that serves, written atomically
//! once it serves, and removed by that process when it stops serving.
//!
//! Written to a temporary file beside it and renamed over it, so a reader
//! sees the old pid or the new one, never a partial file. After a live
//! upgrade the new process writes its own pid; the old one leaves the file
//! alone. A process removes the file only while it still holds its pid.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Writes this process's pid to `path`, atomically.
pub fn write(path: &Path) -> io::Result<()> {
    let pid = std::process::id();
    let tmp = temporary(path, pid);
    fs::write(&tmp, format!("{pid}\n"))?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Removes `path` if it holds this process's pid.
pub fn remove(path: &Path) -> io::Result<()> {
    let ours = format!("{}\n", std::process::id());
    match fs::read_to_string(path) {
        Ok(held) if held == ours => fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `.<name>.<pid>.tmp` in the same directory (a rename across file
/// systems would not be atomic).
fn temporary(path: &Path, pid: u32) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{pid}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_with_our_pid_and_removed_only_while_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echoloop.pid");
        write(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        fs::write(&path, "1\n").unwrap();
        remove(&path).unwrap();
        assert!(path.exists(), "another process's pid file is left alone");
        write(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
    }
}
