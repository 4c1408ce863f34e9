//! Aligned blocks from a task heap whose bins hold arena blocks (16-byte
//! aligned only): a Box of an over-aligned type and Heap::alloc with a large
//! alignment must get an aligned block.
use std::alloc::Layout;
use zkmem::{Heap, ZkMem};

#[global_allocator]
static GLOBAL: ZkMem = ZkMem;

#[repr(align(64))]
struct Line([u8; 64]);

#[test]
fn boxed_aligned_value_in_entered_heap() {
    let heap = Heap::new();
    let _guard = heap.enter();
    let a = Box::new([1u8; 16]);           // arena block at offset 0 of the carve
    let b = Box::new([2u8; 64]);           // arena block, 16-aligned only
    drop(b);                               // onto the sub-heap's 64 B bin
    let line = Box::new(Line([3; 64]));    // Layout(64, 64): zk_aligned_alloc
    let addr = &*line as *const Line as usize;
    drop(a);
    assert_eq!(addr % 64, 0, "Box<Line> at {:#x}", addr);
}

#[test]
fn heap_alloc_with_alignment() {
    let heap = Heap::new();
    let l16 = Layout::from_size_align(16, 8).unwrap();
    let l128 = Layout::from_size_align(128, 8).unwrap();
    let a = heap.alloc(l16).unwrap();
    let b = heap.alloc(l128).unwrap();
    {
        let _g = heap.enter();
        unsafe { Heap::dealloc(b, l128) };  // owner free, entered: into the bin
    }
    let want = Layout::from_size_align(128, 128).unwrap();
    let c = heap.alloc(want).unwrap();
    let addr = c.as_ptr() as usize;
    unsafe { Heap::dealloc(a, l16); Heap::dealloc(c, want) };
    assert_eq!(addr % 128, 0, "Heap::alloc(128, align 128) at {:#x}", addr);
}
