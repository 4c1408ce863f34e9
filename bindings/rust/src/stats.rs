use std::mem::MaybeUninit;

use crate::ffi;

/// Process-wide figures of zkmem, from [`stats()`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes of blocks handed out and not freed.
    pub bytes_live: usize,
    /// Bytes of memory spans in use or cached, not yet returned to the OS.
    pub bytes_committed: usize,
    /// Bytes returned to the OS so far.
    pub bytes_purged: usize,
    /// Bytes asked to be backed by huge pages.
    pub bytes_huge_pages: usize,
    /// Segments mapped now.
    pub segments_mapped: usize,
    /// Bytes mapped now.
    pub bytes_mapped: usize,
    /// Of `segments_mapped`, the mappings of live huge blocks (one each).
    pub huge_segments_mapped: usize,
    /// Of `bytes_mapped`, those of live huge blocks.
    pub bytes_mapped_huge: usize,
    /// Resident set size of the process.
    pub rss: usize,
    /// Peak resident set size of the process.
    pub peak_rss: usize,
    /// `bytes_committed / bytes_live`.
    pub fragmentation: f64,
    /// Blocks above the size classes (a span each) allocated so far.
    pub large_allocations: u64,
    /// Of those, live now.
    pub large_live: u64,
    /// Blocks with a mapping of their own allocated so far.
    pub huge_allocations: u64,
    /// Of those, live now.
    pub huge_live: u64,
}

/// zkmem's figures for the whole process: every thread, heap and pool.
///
/// Other threads' counters are read as of their last slow path, so the
/// figures are exact when those threads are quiet.
pub fn stats() -> Stats {
    let mut raw = MaybeUninit::<ffi::zk_stats_t>::uninit();
    // Safety: zk_stats_get fills in every field.
    let raw = unsafe {
        ffi::zk_stats_get(raw.as_mut_ptr());
        raw.assume_init()
    };
    Stats {
        bytes_live: raw.bytes_live,
        bytes_committed: raw.bytes_committed,
        bytes_purged: raw.bytes_purged,
        bytes_huge_pages: raw.bytes_huge_pages,
        segments_mapped: raw.segments_mapped,
        bytes_mapped: raw.bytes_mapped,
        huge_segments_mapped: raw.huge_segments_mapped,
        bytes_mapped_huge: raw.bytes_mapped_huge,
        rss: raw.rss,
        peak_rss: raw.peak_rss,
        fragmentation: raw.fragmentation,
        large_allocations: raw.large_allocations,
        large_live: raw.large_live,
        huge_allocations: raw.huge_allocations,
        huge_live: raw.huge_live,
    }
}

/// The calling thread gives the free blocks it keeps cached back to their
/// pages, for the default heap and every task heap it used: a worker about
/// to sleep calls it, so that heaps' limits and statistics see only live
/// blocks, and empty pages can go back to the OS.
pub fn thread_idle() {
    unsafe { ffi::zk_thread_idle() }
}

/// Returns free memory to the OS: all of it with `force`, else what has
/// been free longer than the purge delay (`ZKMEM_PURGE_DELAY_MS`, 1 s by
/// default), as zkmem does by itself from time to time.
pub fn collect(force: bool) {
    unsafe { ffi::zk_collect(force) }
}
