//! Fuzz target `connection`: A script of reads, writes, time and shutdown played against one connection.
//! The checks are in `src/connection.rs` (`check_connection`).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| echoloop_fuzz::connection::check_connection(input));
