//! A counting global allocator: bytes live and their peak, per thread, while counting is on.
//!
//! A test binary installs it with `#[global_allocator]`; counters are thread-local, so tests
//! running in parallel threads of the same binary do not blur each other's figures (memory that
//! one thread frees for another is not counted, which no measured code here does).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator: `System`, plus per-thread counting.
pub struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the allocator may run while thread-locals are torn down.
    let _ = ON.try_with(|on| {
        if on.get() {
            let live = LIVE.get() + delta;
            LIVE.set(live);
            if live > PEAK.get() {
                PEAK.set(live);
            }
        }
    });
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches only const-initialised
// thread-local `Cell`s, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Start counting on this thread, from zero.
pub fn start() {
    LIVE.set(0);
    PEAK.set(0);
    ON.set(true);
}

/// Stop counting on this thread.
pub fn stop() {
    ON.set(false);
}

/// Bytes allocated and not freed on this thread since [`start`].
pub fn live() -> isize {
    LIVE.get()
}

/// The most [`live`] has been since [`start`].
pub fn peak() -> isize {
    PEAK.get()
}

/// Run `f` with counting on; return its result and the peak of bytes live while it ran.
#[allow(dead_code)]
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    start();
    let r = f();
    stop();
    (r, usize::try_from(peak()).unwrap_or(0))
}
