//! Fuzz target `handover_valid`: Hand-overs built from a recipe, encoded, then decoded.
//! The checks are in `src/handover.rs` (`check_valid`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::handover::check_valid(input));
