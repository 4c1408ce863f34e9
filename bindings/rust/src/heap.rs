use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::{ffi, outside_heaps};

/// A task heap: memory of one task or request, counted and limited on its
/// own, whichever threads allocate and free it.
///
/// A thread that [enters](Heap::enter) the heap allocates from it (with
/// [`ZkMem`](crate::ZkMem) as the global allocator: every `Box`, `Vec` and
/// `String`, the libraries' included); [`scope`](Heap::scope) enters it
/// around every poll of a future, so a Tokio task's allocations are counted
/// in its heap on whichever worker runs it. Blocks may be freed by any
/// thread, inside the heap or not, and stay counted in their heap until
/// then. [`stats`](Heap::stats) tells the live and peak bytes; a limit makes
/// allocations beyond it fail (`Vec::try_reserve` returns an error, while
/// `Vec::push` ends the process as on any allocation failure).
///
/// `Heap` is a reference-counted handle: clones share the heap, and it goes
/// away when the last clone, [`EnterGuard`] and [`InHeap`] are gone. Child
/// heaps ([`child`](Heap::child), [`HeapBuilder::parent`]) are counted in
/// their parent too, and keep it alive.
///
/// # When the heap's memory is freed
///
/// zkmem can free a whole heap at once, live blocks included, but a Rust
/// value allocated in the heap may outlive every handle (a reply sent to
/// another task, a task's output): freeing its memory would leave it
/// dangling. So when the last handle goes, the heap is destroyed only if no
/// block of it is live any more, which zkmem's statistics tell exactly at
/// that point (nothing can allocate from the heap then, and frees on other
/// threads are complete when they show in the count). Otherwise the heap
/// waits until its last block is freed: each later [`Heap::new`] (or
/// builder) looks at one waiting heap, and [`reclaim_heaps`] at all of them.
/// [`free_all`](Heap::free_all) destroys a heap with its live blocks, for a
/// program that knows none of them is used any more.
///
/// What a poll allocates is the heap's even when it is not the task's: a
/// structure of the runtime that grows during the poll (Tokio's list of
/// wakers deferred by `yield_now`, one per worker; a channel's next block
/// of slots) keeps a block in the heap of the task that made it grow, and
/// that heap waits until the runtime frees it.
///
/// ```
/// #[global_allocator]
/// static GLOBAL: zkmem::ZkMem = zkmem::ZkMem;
///
/// fn main() {
///     let heap = zkmem::Heap::with_limit(1 << 20);
///     let guard = heap.enter();
///     let mut small = Vec::<u8>::new();
///     assert!(small.try_reserve(4096).is_ok());
///     let mut big = Vec::<u8>::new();
///     assert!(big.try_reserve(2 << 20).is_err()); // past the limit
///     drop(guard);
///     assert!(heap.stats().live_bytes >= 4096);
///     assert_eq!(heap.stats().limit_refusals, 1);
///     drop(small);
///     assert_eq!(heap.stats().live_bytes, 0);
/// }
/// ```
///
/// `Heap` is `Send` and `Sync`: zkmem's heaps may be used from any thread
/// at once.
#[derive(Clone)]
pub struct Heap {
    inner: Arc<HeapInner>,
}

/// Aligned to a cache line, so that `raw`, read at every poll of a scoped
/// future, is not on the line of the `Arc`'s reference counts, which every
/// task spawned in a shared heap and every one that ends write from any
/// worker (a cache miss per poll: 2% of the request/reply workload's
/// samples, `perf`).
#[repr(align(64))]
struct HeapInner {
    raw: NonNull<ffi::zk_heap_t>,
    /// Keeps the parent alive: zkmem reports the destruction of a heap that
    /// still has children.
    parent: Option<Heap>,
    name: Option<Box<str>>,
}

// The C heap is thread-safe; the other fields are plain data.
unsafe impl Send for HeapInner {}
unsafe impl Sync for HeapInner {}

impl Drop for HeapInner {
    fn drop(&mut self) {
        retire(Retired {
            raw: self.raw,
            parent: self.parent.take(),
        });
    }
}

/// A heap whose last handle is gone, destroyed once none of its blocks is
/// live.
struct Retired {
    raw: NonNull<ffi::zk_heap_t>,
    parent: Option<Heap>,
}

unsafe impl Send for Retired {}

