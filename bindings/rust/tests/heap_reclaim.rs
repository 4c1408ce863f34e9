//! A heap whose last handle goes while blocks of it are still live waits
//! for them, and is destroyed once they are freed, wherever they are freed.
//! One test: the count of waiting heaps is the process's.

use std::sync::{mpsc, Arc, Barrier};
use std::thread;

use zkmem::{reclaim_heaps, Heap, ZkMem};

#[global_allocator]
static GLOBAL: ZkMem = ZkMem;

fn allocate_in<T>(heap: &Heap, make: impl FnOnce() -> T) -> T {
    let _inside = heap.enter();
    make()
}

#[test]
fn heaps_wait_for_their_last_block() {
    assert_eq!(reclaim_heaps(), 0);

    // A reply that outlives its request's heap: a large block and a small
    // one, the last freed on another thread.
    let request = Heap::new();
    let body = allocate_in(&request, || vec![1u8; 100_000]);
    let status = allocate_in(&request, || String::from("200 OK"));
    drop(request);
    assert_eq!(reclaim_heaps(), 1);
    assert_eq!(body.iter().map(|&b| b as usize).sum::<usize>(), 100_000);
    drop(body);
    assert_eq!(reclaim_heaps(), 1);
    thread::spawn(move || assert_eq!(status, "200 OK"))
        .join()
        .unwrap();
    assert_eq!(reclaim_heaps(), 0);

    // A waiting child keeps its parent: the parent goes with it.
    let tenant = Heap::new();
    let request = tenant.child();
    let kept = allocate_in(&request, || vec![2u8; 1000]);
    drop(tenant);
    drop(request);
    assert_eq!(reclaim_heaps(), 1);
    drop(kept);
    assert_eq!(reclaim_heaps(), 0);

    // The last handle dropped while another thread frees the heap's last
    // blocks, over and over: each heap is destroyed at once or waits, and
    // none is destroyed under a free still running.
    const ROUNDS: usize = 3000;
    let (tx, rx) = mpsc::channel::<Vec<Box<[u8; 48]>>>();
    let start = Arc::new(Barrier::new(2));
    let worker_start = start.clone();
    let worker = thread::spawn(move || {
        for (round, blocks) in rx.into_iter().enumerate() {
            worker_start.wait();
            assert!(blocks.iter().all(|block| block[47] == round as u8));
            drop(blocks);
        }
    });
    for round in 0..ROUNDS {
        let heap = Heap::new();
        let blocks = allocate_in(&heap, || {
            (0..4).map(|_| Box::new([round as u8; 48])).collect()
        });
        tx.send(blocks).unwrap();
        start.wait();
        drop(heap);
    }
    drop(tx);
    worker.join().unwrap();
    assert_eq!(reclaim_heaps(), 0);
}
