use std::alloc::{handle_alloc_error, Layout};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::mem::{self, ManuallyDrop};
use std::ops::{Deref, DerefMut};
use std::os::raw::c_void;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use crate::{ffi, outside_heaps};

/// A pool of `T` values: allocation and free are a push or pop on the
/// calling thread's cache of free slots, with every freed slot reused.
///
/// `Pool` is a reference-counted handle: clones share the pool, and each
/// [`PoolBox`] holds a handle too, so the pool (and its memory) goes away
/// when the last handle and the last box are gone. Boxes may be dropped on
/// any thread. Holding that handle costs a box an atomic increment when it
/// is made and a decrement when it is dropped, on a count all threads
/// share.
///
/// ```
/// use std::thread;
///
/// let pool = zkmem::Pool::<[u64; 8]>::new();
/// let boxed = pool.alloc([7; 8]);
/// let sum = thread::spawn(move || boxed.iter().sum::<u64>()).join().unwrap();
/// assert_eq!(sum, 56);
/// assert_eq!(pool.stats().live, 0);
/// ```
///
/// Allocating moves `T` values into slots that any thread may drop, so a
/// pool crosses threads only when `T` is `Send`:
///
/// ```compile_fail,E0277
/// fn send<T: Send>(_: T) {}
/// send(zkmem::Pool::<std::rc::Rc<u8>>::new());
/// ```
pub struct Pool<T> {
    shared: Arc<PoolShared>,
    _values: PhantomData<*const T>,
}

// Safety: the C pool is thread-safe; what crosses threads through a pool
// is T values, allocated on one thread and dropped on another.
unsafe impl<T: Send> Send for Pool<T> {}
unsafe impl<T: Send> Sync for Pool<T> {}

struct PoolShared {
    raw: NonNull<ffi::zk_pool_t>,
    name: Option<Box<str>>,
}

unsafe impl Send for PoolShared {}
unsafe impl Sync for PoolShared {}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // The last handle or box: no other call on the pool can be under
        // way, which zk_pool_destroy asks.
        unsafe { ffi::zk_pool_destroy(self.raw.as_ptr()) };
    }
}

/// A pool's figures, from [`Pool::stats`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// `size_of::<T>()` (1 for a zero-sized type).
    pub object_size: usize,
    /// A slot's size, with alignment padding.
    pub slot_size: usize,
    /// Values allocated.
    pub allocations: u64,
    /// Values freed.
    pub frees: u64,
    /// Allocations that reused a freed slot.
    pub reused: u64,
    /// `reused / allocations`, 0 to 1.
    pub reuse_rate: f64,
    /// Values live now: `allocations - frees`.
    pub live: u64,
    /// The highest `live` seen (sampled on the pool's slow paths).
    pub peak_live: u64,
    /// Average of the recent high-water marks of `live`, which sizes the
    /// cache of free slots.
    pub predicted_live: u64,
    /// Free slots held for reuse.
    pub cached: u64,
    /// Memory spans the pool holds.
    pub pages: u64,
    /// Bytes of those spans.
    pub bytes_committed: usize,
    /// `bytes_committed / (live * object_size)`.
    pub fragmentation: f64,
}

/// Options of a new [`Pool`], from [`Pool::builder`].
pub struct PoolBuilder<T> {
    name: Option<String>,
    preallocate: usize,
    max_cached: usize,
    _values: PhantomData<*const T>,
}

impl<T> PoolBuilder<T> {
    /// A name for the pool, returned by [`Pool::name`].
    pub fn name(mut self, name: &str) -> PoolBuilder<T> {
        self.name = Some(name.to_string());
        self
    }

    /// Slots to carve at creation, rather than on first use.
    pub fn preallocate(mut self, values: usize) -> PoolBuilder<T> {
        self.preallocate = values;
        self
    }

    /// A cap on the free slots kept for reuse; by default the pool sizes
    /// its cache from the live counts it has seen.
    pub fn max_cached(mut self, values: usize) -> PoolBuilder<T> {
        self.max_cached = values;
        self
    }

    /// Creates the pool.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a type larger than a pool's objects may be
    /// (1 MiB) or a name containing NUL; out of memory, also when every one
    /// of zkmem's 1,024 pool slots is taken.
    pub fn build(self) -> io::Result<Pool<T>> {
        let c_name = crate::c_name(&self.name, "pool")?;
        let options = ffi::zk_pool_options_t {
            alignment: mem::align_of::<T>(),
            preallocate: self.preallocate,
            name: c_name.as_ref().map_or(ptr::null(), |name| name.as_ptr()),
            max_cached: self.max_cached,
            constructor: None,
            constructor_arg: ptr::null_mut(),
        };
        // zkmem's pools have no zero-sized objects; a byte per value keeps
        // each box's address its own.
        let size = mem::size_of::<T>().max(1);
        let raw = NonNull::new(unsafe { ffi::zk_pool_create(size, &options) })
            .ok_or_else(io::Error::last_os_error)?;
        // Lives as long as the pool: not in a task heap the caller is in.
        let shared = outside_heaps(|| {
            Arc::new(PoolShared {
                raw,
                name: self.name.as_deref().map(Box::from),
            })
        });
        Ok(Pool {
            shared,
            _values: PhantomData,
        })
    }
}

impl<T> Pool<T> {
    /// A pool with default options.
    ///
    /// # Panics
    ///
    /// When the pool cannot be created (see [`PoolBuilder::build`]).
    pub fn new() -> Pool<T> {
        Pool::builder()
            .build()
            .expect("zkmem: cannot create a pool")
    }