impl Retired {
    /// Destroys the heap if none of its blocks is live, else hands it back.
    ///
    /// No thread can allocate from the heap any more: no handle is left to
    /// enter it with or to allocate through, and no child (each holds a
    /// handle). zkmem's live count is then exact, and a free done on another
    /// thread shows in it only once complete, so a count of 0 means that no
    /// block can be used or freed again.
    fn try_destroy(self) -> Result<(), Retired> {
        if !raw_stats(self.raw).map_or(false, |stats| stats.live_bytes == 0) {
            return Err(self);
        }
        unsafe { ffi::zk_heap_destroy(self.raw.as_ptr()) };
        drop(self.parent);
        Ok(())
    }
}

/// A queue: the oldest are looked at first, and taken from the front
/// without moving the rest (with a `Vec`, a heap per request spent 6% of
/// its time moving the waiting list down). `VecDeque::new` is not `const`
/// in Rust 1.63, hence the `Option`.
static RETIRED: Mutex<Option<VecDeque<Retired>>> = Mutex::new(None);
/// `RETIRED`'s length, read without its lock on every heap creation.
static RETIRED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` on the waiting heaps, under their lock, and publishes their
/// count.
fn with_retired<R>(f: impl FnOnce(&mut VecDeque<Retired>) -> R) -> R {
    let mut retired = RETIRED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let retired = retired.get_or_insert_with(VecDeque::new);
    let result = f(retired);
    RETIRED_COUNT.store(retired.len(), Ordering::Relaxed);
    result
}

fn retire(heap: Retired) {
    let heap = match heap.try_destroy() {
        Ok(()) => return,
        Err(heap) => heap,
    };
    outside_heaps(|| with_retired(|retired| retired.push_back(heap)));
}

/// Looks at up to `count` waiting heaps, the oldest first, and destroys
/// those with no live block. Returns how many still wait.
fn reclaim(count: usize) -> usize {
    outside_heaps(|| {
        let candidates: Vec<Retired> = with_retired(|retired| {
            let taken = count.min(retired.len());
            retired.drain(..taken).collect()
        });
        // Outside the lock: destroying a heap drops its parent's handle,
        // which may retire the parent.
        let waiting: Vec<Retired> = candidates
            .into_iter()
            .filter_map(|heap| heap.try_destroy().err())
            .collect();
        with_retired(|retired| {
            retired.extend(waiting);
            retired.len()
        })
    })
}

/// Destroys every heap whose last handle is gone and whose blocks have all
/// been freed since. Returns how many such heaps still wait for blocks of
/// theirs to be freed.
///
/// Heap creation does this a heap at a time; a program that stops creating
/// heaps calls it to have their memory back.
pub fn reclaim_heaps() -> usize {
    reclaim(usize::MAX)
}

fn raw_stats(raw: NonNull<ffi::zk_heap_t>) -> Option<ffi::zk_heap_stats_t> {
    let mut stats = ffi::zk_heap_stats_t {
        live_bytes: 0,
        peak_bytes: 0,
        limit_bytes: 0,
        allocations: 0,
        frees: 0,
        limit_refusals: 0,
        name: ptr::null(),
    };
    if unsafe { ffi::zk_heap_stats(raw.as_ptr(), &mut stats) } == 0 {
        Some(stats)
    } else {
        None
    }
}

/// A heap's figures, from [`Heap::stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeapStats {
    /// Usable bytes of the heap's live blocks (its children's included):
    /// exact once the threads that used the heap are quiet; while they run,
    /// blocks they have just allocated or freed may be missing.
    pub live_bytes: usize,
    /// High-water mark of the bytes charged to the heap: live blocks and
    /// the free ones its threads keep cached for it, so at least the peak
    /// of `live_bytes`.
    pub peak_bytes: usize,
    /// The limit, if any.
    pub limit_bytes: Option<usize>,
    /// Blocks allocated from the heap.
    pub allocations: u64,
    /// Blocks of the heap freed.
    pub frees: u64,
    /// Allocations refused by this heap's limit, its children's included.
    pub limit_refusals: u64,
}

/// Options of a new [`Heap`], from [`Heap::builder`].
#[derive(Default)]
pub struct HeapBuilder {
    name: Option<String>,
    limit: Option<usize>,
    parent: Option<Heap>,
}

impl HeapBuilder {
    /// A name for the heap, returned by [`Heap::name`].
    pub fn name(mut self, name: &str) -> HeapBuilder {
        self.name = Some(name.to_string());
        self
    }

