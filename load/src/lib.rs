//! The part of `echoloop-load` other programs may use: the `/proc` reader
//! the load generator samples the server with, shared with the c10k bench
//! so both read CPU time, memory and descriptors the same way. The load
//! generator itself is the `echoloop-load` binary (`src/main.rs`).

pub mod procfs;
