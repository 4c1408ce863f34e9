//! Task heaps: a future's allocations counted in its heap on whichever
//! thread polls it, limits seen through `try_reserve`, nesting, guards.

use std::alloc::Layout;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::thread::{self, ThreadId};

use zkmem::{Heap, ZkMem};

#[global_allocator]
static GLOBAL: ZkMem = ZkMem;

/// Pending once, then ready: a suspension point that does not depend on
/// any runtime. Under Tokio it reschedules the task at the back of its
/// worker's queue, where another worker may steal it; unlike
/// `tokio::task::yield_now`, which makes the worker's list of deferred
/// wakers grow, inside the heap of the first task to fill it.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        context.waker().wake_by_ref();
        Poll::Pending
    }
}

fn noop_waker() -> Waker {
    fn clone(_: *const ()) -> RawWaker {
        RawWaker::new(ptr::null(), &VTABLE)
    }
    fn nothing(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, nothing, nothing, nothing);
    unsafe { Waker::from_raw(RawWaker::new(ptr::null(), &VTABLE)) }
}

/// The threads take turns polling one scoped future: each step allocates
/// a block on a new thread, and the heap counts all of them; the future is
/// dropped on yet another thread and the heap is empty again.
#[test]
fn a_future_polled_by_one_thread_after_another() {
    const STEPS: usize = 6;
    const BLOCK: usize = 1000;
    let heap = Heap::new();
    let future = heap.scope(async {
        let mut blocks: Vec<Box<[u8]>> = Vec::new();
        let mut threads = Vec::new();
        for step in 0..STEPS {
            blocks.push(vec![step as u8; BLOCK].into_boxed_slice());
            threads.push(thread::current().id());
            YieldOnce(false).await;
        }
        for (step, block) in blocks.iter().enumerate() {
            assert!(block.iter().all(|&byte| byte == step as u8));
        }
        threads
    });
    let mut future = Box::pin(future);
    let mut threads = Vec::new();
    for step in 0..=STEPS {
        let (done_tx, done_rx) = mpsc::channel();
        future = thread::scope(|scope| {
            scope
                .spawn(move || {
                    let waker = noop_waker();
                    let mut context = Context::from_waker(&waker);
                    if let Poll::Ready(seen) = future.as_mut().poll(&mut context) {
                        done_tx.send(seen).unwrap();
                    }
                    future
                })
                .join()
                .unwrap()
        });
        if let Ok(seen) = done_rx.try_recv() {
            assert_eq!(step, STEPS);
            threads = seen;
        } else {
            // Every block so far is live, and the heap has the thread
            // that allocated it quiet: the count is exact.
            let live = heap.stats().live_bytes;
            let asked = (step + 1) * BLOCK;
            assert!(
                live >= asked && live < asked + 4096,
                "step {}: {} live",
                step,
                live
            );
        }
    }
    let distinct: HashSet<ThreadId> = threads.iter().cloned().collect();
    assert_eq!(distinct.len(), STEPS);
    // The future's output was allocated in the heap too.
    drop((threads, distinct));
    thread::spawn(move || drop(future)).join().unwrap();
    let stats = heap.stats();
    assert_eq!(stats.live_bytes, 0);
    assert!(stats.allocations >= STEPS as u64);
    assert_eq!(stats.allocations, stats.frees);
}

/// Tokio moves tasks between its workers; each task's heap must count what
/// the task holds wherever it runs, and be empty once the task is done.
#[test]
fn tokio_tasks_in_their_own_heaps_move_between_workers() {
    const TASKS: usize = 16;
    const YIELDS: usize = 300;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let heap = Heap::builder()
            .name(&format!("task {}", task))
            .build()
            .unwrap();
        let own = heap.clone();
        let handle = runtime.spawn(heap.scope(async move {
            let mut kept: Vec<Vec<u32>> = Vec::new();
            let mut threads = HashSet::new();
            let mut most_live = 0;
            for round in 0..YIELDS {
                threads.insert(thread::current().id());
                kept.push((0..(round % 50) as u32 * 8 + 1).collect());
                if round % 3 == 0 {
                    kept.remove(0);
                }
                // Spin a little so that the workers fall behind and steal.
                let mut spin = round as u64;
                for _ in 0..2000 {
                    spin = spin.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                }
                assert_ne!(spin, 1);
                YieldOnce(false).await;
                most_live = most_live.max(own.stats().live_bytes);
            }
            for vector in &kept {
                assert_eq!(
                    vector.iter().sum::<u32>(),
                    (0..vector.len() as u32).sum::<u32>()
                );
            }
            (threads.len(), most_live)
        }));
        tasks.push((heap, handle));
    }
    let mut moved = 0;
    for (heap, handle) in tasks {
        let (threads, most_live) = runtime.block_on(handle).unwrap();
        if threads > 1 {
            moved += 1;
        }
        assert!(most_live > 0);
        let stats = heap.stats();
        assert_eq!(stats.live_bytes, 0, "{}: {:?}", heap.name(), stats);
        assert!(stats.peak_bytes >= most_live);
        assert!(stats.allocations >= YIELDS as u64);
    }
    assert!(moved > 0, "no task ran on more than one worker");
}