    /// Allocations that would take the heap (or a child's allocations that
    /// would take it) past `bytes` fail.
    pub fn limit(mut self, bytes: usize) -> HeapBuilder {
        self.limit = Some(bytes);
        self
    }

    /// Makes the new heap a child of `parent`: its blocks count in the
    /// parent too, and the parent's limit applies to them. The child keeps
    /// its parent alive.
    pub fn parent(mut self, parent: &Heap) -> HeapBuilder {
        self.parent = Some(parent.clone());
        self
    }

    /// Creates the heap.
    ///
    /// # Errors
    ///
    /// Out of memory, or a name containing a NUL byte (`InvalidInput`).
    pub fn build(self) -> io::Result<Heap> {
        if RETIRED_COUNT.load(Ordering::Relaxed) != 0 {
            reclaim(1);
        }
        // The name and the handle live as long as the heap, and must not
        // keep the heap the caller is in alive.
        outside_heaps(move || {
            let c_name = crate::c_name(&self.name, "heap")?;
            let options = ffi::zk_heap_options_t {
                name: c_name.as_ref().map_or(ptr::null(), |name| name.as_ptr()),
                limit_bytes: self.limit.unwrap_or(0),
                parent: self.parent.as_ref().map_or(ptr::null_mut(), Heap::raw),
                on_limit: None,
                on_limit_arg: ptr::null_mut(),
            };
            let raw = NonNull::new(unsafe { ffi::zk_heap_create(&options) })
                .ok_or_else(io::Error::last_os_error)?;
            Ok(Heap {
                inner: Arc::new(HeapInner {
                    raw,
                    parent: self.parent,
                    name: self.name.as_deref().map(Box::from),
                }),
            })
        })
    }
}

impl Heap {
    /// A heap with no limit.
    ///
    /// # Panics
    ///
    /// When zkmem has no memory for the heap; [`Heap::builder`] returns the
    /// error instead.
    pub fn new() -> Heap {
        Heap::builder()
            .build()
            .expect("zkmem: cannot create a heap")
    }

    /// A heap whose allocations fail past `bytes`.
    ///
    /// # Panics
    ///
    /// As [`Heap::new`].
    pub fn with_limit(bytes: usize) -> Heap {
        Heap::builder()
            .limit(bytes)
            .build()
            .expect("zkmem: cannot create a heap")
    }

    /// Options: name, limit, parent.
    pub fn builder() -> HeapBuilder {
        HeapBuilder::default()
    }

    /// A heap nested in this one, with no limit of its own: its blocks count
    /// here too, and this heap's limit applies to them.
    ///
    /// # Panics
    ///
    /// As [`Heap::new`].
    pub fn child(&self) -> Heap {
        Heap::builder()
            .parent(self)
            .build()
            .expect("zkmem: cannot create a heap")
    }

    #[inline]
    fn raw(&self) -> *mut ffi::zk_heap_t {
        self.inner.raw.as_ptr()
    }

    /// The name given to the builder, or `"heap"`.
    pub fn name(&self) -> &str {
        self.inner.name.as_deref().unwrap_or("heap")
    }

    /// The parent given to the builder, if any.
    pub fn parent(&self) -> Option<&Heap> {
        self.inner.parent.as_ref()
    }

    /// The heap's figures now.
    pub fn stats(&self) -> HeapStats {
        let stats = raw_stats(self.inner.raw).expect("zkmem: statistics of a live heap");
        HeapStats {
            live_bytes: stats.live_bytes,
            peak_bytes: stats.peak_bytes,
            limit_bytes: if stats.limit_bytes == 0 {
                None
            } else {
                Some(stats.limit_bytes)
            },
            allocations: stats.allocations,
            frees: stats.frees,
            limit_refusals: stats.limit_refusals,
        }
    }

    /// Makes this heap the calling thread's until the guard is dropped;
    /// then the heap entered before comes back.
    ///
    /// Guards nest. Dropped out of order, a guard leaves its heap's turn:
    /// the thread stays in the heap of the most recent guard still alive.
    ///
    /// # Panics
    ///
    /// When called while the thread's locals are being destroyed.
    pub fn enter(&self) -> EnterGuard {
        EnterGuard {
            _inside: Inside::new(self.raw()).expect("zkmem: Heap::enter during thread exit"),
            heap: self.clone(),
        }
    }

