//! The Tokio workloads (workloads.rs) with Rust's default global allocator,
//! the C library's malloc: the allocator under test is the one LD_PRELOAD
//! puts in its place.

mod workloads;

use std::future::Future;

use tokio::task::JoinHandle;

#[derive(Clone)]
struct Spawn;

impl workloads::Requests for Spawn {
    fn spawn<F>(&self, request: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tokio::spawn(request)
    }
}

fn main() {
    workloads::main(
        workloads::Binary {
            name: "zkmem-tokio-bench",
            alloc: "malloc",
            scopes: &[],
        },
        |_| Spawn,
    );
}
