//! Fuzz target `proxy_valid`: Valid PROXY v1/v2 headers built by the `ppp` crate from a recipe, then client data.
//! The checks are in `src/proxy.rs` (`check_valid`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::proxy::check_valid(input));