    /// Wraps `future` so that every poll of it, and its drop, run in this
    /// heap: a Tokio task's allocations are counted here on whichever worker
    /// polls it.
    ///
    /// ```
    /// #[global_allocator]
    /// static GLOBAL: zkmem::ZkMem = zkmem::ZkMem;
    ///
    /// fn main() {
    ///     let runtime = tokio::runtime::Builder::new_multi_thread()
    ///         .worker_threads(2)
    ///         .build()
    ///         .unwrap();
    ///     let request = zkmem::Heap::with_limit(64 << 10);
    ///     let task = runtime.spawn(request.scope(async {
    ///         let mut body = Vec::<u8>::new();
    ///         if body.try_reserve(1 << 20).is_err() {
    ///             return 413; // over the request's limit
    ///         }
    ///         200
    ///     }));
    ///     assert_eq!(runtime.block_on(task).unwrap(), 413);
    ///     assert_eq!(request.stats().limit_refusals, 1);
    /// }
    /// ```
    ///
    /// The adapter is `Send` exactly when the future is, so a future that
    /// holds an `Rc` across an await cannot be spawned on a multi-thread
    /// runtime, scoped or not:
    ///
    /// ```compile_fail,E0277
    /// let runtime = tokio::runtime::Runtime::new().unwrap();
    /// let heap = zkmem::Heap::new();
    /// runtime.spawn(heap.scope(async {
    ///     let shared = std::rc::Rc::new(1);
    ///     tokio::task::yield_now().await;
    ///     *shared
    /// }));
    /// ```
    pub fn scope<F: Future>(&self, future: F) -> InHeap<F> {
        InHeap {
            heap: Some(self.clone()),
            future: Some(Box::pin(future)),
        }
    }

    /// Allocates a block for `layout` from this heap, without entering it;
    /// `None` when out of memory or past the limit. The block is freed with
    /// [`Heap::dealloc`] (or [`ZkMem`](crate::ZkMem)'s `dealloc`) from any
    /// thread, and keeps the heap alive until then.
    pub fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        // zkmem serves alignments up to 16 from the size classes.
        let block =
            unsafe { ffi::zk_heap_aligned_alloc(self.raw(), layout.align(), layout.size()) };
        NonNull::new(block as *mut u8)
    }

    /// As [`alloc`](Heap::alloc), the block's bytes zeroed.
    pub fn alloc_zeroed(&self, layout: Layout) -> Option<NonNull<u8>> {
        if layout.align() <= 8 {
            return NonNull::new(
                unsafe { ffi::zk_heap_calloc(self.raw(), 1, layout.size()) } as *mut u8
            );
        }
        let block = self.alloc(layout)?;
        unsafe { ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
        Some(block)
    }

    /// Resizes a block to `new_size` bytes, keeping its contents up to the
    /// smaller size. A block that moves comes from this heap; one that fits
    /// stays where it is, in its own heap. `None` leaves the block as it
    /// was.
    ///
    /// # Safety
    ///
    /// `block` must come from zkmem with `layout` (from any heap, or the
    /// global allocator) and not be used after the call unless it returns
    /// `None`; `layout.align()` must be at most 16 (zkmem does not keep a
    /// larger alignment when it moves a block); `new_size` must be nonzero.
    pub unsafe fn realloc(
        &self,
        block: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> Option<NonNull<u8>> {
        debug_assert!(layout.align() <= 16 && new_size != 0);
        let size = if layout.align() > 8 {
            new_size.max(16)
        } else {
            new_size
        };
        NonNull::new(ffi::zk_heap_realloc(self.raw(), block.as_ptr() as *mut _, size) as *mut u8)
    }

    /// Frees a block of any heap, from any thread.
    ///
    /// # Safety
    ///
    /// `block` must come from zkmem with `layout` and not be used after.
    pub unsafe fn dealloc(block: NonNull<u8>, layout: Layout) {
        ffi::zk_free_sized(block.as_ptr() as *mut _, layout.size());
    }

    /// Destroys the heap now, with every block still live in it, in time
    /// proportional to its pages rather than its blocks. Returns the heap
    /// unchanged when another handle to it exists (a clone, a child, an
    /// [`EnterGuard`] or an [`InHeap`]).
    ///
    /// # Safety
    ///
    /// No block of the heap may be used or freed after the call: Rust
    /// values allocated in it must be forgotten (`mem::forget`), not
    /// dropped.
    pub unsafe fn free_all(self) -> Result<(), Heap> {
        let inner = Arc::try_unwrap(self.inner).map_err(|inner| Heap { inner })?;
        // Taken apart so that its drop, which waits for live blocks, does
        // not run.
        let inner = ManuallyDrop::new(inner);
        let raw = inner.raw;
        let parent = ptr::read(&inner.parent);
        let name = ptr::read(&inner.name);
        ffi::zk_heap_destroy(raw.as_ptr());
        drop(parent);
        drop(name);
        Ok(())
    }
}

impl Default for Heap {
    fn default() -> Heap {
        Heap::new()
    }
}

impl fmt::Debug for Heap {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Heap")
            .field("name", &self.name())
            .field("stats", &self.stats())
            .finish()
    }
}

