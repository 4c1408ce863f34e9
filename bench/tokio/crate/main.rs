//! The Tokio workloads (workloads.rs) with zkmem's crate as Rust's global
//! allocator, as a Rust program adopts it, rather than under LD_PRELOAD;
//! with `--scope`, each of reqrep's request tasks runs in a task heap
//! (`Heap::scope`), which is what that costs.

#[path = "../src/workloads.rs"]
mod workloads;

use std::future::Future;

use tokio::task::JoinHandle;
use zkmem::Heap;

#[global_allocator]
static GLOBAL: zkmem::ZkMem = zkmem::ZkMem;

#[derive(Clone)]
enum Scope {
    None,
    /// One heap for every request: entering and leaving it at each poll.
    Shared(Heap),
    /// A heap per request, created with the task and destroyed after it.
    Task,
}

impl workloads::Requests for Scope {
    fn spawn<F>(&self, request: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Scope::None => tokio::spawn(request),
            Scope::Shared(heap) => tokio::spawn(heap.scope(request)),
            Scope::Task => tokio::spawn(Heap::new().scope(request)),
        }
    }
}

fn main() {
    workloads::main(
        workloads::Binary {
            name: "zkmem-tokio-bench-crate",
            alloc: "zkmem-crate",
            scopes: &[
                ("none", "spawned as they are"),
                ("shared", "each in Heap::scope of one heap for all requests"),
                ("task", "each in Heap::scope of a heap of its own"),
            ],
        },
        |scope| match scope {
            "shared" => Scope::Shared(Heap::builder().name("requests").build().unwrap()),
            "task" => Scope::Task,
            _ => Scope::None,
        },
    );
}
