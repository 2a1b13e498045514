//! Fuzz target `handover`: Arbitrary bytes as the live-upgrade hand-over a new process reads.
//! The checks are in `src/handover.rs` (`check_handover`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::handover::check_handover(input));