// ---- entering ------------------------------------------------------------

/// The heaps this thread has entered through the crate, innermost last.
/// Each frame's owner (a guard, or a scoped future's poll or drop) removes
/// it, and keeps the heap alive meanwhile; a guard that is forgotten keeps
/// its handle forever, and so its heap.
struct Entered {
    frames: Vec<Frame>,
    /// The heap the thread was in before its first frame.
    base: *mut ffi::zk_heap_t,
    next_id: u64,
}

struct Frame {
    id: u64,
    heap: *mut ffi::zk_heap_t,
}

thread_local! {
    static ENTERED: RefCell<Entered> = const {
        RefCell::new(Entered {
            frames: Vec::new(),
            base: ptr::null_mut(),
            next_id: 0,
        })
    };
}

thread_local! {
    /// How many frames `ENTERED` holds: what a scoped future's poll asks
    /// twice, read without `ENTERED`'s borrow flag and destructor state
    /// (a third of the crate's instructions per poll).
    static OPEN_FRAMES: Cell<usize> = const { Cell::new(0) };
}

fn frames_changed(entered: &Entered) {
    OPEN_FRAMES.with(|open| open.set(entered.frames.len()));
}

/// A frame of `ENTERED`: the thread is in the frame's heap while it is the
/// innermost.
struct Inside {
    id: u64,
    _not_send: PhantomData<*const ()>,
}

impl Inside {
    /// `None` while the thread's locals are being destroyed.
    #[inline]
    fn new(heap: *mut ffi::zk_heap_t) -> Option<Inside> {
        ENTERED
            .try_with(|entered| {
                let mut entered = entered.borrow_mut();
                if entered.frames.len() == entered.frames.capacity() {
                    // The frames outlive any task heap the thread is in.
                    let frames = &mut entered.frames;
                    outside_heaps(|| frames.reserve(8));
                }
                let id = entered.next_id;
                entered.next_id += 1;
                entered.frames.push(Frame { id, heap });
                frames_changed(&entered);
                let previous = unsafe { ffi::zk_heap_enter(heap) };
                if entered.frames.len() == 1 {
                    entered.base = previous;
                }
                Inside {
                    id,
                    _not_send: PhantomData,
                }
            })
            .ok()
    }
}

/// A scoped future's poll or drop in its heap. The call nests on the
/// stack, so while the thread has no frame open (no guard outlives
/// anything here) the heap is entered and left directly, without a frame:
/// a frame cost more than entering and leaving the heap themselves (about
/// 60% of `scope`'s instructions on the request/reply workload).
enum Within {
    Direct {
        previous: *mut ffi::zk_heap_t,
    },
    /// The frame, left when this is dropped.
    Framed {
        _frame: Inside,
    },
    Outside,
}

impl Within {
    #[inline]
    fn new(heap: *mut ffi::zk_heap_t) -> Within {
        if OPEN_FRAMES.with(Cell::get) == 0 {
            return Within::Direct {
                previous: unsafe { ffi::zk_heap_enter(heap) },
            };
        }
        // None: the thread's locals are being destroyed.
        Inside::new(heap).map_or(Within::Outside, |frame| Within::Framed { _frame: frame })
    }
}

impl Drop for Within {
    #[inline]
    fn drop(&mut self) {
        if let Within::Direct { previous } = *self {
            if OPEN_FRAMES.with(Cell::get) == 0 {
                unsafe { ffi::zk_heap_enter(previous) };
                return;
            }
            // A guard entered during the call and still open keeps the
            // thread in its heap; its frame leads back to `previous`.
            let guard_open = ENTERED.try_with(|entered| {
                let mut entered = entered.borrow_mut();
                if entered.frames.is_empty() {
                    return false;
                }
                entered.base = previous;
                true
            });
            if guard_open != Ok(true) {
                unsafe { ffi::zk_heap_enter(previous) };
            }
        }
    }
}