#[test]
fn a_limit_fails_try_reserve_not_the_process() {
    const LIMIT: usize = 1 << 20;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let heap = Heap::with_limit(LIMIT);
    let outcome = runtime
        .block_on(runtime.spawn(heap.scope(async {
            let mut big = Vec::<u8>::new();
            let refused = big.try_reserve(2 * LIMIT).is_err();
            let mut fits = Vec::<u8>::new();
            let accepted = fits.try_reserve(LIMIT / 2).is_ok();
            // Room for every block up front: growing this vector near the
            // limit would fail in `push`, which aborts.
            let mut small: Vec<Vec<u8>> = Vec::with_capacity(LIMIT / 1024);
            let mut refusals = 0;
            // Small blocks up to the limit: the last ones are refused.
            for _ in 0..LIMIT / 1024 {
                let mut block = Vec::new();
                if block.try_reserve(1024).is_err() {
                    refusals += 1;
                    break;
                }
                block.resize(1024, 7u8);
                small.push(block);
            }
            (refused, accepted, refusals)
        })))
        .unwrap();
    assert_eq!(outcome, (true, true, 1));
    let stats = heap.stats();
    assert_eq!(stats.limit_bytes, Some(LIMIT));
    assert_eq!(stats.limit_refusals, 2);
    assert!(stats.peak_bytes <= LIMIT);
    assert_eq!(stats.live_bytes, 0);
}

#[test]
fn nested_heaps_count_and_limit_in_the_parent() {
    let tenant = Heap::builder()
        .name("tenant")
        .limit(1 << 20)
        .build()
        .unwrap();
    let request = Heap::builder()
        .name("request")
        .parent(&tenant)
        .build()
        .unwrap();
    assert_eq!(request.parent().map(Heap::name), Some("tenant"));
    let guard = request.enter();
    let mut first = Vec::<u8>::new();
    first.try_reserve_exact(600 << 10).unwrap();
    let mut second = Vec::<u8>::new();
    assert!(second.try_reserve_exact(600 << 10).is_err());
    drop(guard);
    assert!(request.stats().live_bytes >= 600 << 10);
    assert_eq!(tenant.stats().live_bytes, request.stats().live_bytes);
    assert_eq!(request.stats().limit_refusals, 1);
    assert_eq!(tenant.stats().limit_refusals, 1);
    drop(first);
    assert_eq!(tenant.stats().live_bytes, 0);
    // A child heap of the request, made from inside it: the tenant counts
    // it too.
    let inner = request.child();
    let guard = inner.enter();
    let block = vec![1u8; 10_000];
    drop(guard);
    assert!(tenant.stats().live_bytes >= 10_000);
    drop(block);
    assert_eq!(tenant.stats().live_bytes, 0);
}

#[test]
fn guards_nest_and_may_be_dropped_out_of_order() {
    let outer = Heap::new();
    let inner = Heap::new();
    let outer_guard = outer.enter();
    let in_outer = vec![0u8; 5000];
    let inner_guard = inner.enter();
    let in_inner = vec![0u8; 7000];
    // The outer guard goes first: the thread stays in the inner heap, the
    // most recent guard's.
    drop(outer_guard);
    let still_inner = vec![0u8; 3000];
    drop(inner_guard);
    let in_neither = vec![0u8; 9000];
    let outer_live = outer.stats().live_bytes;
    let inner_live = inner.stats().live_bytes;
    assert!((5000..6000).contains(&outer_live), "outer {}", outer_live);
    assert!(
        (10_000..11_500).contains(&inner_live),
        "inner {}",
        inner_live
    );
    drop((in_outer, in_inner, still_inner, in_neither));
    assert_eq!(outer.stats().live_bytes, 0);
    assert_eq!(inner.stats().live_bytes, 0);
}

