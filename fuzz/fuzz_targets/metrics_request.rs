//! Fuzz target `metrics_request`: Arbitrary bytes as the input of a `/metrics` connection.
//! The checks are in `src/metrics_request.rs` (`check_request`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::metrics_request::check_request(input));
