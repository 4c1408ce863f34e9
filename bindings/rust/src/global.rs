use std::alloc::{GlobalAlloc, Layout};
use std::ptr;

use crate::ffi;

/// zkmem as Rust's global allocator.
///
/// ```
/// #[global_allocator]
/// static GLOBAL: zkmem::ZkMem = zkmem::ZkMem;
///
/// fn main() {
///     let message: Vec<u8> = vec![7; 100];
///     assert_eq!(message.iter().map(|&b| b as usize).sum::<usize>(), 700);
/// }
/// ```
///
/// Only the program's Rust allocations go to zkmem: the C library's
/// `malloc` (and so every C library the program links) is left alone. A
/// [`Heap`](crate::Heap) entered on a thread takes that thread's
/// allocations only when `ZkMem` is the global allocator.
///
/// Allocation failure returns null, as [`GlobalAlloc`] asks: `Vec::push`
/// then ends the process through `handle_alloc_error`, while
/// `Vec::try_reserve` returns an error the program can handle, which is
/// what a heap's limit produces.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZkMem;

/// zk_malloc's alignment: 16 bytes from 16 B up, 8 below. The size to ask
/// for a layout it can serve, or `None` when the alignment needs
/// zk_aligned_alloc.
#[inline(always)]
fn malloc_size(size: usize, align: usize) -> Option<usize> {
    if align <= 8 {
        Some(size)
    } else if align <= 16 {
        Some(size.max(16))
    } else {
        None
    }
}

unsafe impl GlobalAlloc for ZkMem {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match malloc_size(layout.size(), layout.align()) {
            Some(size) => ffi::zk_malloc(size) as *mut u8,
            None => ffi::zk_aligned_alloc(layout.align(), layout.size()) as *mut u8,
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match malloc_size(layout.size(), layout.align()) {
            // calloc knows fresh pages are already zero.
            Some(size) => ffi::zk_calloc(1, size) as *mut u8,
            None => {
                let block = ffi::zk_aligned_alloc(layout.align(), layout.size()) as *mut u8;
                if !block.is_null() {
                    ptr::write_bytes(block, 0, layout.size());
                }
                block
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // The size asked for, not the one rounded up for alignment: a sized
        // free may name any size up to the block's usable size.
        ffi::zk_free_sized(block as *mut _, layout.size());
    }

    #[inline]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A block zk_realloc moves comes from zk_malloc, so only layouts
        // zk_malloc serves may go through it.
        if let Some(size) = malloc_size(new_size, layout.align()) {
            return ffi::zk_realloc(block as *mut _, size) as *mut u8;
        }
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let fresh = self.alloc(new_layout);
        if !fresh.is_null() {
            ptr::copy_nonoverlapping(block, fresh, layout.size().min(new_size));
            self.dealloc(block, layout);
        }
        fresh
    }
}