/// A guard entered during a scoped future's poll and held across its
/// suspension keeps the thread in the guard's heap after the poll; when it
/// is dropped in a later poll, the rest of that poll runs in the future's
/// heap, and after it the thread is back where it was.
#[test]
fn a_guard_may_outlive_the_poll_it_was_entered_in() {
    let task = Heap::new();
    let other = Heap::new();
    let guarded = other.clone();
    let mut future = Box::pin(task.scope(async move {
        let guard = guarded.enter();
        YieldOnce(false).await;
        drop(guard);
        vec![1u8; 2000]
    }));
    let waker = noop_waker();
    let mut context = Context::from_waker(&waker);
    assert!(future.as_mut().poll(&mut context).is_pending());
    let between = vec![2u8; 3000];
    let other_live = other.stats().live_bytes;
    assert!((3000..3500).contains(&other_live), "other {}", other_live);
    let made_in_task = match future.as_mut().poll(&mut context) {
        Poll::Ready(block) => block,
        Poll::Pending => panic!("the future should be done"),
    };
    let task_live = task.stats().live_bytes;
    assert!((2000..2500).contains(&task_live), "task {}", task_live);
    let after = vec![3u8; 5000];
    assert_eq!(task.stats().live_bytes, task_live);
    assert_eq!(other.stats().live_bytes, other_live);
    drop(future);
    drop((between, made_in_task, after));
    assert_eq!(task.stats().live_bytes, 0);
    assert_eq!(other.stats().live_bytes, 0);
}

#[test]
fn a_scoped_future_is_dropped_inside_its_heap() {
    static KEPT: AtomicPtr<[u8; 4096]> = AtomicPtr::new(ptr::null_mut());
    struct AllocatesOnDrop;
    impl Drop for AllocatesOnDrop {
        fn drop(&mut self) {
            KEPT.store(Box::into_raw(Box::new([3; 4096])), Ordering::SeqCst);
        }
    }
    let heap = Heap::new();
    let witness = AllocatesOnDrop;
    let future = heap.scope(async move {
        let _witness = witness;
    });
    drop(future); // never polled
    assert!(heap.stats().live_bytes >= 4096);
    drop(unsafe { Box::from_raw(KEPT.load(Ordering::SeqCst)) });
    assert_eq!(heap.stats().live_bytes, 0);
}

/// A future that is pending once, then ready, holding `held` until it is
/// dropped (an `async` block would drop it as its body ends, in the poll).
struct ReadySecondTime<T> {
    polled: bool,
    _held: T,
}

impl<T> Future for ReadySecondTime<T> {
    type Output = Vec<u8>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Vec<u8>> {
        let this = unsafe { self.get_unchecked_mut() };
        if !this.polled {
            this.polled = true;
            context.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(vec![7u8; 2000])
    }
}

/// A scoped future that completes is dropped in its last poll, inside its
/// heap (what it allocates as it drops is the heap's), and lets go of its
/// handle then; the block it returned outlives the heap's last handle.
#[test]
fn a_completed_future_is_dropped_in_its_last_poll() {
    static KEPT: AtomicPtr<[u8; 3000]> = AtomicPtr::new(ptr::null_mut());
    struct AllocatesOnDrop;
    impl Drop for AllocatesOnDrop {
        fn drop(&mut self) {
            KEPT.store(Box::into_raw(Box::new([5; 3000])), Ordering::SeqCst);
        }
    }
    let heap = Heap::new();
    let mut future = Box::pin(heap.scope(ReadySecondTime {
        polled: false,
        _held: AllocatesOnDrop,
    }));
    assert!(future.heap().is_some());
    let waker = noop_waker();
    let mut context = Context::from_waker(&waker);
    assert!(future.as_mut().poll(&mut context).is_pending());
    assert!(KEPT.load(Ordering::SeqCst).is_null());
    let output = match future.as_mut().poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the future should have completed"),
    };
    // Dropped already, inside the heap, and its handle with it.
    assert!(future.heap().is_none());
    assert!(!KEPT.load(Ordering::SeqCst).is_null());
    let live = heap.stats().live_bytes;
    assert!(live >= 3000 + 2000, "live {}", live);
    drop(future);
    assert_eq!(heap.stats().live_bytes, live);
    drop(heap); // the last handle: the blocks stay good
    assert!(output.iter().all(|&byte| byte == 7));
    drop(output);
    drop(unsafe { Box::from_raw(KEPT.load(Ordering::SeqCst)) });
}

