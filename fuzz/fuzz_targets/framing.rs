//! Fuzz target `framing`: Arbitrary bytes through the real line framer, split arbitrarily into reads.
//! The checks are in `src/framing.rs` (`check_framing`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::framing::check_framing(input));
