//! Pools across threads: values allocated on one thread and dropped on
//! others, each dropped once, the pool alive as long as a box is.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;

use zkmem::{Pool, PoolBox, ZkMem};

#[global_allocator]
static GLOBAL: ZkMem = ZkMem;

struct Order {
    id: u64,
    customer: String,
    lines: [u32; 16],
    drops: &'static AtomicUsize,
}

impl Order {
    fn new(id: u64, drops: &'static AtomicUsize) -> Order {
        let mut lines = [0; 16];
        for (index, line) in lines.iter_mut().enumerate() {
            *line = (id as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(index as u32);
        }
        Order {
            id,
            customer: format!("customer {}", id % 1000),
            lines,
            drops,
        }
    }

    fn check(&self) {
        assert_eq!(self.customer, format!("customer {}", self.id % 1000));
        for (index, &line) in self.lines.iter().enumerate() {
            assert_eq!(
                line,
                (self.id as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(index as u32)
            );
        }
    }
}

impl Drop for Order {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn values_made_on_one_thread_dropped_on_others() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    const ORDERS: u64 = 20_000;
    const CONSUMERS: usize = 3;
    let pool = Pool::<Order>::builder().name("orders").build().unwrap();
    assert_eq!(pool.name(), "orders");
    let mut senders = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let (tx, rx) = mpsc::channel::<PoolBox<Order>>();
        senders.push(tx);
        consumers.push(thread::spawn(move || {
            let mut seen = 0u64;
            for order in rx {
                order.check();
                seen += 1;
            }
            seen
        }));
    }
    let producer_pool = pool.clone();
    let producer = thread::spawn(move || {
        for id in 0..ORDERS {
            let order = producer_pool.alloc(Order::new(id, &DROPS));
            senders[id as usize % CONSUMERS].send(order).unwrap();
        }
    });
    producer.join().unwrap();
    let seen: u64 = consumers
        .into_iter()
        .map(|consumer| consumer.join().unwrap())
        .sum();
    assert_eq!(seen, ORDERS);
    assert_eq!(DROPS.load(Ordering::Relaxed), ORDERS as usize);
    let stats = pool.stats();
    assert_eq!(stats.allocations, ORDERS);
    assert_eq!(stats.frees, ORDERS);
    assert_eq!(stats.live, 0);
    assert_eq!(stats.object_size, std::mem::size_of::<Order>());
}

#[test]
fn boxes_outlive_the_pool_handle() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let pool = Pool::new();
    let orders: Vec<PoolBox<Order>> = (0..1000)
        .map(|id| pool.alloc(Order::new(id, &DROPS)))
        .collect();
    drop(pool);
    let checker = thread::spawn(move || {
        for order in &orders {
            order.check();
        }
        drop(orders);
    });
    checker.join().unwrap();
    assert_eq!(DROPS.load(Ordering::Relaxed), 1000);
}

#[test]
fn slots_keep_the_type_alignment() {
    #[repr(align(256))]
    struct Wide([u8; 300]);
    let pool = Pool::<Wide>::new();
    let values: Vec<PoolBox<Wide>> = (0..500)
        .map(|index| pool.alloc(Wide([index as u8; 300])))
        .collect();
    for (index, value) in values.iter().enumerate() {
        assert_eq!(&**value as *const Wide as usize % 256, 0);
        assert!(value.0.iter().all(|&byte| byte == index as u8));
    }
    assert!(pool.stats().slot_size >= 512);
}

#[test]
fn zero_sized_values_get_slots_of_their_own() {
    let pool = Pool::<()>::new();
    let first = pool.alloc(());
    let second = pool.alloc(());
    assert_ne!(&*first as *const (), &*second as *const ());
    assert_eq!(pool.stats().live, 2);
}

#[test]
fn freed_slots_are_reused_and_values_move_out() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let pool = Pool::<Order>::new();
    let first = pool.alloc(Order::new(1, &DROPS));
    let address = &*first as *const Order;
    drop(first);
    let second = pool
        .try_alloc(Order::new(2, &DROPS))
        .unwrap_or_else(|_| panic!("out of memory"));
    assert_eq!(&*second as *const Order, address);
    let order = PoolBox::into_inner(second);
    assert_eq!(DROPS.load(Ordering::Relaxed), 1);
    order.check();
    assert_eq!(order.id, 2);
    let stats = pool.stats();
    assert_eq!(
        (stats.allocations, stats.frees, stats.reused, stats.live),
        (2, 2, 1, 0)
    );
    drop(order);
    assert_eq!(DROPS.load(Ordering::Relaxed), 2);
}

#[test]
fn a_panicking_drop_still_returns_the_slot() {
    struct Fails;
    impl Drop for Fails {
        fn drop(&mut self) {
            panic!("drop fails");
        }
    }
    let pool = Pool::<Fails>::new();
    let value = pool.alloc(Fails);
    let result = panic::catch_unwind(AssertUnwindSafe(|| drop(value)));
    assert!(result.is_err());
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn mutable_through_the_box() {
    let pool = Pool::<Vec<u32>>::new();
    let mut numbers = pool.alloc(Vec::new());
    numbers.extend(0..100);
    numbers.retain(|n| n % 2 == 0);
    assert_eq!(numbers.len(), 50);
    assert_eq!(format!("{:?}", &numbers[..3]), "[0, 2, 4]");
}
