//! Heap accounting for memory tests: a counting global allocator over the system one, and the peak of live bytes
//! while a closure runs. A test binary installs it with
//! `#[global_allocator] static GLOBAL: alignprop_testing::alloc::Counting = alignprop_testing::alloc::Counting;`
//! [`peak_during`] counts every thread's allocations (one memory test per binary, so no other test's are counted);
//! [`peak_on_this_thread_during`] counts only the calling thread's, for single-threaded code measured in a binary
//! whose other tests run in parallel.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting live bytes and their peak.
pub struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Signed: a block allocated on another thread may be freed on this one.
    static THREAD_CURRENT: Cell<isize> = const { Cell::new(0) };
    static THREAD_PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Adds `delta` to this thread's live bytes and raises its peak (silently nothing while the thread is torn down).
fn count_on_thread(delta: isize) {
    let _ = THREAD_CURRENT.try_with(|c| {
        let now = c.get() + delta;
        c.set(now);
        let _ = THREAD_PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
            count_on_thread(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        count_on_thread(-(layout.size() as isize));
    }
}

/// Peak live heap bytes above the level at the start, while `f` runs (needs [`Counting`] installed).
pub fn peak_during(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

/// Peak live heap bytes allocated by the calling thread above its level at the start, while `f` runs on it (needs
/// [`Counting`] installed). Other threads' allocations, e.g. of tests running in parallel, are not counted.
pub fn peak_on_this_thread_during(f: impl FnOnce()) -> usize {
    let base = THREAD_CURRENT.with(Cell::get);
    THREAD_PEAK.with(|p| p.set(base));
    f();
    (THREAD_PEAK.with(Cell::get) - base).max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// The calling thread's 1 MiB is counted; another thread's 8 MiB, allocated meanwhile, is not.
    #[test]
    fn thread_peak_ignores_other_threads() {
        let peak = peak_on_this_thread_during(|| {
            let other = std::thread::spawn(|| drop(std::hint::black_box(vec![0u8; 8 << 20])));
            let mine = std::hint::black_box(vec![1u8; 1 << 20]);
            other.join().unwrap();
            drop(mine);
        });
        assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&peak), "{peak}");
    }
}
