//! zkmem for Rust: a memory allocator for async runtimes and servers.
//!
//! The crate compiles zkmem's C sources into the program (a C compiler is
//! all it needs) and offers three things.
//!
//! **The global allocator.** [`ZkMem`] makes every Rust allocation of the
//! program zkmem's; the C library's `malloc` is left alone.
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: zkmem::ZkMem = zkmem::ZkMem;
//!
//! fn main() {
//!     let words: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
//!     assert_eq!(words[999], "999");
//!     assert!(zkmem::stats().bytes_live > 0);
//! }
//! ```
//!
//! **Object pools.** A [`Pool<T>`] hands out `T` slots with every freed slot
//! reused; a [`PoolBox`] is dropped on any thread.
//!
//! ```
//! struct Connection {
//!     id: u64,
//!     buffer: [u8; 256],
//! }
//!
//! let connections = zkmem::Pool::<Connection>::builder()
//!     .name("connections")
//!     .build()
//!     .unwrap();
//! let first = connections.alloc(Connection { id: 1, buffer: [0; 256] });
//! let second = connections.alloc(Connection { id: 2, buffer: [1; 256] });
//! assert_eq!(first.id + second.id, 3);
//! drop(first);
//! let third = connections.alloc(Connection { id: 3, buffer: [2; 256] });
//! assert_eq!(third.buffer[255], 2);
//! let stats = connections.stats();
//! assert_eq!((stats.allocations, stats.live, stats.reused), (3, 2, 1));
//! ```
//!
//! **Per-task heaps.** A [`Heap`] counts and limits the memory of one task
//! or request. [`Heap::scope`] enters it around every poll of a future, so
//! a Tokio task's allocations are the heap's on whichever worker runs it,
//! and a limit fails that task's allocations (`Vec::try_reserve` returns an
//! error) rather than the process. This needs [`ZkMem`] as the global
//! allocator: otherwise Rust's allocations do not go through zkmem.
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: zkmem::ZkMem = zkmem::ZkMem;
//!
//! async fn handle(size: usize) -> Result<usize, ()> {
//!     let mut body = Vec::new();
//!     body.try_reserve(size).map_err(|_| ())?;
//!     body.resize(size, 0u8);
//!     // After an await the task may resume on another worker: its
//!     // allocations still go to its heap.
//!     Ok(body.len())
//! }
//!
//! fn main() {
//!     let runtime = tokio::runtime::Builder::new_multi_thread()
//!         .worker_threads(2)
//!         .build()
//!         .unwrap();
//!     runtime.block_on(async {
//!         let mut requests = Vec::new();
//!         for size in [1000, 50_000, 5_000_000] {
//!             let heap = zkmem::Heap::with_limit(1 << 20);
//!             let task = tokio::spawn(heap.scope(handle(size)));
//!             requests.push((heap, task));
//!         }
//!         for (heap, task) in requests {
//!             let served = task.await.unwrap();
//!             let stats = heap.stats();
//!             assert_eq!(stats.live_bytes, 0); // the body went with the task
//!             match served {
//!                 Ok(size) => assert!(stats.peak_bytes >= size),
//!                 Err(()) => assert_eq!(stats.limit_refusals, 1), // 5 MB > 1 MiB
//!             }
//!         }
//!     });
//! }
//! ```
//!
//! Heaps nest ([`HeapBuilder::parent`]): a request's heap inside its
//! tenant's, counted and limited in both. [`stats()`] gives the process-wide
//! figures.

#![deny(missing_docs)]

mod ffi;
mod global;
mod heap;
mod pool;
mod stats;

pub use global::ZkMem;
pub use heap::{reclaim_heaps, EnterGuard, Heap, HeapBuilder, HeapStats, InHeap};
pub use pool::{Pool, PoolBox, PoolBuilder, PoolStats};
pub use stats::{collect, stats, thread_idle, Stats};

/// Runs `f` in the default heap: the crate's own bookkeeping, which lives
/// as long as a heap or pool does, must not land in a task heap the caller
/// happens to be in, where it would keep that heap alive.
fn outside_heaps<R>(f: impl FnOnce() -> R) -> R {
    struct Back(*mut ffi::zk_heap_t);
    impl Drop for Back {
        fn drop(&mut self) {
            unsafe { ffi::zk_heap_enter(self.0) };
        }
    }
    let _back = Back(unsafe { ffi::zk_heap_enter(std::ptr::null_mut()) });
    f()
}

/// A builder's name for zkmem (`what`: "heap", "pool"): `InvalidInput`
/// when it holds a NUL byte.
fn c_name(name: &Option<String>, what: &str) -> std::io::Result<Option<std::ffi::CString>> {
    name.as_deref()
        .map(|name| {
            std::ffi::CString::new(name).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a {} name may not contain NUL", what),
                )
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use std::mem::{size_of, MaybeUninit};
    use std::ptr::addr_of;

    use crate::ffi;

    extern "C" {
        static zkmem_rust_layout: [usize; 12];
    }

    macro_rules! offset_of {
        ($type:ty, $field:ident) => {{
            let value = MaybeUninit::<$type>::uninit();
            let base = value.as_ptr();
            unsafe { addr_of!((*base).$field) as usize - base as usize }
        }};
    }

    #[test]
    fn declarations_match_the_header() {
        let expected = [
            size_of::<ffi::zk_pool_options_t>(),
            offset_of!(ffi::zk_pool_options_t, constructor_arg),
            size_of::<ffi::zk_pool_stats_t>(),
            offset_of!(ffi::zk_pool_stats_t, fragmentation),
            size_of::<ffi::zk_heap_options_t>(),
            offset_of!(ffi::zk_heap_options_t, on_limit_arg),
            size_of::<ffi::zk_heap_stats_t>(),
            offset_of!(ffi::zk_heap_stats_t, name),
            size_of::<ffi::zk_stats_t>(),
            offset_of!(ffi::zk_stats_t, large_allocations),
            offset_of!(ffi::zk_stats_t, fragmentation),
            offset_of!(ffi::zk_stats_t, bytes_mapped_huge),
        ];
        assert_eq!(unsafe { zkmem_rust_layout }, expected);
    }
}
