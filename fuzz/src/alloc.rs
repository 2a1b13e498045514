//! Counts what the code under test allocates, so that a check can bound it
//! (a decoder that trusts a length field before checking it against the
//! input shows up here, not only as an out-of-memory crash).
//!
//! This is the global allocator of every binary that includes these checks
//! (the fuzz targets, `tests/fuzz_corpus.rs`): the system allocator, with a
//! per-thread count of the bytes held and the most held since
//! [`peak_during`] started. Counting per thread keeps the test harness's
//! other threads out of a measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting.
struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

thread_local! {
    /// Bytes this thread allocated and has not freed; it goes below zero
    /// when the thread frees what another one allocated.
    static HELD: Cell<isize> = const { Cell::new(0) };
    /// The most `HELD` has been since [`peak_during`] reset it.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Adds `grown` bytes to, and takes `shrunk` bytes from, this thread's count.
fn count(grown: usize, shrunk: usize) {
    // `try_with`: no panic in the allocator while a thread is torn down.
    let _ = HELD.try_with(|held| {
        // Sizes of live blocks fit in an `isize` (a `Layout` rule).
        let now = held.get() + grown as isize - shrunk as isize;
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, layout.size());
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size, layout.size());
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f`; returns what it returned and the most bytes held at once
/// during it beyond those held before (on this thread, what `f` returns
/// included).
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = HELD.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let out = f();
    let peak = PEAK.with(Cell::get) - before;
    (out, peak.unsigned_abs())
}