/// A future whose drop panics as it completes is dropped once: the panic
/// reaches the poller, the thread has left the heap, and dropping the
/// adapter afterwards does nothing more.
#[test]
fn a_future_whose_drop_panics_at_completion_is_dropped_once() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct PanicsOnDrop;
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
            panic!("drop panics on purpose");
        }
    }
    let heap = Heap::new();
    let mut future = Box::pin(heap.scope(ReadySecondTime {
        polled: true,
        _held: PanicsOnDrop,
    }));
    let waker = noop_waker();
    let mut context = Context::from_waker(&waker);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = future.as_mut().poll(&mut context);
    }));
    assert!(result.is_err());
    assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    assert!(future.heap().is_none());
    drop(future);
    assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    // Left: a new allocation is not the heap's.
    let before = heap.stats().live_bytes;
    let outside = vec![1u8; 4000];
    assert_eq!(heap.stats().live_bytes, before);
    drop(outside);
}

#[test]
fn blocks_allocated_without_entering() {
    let heap = Heap::with_limit(1 << 20);
    let layout = Layout::from_size_align(3000, 64).unwrap();
    let block = heap.alloc(layout).unwrap();
    assert_eq!(block.as_ptr() as usize % 64, 0);
    let zeroed = heap.alloc_zeroed(Layout::new::<[u64; 100]>()).unwrap();
    assert!(unsafe { std::slice::from_raw_parts(zeroed.as_ptr(), 800) }
        .iter()
        .all(|&b| b == 0));
    let small = Layout::from_size_align(8, 16).unwrap();
    let grown = unsafe {
        let block = heap.alloc(small).unwrap();
        block.as_ptr().write_bytes(9, 8);
        heap.realloc(block, small, 5000).unwrap()
    };
    assert_eq!(grown.as_ptr() as usize % 16, 0);
    assert!(unsafe { std::slice::from_raw_parts(grown.as_ptr(), 8) }
        .iter()
        .all(|&b| b == 9));
    assert!(heap.stats().live_bytes >= 3000 + 800 + 5000);
    assert!(heap
        .alloc(Layout::from_size_align(2 << 20, 8).unwrap())
        .is_none());
    unsafe {
        Heap::dealloc(block, layout);
        Heap::dealloc(zeroed, Layout::new::<[u64; 100]>());
        Heap::dealloc(grown, Layout::from_size_align(5000, 16).unwrap());
    }
    assert_eq!(heap.stats().live_bytes, 0);
}

#[test]
fn free_all_needs_the_only_handle() {
    let heap = Heap::new();
    let blocks: Vec<NonNull<u8>> = (0..100)
        .map(|size| {
            heap.alloc(Layout::from_size_align(size * 100 + 1, 8).unwrap())
                .unwrap()
        })
        .collect();
    assert!(heap.stats().live_bytes > 0);
    let clone = heap.clone();
    let child = heap.child();
    let heap = unsafe { heap.free_all() }.unwrap_err();
    drop(clone);
    let heap = unsafe { heap.free_all() }.unwrap_err(); // the child's handle
    drop(child);
    // The blocks go with the heap, never freed one by one.
    drop(blocks);
    assert!(unsafe { heap.free_all() }.is_ok());
}

#[test]
fn heaps_are_shared_across_threads() {
    fn shared<T: Send + Sync + Clone + 'static>(_: &T) {}
    let heap = Heap::new();
    shared(&heap);
    let workers: Vec<_> = (0..4)
        .map(|index| {
            let heap = heap.clone();
            thread::spawn(move || {
                let _guard = heap.enter();
                vec![index as u8; 10_000]
            })
        })
        .collect();
    let blocks: Vec<Vec<u8>> = workers
        .into_iter()
        .map(|worker| worker.join().unwrap())
        .collect();
    assert!(heap.stats().live_bytes >= 40_000);
    drop(blocks);
    assert_eq!(heap.stats().live_bytes, 0);
}
