//! Fuzz target `proxy`: Arbitrary bytes as the first bytes of a `--proxy-protocol` connection.
//! The checks are in `src/proxy.rs` (`check_bytes`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::proxy::check_bytes(input));