    /// Options: name, slots preallocated, cache cap.
    pub fn builder() -> PoolBuilder<T> {
        PoolBuilder {
            name: None,
            preallocate: 0,
            max_cached: 0,
            _values: PhantomData,
        }
    }

    /// The name given to the builder, or `"pool"`.
    pub fn name(&self) -> &str {
        self.shared.name.as_deref().unwrap_or("pool")
    }

    /// Moves `value` into a slot of the pool.
    ///
    /// Out of memory, the process ends through
    /// [`handle_alloc_error`], as for a `Box`.
    #[inline]
    pub fn alloc(&self, value: T) -> PoolBox<T> {
        match self.try_alloc(value) {
            Ok(boxed) => boxed,
            Err(_) => handle_alloc_error(Layout::new::<T>()),
        }
    }

    /// Moves `value` into a slot of the pool, or gives it back when zkmem
    /// has no memory for one.
    #[inline]
    pub fn try_alloc(&self, value: T) -> Result<PoolBox<T>, T> {
        let slot = unsafe { ffi::zk_pool_alloc(self.shared.raw.as_ptr()) } as *mut T;
        let slot = match NonNull::new(slot) {
            Some(slot) => slot,
            None => return Err(value),
        };
        unsafe { slot.as_ptr().write(value) };
        Ok(PoolBox {
            value: slot,
            pool: self.shared.clone(),
            _owns: PhantomData,
        })
    }

    /// The pool's figures now (exact when the threads using it are quiet).
    pub fn stats(&self) -> PoolStats {
        let mut stats = ffi::zk_pool_stats_t {
            name: ptr::null(),
            object_size: 0,
            slot_size: 0,
            allocations: 0,
            frees: 0,
            reused: 0,
            reuse_rate: 0.0,
            live: 0,
            peak_live: 0,
            predicted_live: 0,
            cached: 0,
            pages: 0,
            bytes_committed: 0,
            fragmentation: 0.0,
        };
        let status = unsafe { ffi::zk_pool_stats(self.shared.raw.as_ptr(), &mut stats) };
        assert_eq!(status, 0, "zkmem: statistics of a live pool");
        PoolStats {
            object_size: stats.object_size,
            slot_size: stats.slot_size,
            allocations: stats.allocations,
            frees: stats.frees,
            reused: stats.reused,
            reuse_rate: stats.reuse_rate,
            live: stats.live,
            peak_live: stats.peak_live,
            predicted_live: stats.predicted_live,
            cached: stats.cached,
            pages: stats.pages,
            bytes_committed: stats.bytes_committed,
            fragmentation: stats.fragmentation,
        }
    }
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Pool<T> {
        Pool {
            shared: self.shared.clone(),
            _values: PhantomData,
        }
    }
}

impl<T> Default for Pool<T> {
    fn default() -> Pool<T> {
        Pool::new()
    }
}

impl<T> fmt::Debug for Pool<T> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Pool")
            .field("name", &self.name())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A `T` in a slot of a [`Pool`]; dropping it drops the value and gives the
/// slot back, from any thread.
///
/// `Send` and `Sync` as a `Box<T>` would be:
///
/// ```compile_fail,E0277
/// fn send<T: Send>(_: T) {}
/// let pool = zkmem::Pool::new();
/// send(pool.alloc(std::rc::Rc::new(1)));
/// ```
///
/// ```compile_fail,E0277
/// fn sync<T: Sync>(_: &T) {}
/// let pool = zkmem::Pool::new();
/// sync(&pool.alloc(std::cell::Cell::new(1)));
/// ```
pub struct PoolBox<T> {
    value: NonNull<T>,
    pool: Arc<PoolShared>,
    _owns: PhantomData<T>,
}

// Safety: a PoolBox owns its T as a Box does; the pool handle it holds is
// thread-safe and only used to free the slot.
unsafe impl<T: Send> Send for PoolBox<T> {}
unsafe impl<T: Sync> Sync for PoolBox<T> {}

impl<T> PoolBox<T> {
    /// Moves the value out and gives the slot back.
    pub fn into_inner(boxed: PoolBox<T>) -> T {
        let boxed = ManuallyDrop::new(boxed);
        let value = unsafe { boxed.value.as_ptr().read() };
        // Safety: read once, and `boxed` is never dropped.
        let pool = unsafe { ptr::read(&boxed.pool) };
        unsafe { ffi::zk_pool_free(pool.raw.as_ptr(), boxed.value.as_ptr() as *mut _) };
        value
    }
}

impl<T> Drop for PoolBox<T> {
    fn drop(&mut self) {
        // The slot goes back even when T's drop panics; the pool handle
        // goes after it, with the box's other fields.
        struct Free(*mut ffi::zk_pool_t, *mut c_void);
        impl Drop for Free {
            fn drop(&mut self) {
                unsafe { ffi::zk_pool_free(self.0, self.1) };
            }
        }
        let _free = Free(self.pool.raw.as_ptr(), self.value.as_ptr() as *mut c_void);
        unsafe { ptr::drop_in_place(self.value.as_ptr()) };
    }
}

impl<T> Deref for PoolBox<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        unsafe { self.value.as_ref() }
    }
}

impl<T> DerefMut for PoolBox<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        unsafe { self.value.as_mut() }
    }
}

impl<T: fmt::Debug> fmt::Debug for PoolBox<T> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, formatter)
    }
}

impl<T: fmt::Display> fmt::Display for PoolBox<T> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, formatter)
    }
}

impl<T> AsRef<T> for PoolBox<T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T> AsMut<T> for PoolBox<T> {
    fn as_mut(&mut self) -> &mut T {
        self
    }
}
