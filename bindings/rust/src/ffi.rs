//! The C API of include/zkmem.h, as much of it as the crate uses. The
//! structures mirror the header field by field; `tests/layout.rs` checks
//! their sizes against the C compiler's.

#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

pub const ZK_STATS_CLASSES: usize = 96;

#[repr(C)]
pub struct zk_pool_t {
    _opaque: [u8; 0],
}

#[repr(C)]
pub struct zk_heap_t {
    _opaque: [u8; 0],
}

#[repr(C)]
pub struct zk_pool_options_t {
    pub alignment: usize,
    pub preallocate: usize,
    pub name: *const c_char,
    pub max_cached: usize,
    pub constructor: Option<unsafe extern "C" fn(object: *mut c_void, arg: *mut c_void)>,
    pub constructor_arg: *mut c_void,
}

#[repr(C)]
pub struct zk_pool_stats_t {
    pub name: *const c_char,
    pub object_size: usize,
    pub slot_size: usize,
    pub allocations: u64,
    pub frees: u64,
    pub reused: u64,
    pub reuse_rate: f64,
    pub live: u64,
    pub peak_live: u64,
    pub predicted_live: u64,
    pub cached: u64,
    pub pages: u64,
    pub bytes_committed: usize,
    pub fragmentation: f64,
}

#[repr(C)]
pub struct zk_heap_options_t {
    pub name: *const c_char,
    pub limit_bytes: usize,
    pub parent: *mut zk_heap_t,
    pub on_limit:
        Option<unsafe extern "C" fn(heap: *mut zk_heap_t, size: usize, arg: *mut c_void) -> bool>,
    pub on_limit_arg: *mut c_void,
}

#[repr(C)]
pub struct zk_heap_stats_t {
    pub live_bytes: usize,
    pub peak_bytes: usize,
    pub limit_bytes: usize,
    pub allocations: u64,
    pub frees: u64,
    pub limit_refusals: u64,
    pub name: *const c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct zk_class_stats_t {
    pub block_size: usize,
    pub allocations: u64,
    pub frees: u64,
    pub live: u64,
    pub pages: u64,
}

#[repr(C)]
pub struct zk_stats_t {
    pub class_count: usize,
    pub classes: [zk_class_stats_t; ZK_STATS_CLASSES],
    pub large_allocations: u64,
    pub large_live: u64,
    pub huge_allocations: u64,
    pub huge_live: u64,
    pub bytes_live: usize,
    pub bytes_committed: usize,
    pub bytes_purged: usize,
    pub bytes_huge_pages: usize,
    pub segments_mapped: usize,
    pub bytes_mapped: usize,
    pub rss: usize,
    pub peak_rss: usize,
    pub fragmentation: f64,
    pub huge_segments_mapped: usize,
    pub bytes_mapped_huge: usize,
}

extern "C" {
    pub fn zk_malloc(size: usize) -> *mut c_void;
    pub fn zk_calloc(count: usize, size: usize) -> *mut c_void;
    pub fn zk_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    pub fn zk_aligned_alloc(alignment: usize, size: usize) -> *mut c_void;
    pub fn zk_free_sized(ptr: *mut c_void, size: usize);

    pub fn zk_pool_create(object_size: usize, options: *const zk_pool_options_t) -> *mut zk_pool_t;
    pub fn zk_pool_alloc(pool: *mut zk_pool_t) -> *mut c_void;
    pub fn zk_pool_free(pool: *mut zk_pool_t, object: *mut c_void);
    pub fn zk_pool_destroy(pool: *mut zk_pool_t);
    pub fn zk_pool_stats(pool: *const zk_pool_t, out: *mut zk_pool_stats_t) -> c_int;

    pub fn zk_heap_create(options: *const zk_heap_options_t) -> *mut zk_heap_t;
    pub fn zk_heap_calloc(heap: *mut zk_heap_t, count: usize, size: usize) -> *mut c_void;
    pub fn zk_heap_realloc(heap: *mut zk_heap_t, ptr: *mut c_void, size: usize) -> *mut c_void;
    pub fn zk_heap_aligned_alloc(
        heap: *mut zk_heap_t,
        alignment: usize,
        size: usize,
    ) -> *mut c_void;
    pub fn zk_heap_enter(heap: *mut zk_heap_t) -> *mut zk_heap_t;
    pub fn zk_heap_destroy(heap: *mut zk_heap_t);
    pub fn zk_heap_stats(heap: *const zk_heap_t, out: *mut zk_heap_stats_t) -> c_int;
    pub fn zk_thread_idle();

    pub fn zk_collect(force: bool);
    pub fn zk_stats_get(out: *mut zk_stats_t);
}
