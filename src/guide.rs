//! # A guided tour of the event loop
//!
//! echoloop is small enough to read in an afternoon, and this tour is the
//! order to read it in. Each chapter explains one idea, names the exact
//! functions that carry it out (private ones as `file.rs::function`, so
//! open the source beside it), and ends with an experiment: commands to
//! run and the output you should see. The crate page is the one-page map;
//! `SPEC.md` at the root of the repository is the behaviour the code keeps.
//!
//! 1. [Readiness](readiness): edge triggering, spurious events, draining.
//! 2. [Tokens](tokens): the slab, and why a reused slot never gets its old
//!    owner's event.
//! 3. [States](states): the connection as a state machine, the diagram,
//!    and the one place the state changes.
//! 4. [Framing](framing): lines as pure code, the same replies however the
//!    bytes are split.
//! 5. [Timers](timers): the timer wheel, lazy re-arming, and when the loop
//!    sleeps.
//! 6. [Backpressure](backpressure): slow readers and firehoses.
//! 7. [Closing](closing): lingering so that the last reply is not lost.
//! 8. [The daemon](daemon): limits, signals, metrics, PROXY.
//! 9. [Costs](costs): the benchmark figures, and why they are what they
//!    are.
//!
//! ## Running the experiments
//!
//! From a checkout, build once:
//!
//! ```sh
//! cargo build --release --workspace
//! ```
//!
//! Every experiment is run from the repository root on Linux. It starts
//! its own server on a loopback port of its own (7001 and up), remembers
//! its process id (`SERVER=$!`, or `TRACER=$!` under `strace`) and stops it
//! by that id. Besides the build you need `strace`, `ss`, `nc` (the
//! OpenBSD one, for `-N`) and `python3`. The outputs shown were captured on
//! a 2-core machine shared with other work; descriptors, ports, times and
//! rates will differ on yours, the shape should not. Code samples are
//! doc tests: `cargo test --doc` runs them.

#[doc = include_str!("../docs/guide/1-readiness.md")]
pub mod readiness {}

#[doc = include_str!("../docs/guide/2-tokens.md")]
pub mod tokens {}

// The diagram is inlined as SVG between two blank lines, so that markdown
// ends the HTML block where the SVG ends.
#[doc = concat!(
    include_str!("../docs/guide/3-states.md"),
    "\n\n",
    include_str!("../docs/states.svg"),
    "\n\n",
    include_str!("../docs/guide/3-states-experiment.md"),
)]
pub mod states {}

#[doc = include_str!("../docs/guide/4-framing.md")]
pub mod framing {}

#[doc = include_str!("../docs/guide/5-timers.md")]
pub mod timers {}

#[doc = include_str!("../docs/guide/6-backpressure.md")]
pub mod backpressure {}

#[doc = include_str!("../docs/guide/7-closing.md")]
pub mod closing {}

#[doc = include_str!("../docs/guide/8-daemon.md")]
pub mod daemon {}

#[doc = include_str!("../docs/guide/9-costs.md")]
pub mod costs {}
