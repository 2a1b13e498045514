//! The checks behind echoloop's fuzz targets, one module per parser.
//!
//! Each `fuzz_targets/*.rs` is one line that hands libFuzzer's input to a
//! `check_*` function here, which panics when the parser breaks its
//! contract. The root crate's `tests/fuzz_corpus.rs` includes this file with
//! `#[path]` and replays every checked-in input through the same functions,
//! so the checks (not just "no panic") run in `cargo test` on stable. For
//! that reason the modules refer to each other with `super::`, never
//! `crate::`, and use only crates the root crate also depends on.

pub mod alloc;
pub mod connection;
pub mod framing;
pub mod handover;
pub mod metrics_request;
pub mod model;
pub mod prefixes;
pub mod proxy;
pub mod recipe;