impl Drop for Inside {
    #[inline]
    fn drop(&mut self) {
        let id = self.id;
        let left = ENTERED.try_with(|entered| {
            let mut entered = entered.borrow_mut();
            let index = match entered.frames.iter().rposition(|frame| frame.id == id) {
                Some(index) => index,
                None => return,
            };
            entered.frames.remove(index);
            frames_changed(&entered);
            if index == entered.frames.len() {
                let next = entered
                    .frames
                    .last()
                    .map_or(entered.base, |frame| frame.heap);
                unsafe { ffi::zk_heap_enter(next) };
            }
        });
        if left.is_err() {
            // A guard kept in another thread-local, dropped after the
            // frames at thread exit: the thread must leave its heap before
            // the guard's handle goes, since zkmem refuses to destroy a heap
            // a thread is in.
            unsafe { ffi::zk_heap_enter(ptr::null_mut()) };
        }
    }
}

/// The calling thread is in a heap until this is dropped; from
/// [`Heap::enter`].
///
/// Entering is the thread's, so the guard stays on it:
///
/// ```compile_fail,E0277
/// fn send<T: Send>(_: T) {}
/// let heap = zkmem::Heap::new();
/// send(heap.enter());
/// ```
#[must_use = "the heap is left as soon as the guard is dropped"]
pub struct EnterGuard {
    // Dropped first: the thread leaves the heap before the handle goes.
    _inside: Inside,
    heap: Heap,
}

impl fmt::Debug for EnterGuard {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("EnterGuard")
            .field("heap", &self.heap.name())
            .finish()
    }
}

/// A future whose polls and drop run in a heap; from [`Heap::scope`].
///
/// `Send` when the future is, and `'static` when it is, since it holds its
/// own handle to the heap.
pub struct InHeap<F> {
    /// `None` once the future completed: it was dropped in its last poll.
    heap: Option<Heap>,
    /// Boxed, so that the adapter is two words: Tokio moves a task's whole
    /// stage with `memcpy` several times in its life, and the request/reply
    /// workload's future made those copies 600 of a request's 6,800
    /// instructions (callgrind); boxed, they are a sixth of that, and
    /// scoping a request costs about nothing against not scoping it (1.00x
    /// its time, 21 alternating rounds; 1.07x with the future inline).
    /// Dropped by `poll` or `Drop`, inside the heap; `None` after.
    future: Option<Pin<Box<F>>>,
}

impl<F> InHeap<F> {
    /// The heap the future runs in; `None` once it has completed, when the
    /// future and this handle to the heap are dropped.
    pub fn heap(&self) -> Option<&Heap> {
        self.heap.as_ref()
    }
}

impl<F: Future> Future for InHeap<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        // The future is pinned in its box: the adapter itself is Unpin.
        let this = self.get_mut();
        let raw = match &this.heap {
            Some(heap) => heap.raw(),
            None => panic!("zkmem: InHeap polled after it completed"),
        };
        // Declared before the guard, so dropped after it, on a panic too:
        // a heap's last handle may destroy it, which zkmem refuses while a
        // thread is in it.
        let mut completed_heap = None;
        let inside = Within::new(raw);
        let future = match &mut this.future {
            Some(future) => future,
            None => panic!("zkmem: InHeap polled after it completed"),
        };
        let poll = future.as_mut().poll(context);
        if poll.is_ready() {
            // Dropped now, in the heap the poll entered, rather than by a
            // `Drop` that would enter it again (a sixth of what a scoped
            // task cost on the request/reply workload). The handle is taken
            // first, so a drop that panics leaves nothing to drop twice.
            completed_heap = this.heap.take();
            drop(this.future.take());
        }
        drop(inside);
        drop(completed_heap);
        poll
    }
}

impl<F> Drop for InHeap<F> {
    fn drop(&mut self) {
        // Not completed: what the future frees and allocates as it drops is
        // the heap's too.
        if let (Some(heap), Some(future)) = (&self.heap, self.future.take()) {
            let _inside = Within::new(heap.raw());
            drop(future);
        }
    }
}

impl<F> fmt::Debug for InHeap<F> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("InHeap")
            .field("heap", &self.heap.as_ref().map(Heap::name))
            .finish()
    }
}
