//! Replays every checked-in fuzz input through the checks its fuzz target
//! runs, so that `cargo test` on stable exercises them on every run, even
//! where no nightly toolchain (and so no libFuzzer) exists.
//!
//! The inputs are `fuzz/seeds/<target>/*`: the seeds, and every input a
//! fuzzing run found that broke a check (see `fuzz/README.md`). The checks
//! are the fuzz crate's own code, included from `fuzz/src/`, not a copy.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

/// What a fuzz target runs on one input; it panics if the input breaks a check.
type Check = fn(&[u8]);

/// Every fuzz target, with its check.
const TARGETS: [(&str, Check); 7] = [
    ("connection", checks::connection::check_connection),
    ("framing", checks::framing::check_framing),
    ("handover", checks::handover::check_handover),
    ("handover_valid", checks::handover::check_valid),
    ("metrics_request", checks::metrics_request::check_request),
    ("proxy", checks::proxy::check_bytes),
    ("proxy_valid", checks::proxy::check_valid),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The names in `dir`, sorted; with `strip`, only those ending in it,
/// without it.
fn names(dir: &Path, strip: Option<&str>) -> Vec<String> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut names: Vec<String> = entries
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| match strip {
            Some(suffix) => name.strip_suffix(suffix).map(str::to_owned),
            None => Some(name),
        })
        .collect();
    names.sort();
    names
}

/// Runs `check` on every input in `fuzz/seeds/<target>/`; returns how many
/// there were and the names of those that failed.
fn replay(target: &str, check: Check) -> (usize, Vec<String>) {
    let dir = fuzz_dir().join("seeds").join(target);
    let inputs = names(&dir, None);
    let failed = inputs
        .iter()
        .filter(|name| {
            let input = fs::read(dir.join(name)).unwrap();
            panic::catch_unwind(|| check(&input)).is_err()
        })
        .cloned()
        .collect();
    (inputs.len(), failed)
}

#[test]
fn every_input_passes_its_targets_checks() {
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let (count, failed) = replay(target, check);
        assert!(count > 0, "no inputs for `{target}`");
        if !failed.is_empty() {
            failures.push(format!(
                "{} of {count} `{target}` inputs: {failed:?}",
                failed.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "checks failed (panics above): {failures:#?}"
    );
}

#[test]
fn every_target_is_replayed() {
    let listed: Vec<&str> = TARGETS.iter().map(|(target, _)| *target).collect();
    let targets = names(&fuzz_dir().join("fuzz_targets"), Some(".rs"));
    assert_eq!(targets, listed, "fuzz_targets/ and TARGETS differ");
    let seeded = names(&fuzz_dir().join("seeds"), None);
    assert_eq!(seeded, listed, "seeds/ and TARGETS differ");
}

/// The split check can fail: a parser whose final answer changes as more
/// bytes arrive (here: the length read so far) is caught.
#[test]
fn a_changing_answer_is_caught() {
    let caught = panic::catch_unwind(|| {
        checks::prefixes::first_final(b"abc", |buf| (!buf.is_empty()).then_some(buf.len()))
    });
    assert!(caught.is_err());
    let steady = checks::prefixes::first_final(b"abc", |buf| (buf.len() >= 2).then_some("final"));
    assert_eq!(steady, Some((2, "final")));
}

/// The allocation bound can fail: what a call allocates counts, even when
/// it is freed before the call returns, and what was held before does not.
#[test]
fn an_allocation_is_counted() {
    let held = std::hint::black_box(vec![0u8; 1 << 20]);
    let freed = || drop(std::hint::black_box(Vec::<u8>::with_capacity(3 << 20)));
    let ((), peak) = checks::alloc::peak_during(freed);
    assert!((3 << 20..4 << 20).contains(&peak), "{peak}");
    drop(held);
}

// ----- findings -------------------------------------------------------------

/// Found by `proxy` in its first seconds (`seeds/proxy/v1-unknown-lf-without-cr`):
/// `ppp` takes a bare LF as the end of a v1 line, which the protocol does
/// not allow and echoloop refuses. The check now compares with `ppp` only
/// for CRLF lines; if `ppp` ever refuses this line too, this test says the
/// comparison can be widened again.
#[test]
fn v1_line_ending_in_a_bare_lf_is_refused_though_ppp_takes_it() {
    let line = b"PROXY UNKNOWN a b c \n";
    assert!(matches!(
        echoloop::proxy::parse(line),
        echoloop::proxy::Parsed::Invalid(_)
    ));
    assert!(ppp::v1::Header::try_from(&line[..]).is_ok());
}
