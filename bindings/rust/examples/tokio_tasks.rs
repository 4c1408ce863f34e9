//! A server's requests on a multi-thread Tokio runtime, each handled by a
//! task in a heap of its own with a limit, all of them inside the server's
//! heap. Prints what each request peaked at, and refuses the upload that
//! would pass its request's limit instead of aborting the process.
//!
//!   cargo run --release --example tokio_tasks
//!
//! Exits non-zero if a figure is not what the heaps promise, so the tests
//! run it.

use std::collections::BTreeMap;
use std::process;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use zkmem::{Heap, ZkMem};

#[global_allocator]
static GLOBAL: ZkMem = ZkMem;

/// What one request may hold at once.
const REQUEST_LIMIT: usize = 256 << 10;
/// Requests handled at once; the others wait for a permit.
const CONCURRENT: usize = 4;

enum Request {
    /// Renders `rows` rows of a table as text.
    Items { rows: usize },
    /// Receives a body of `bytes` bytes in 4 KiB chunks.
    Upload { bytes: usize },
    /// Counts words of the stored documents, through the storage task.
    Report,
}

impl Request {
    fn describe(&self) -> String {
        match self {
            Request::Items { rows } => format!("GET /items?rows={}", rows),
            Request::Upload { bytes } => format!("POST /upload ({} bytes)", bytes),
            Request::Report => "GET /report".to_string(),
        }
    }
}

struct Response {
    status: u16,
    body: String,
}

/// The documents a report reads, answered through a oneshot channel, as a
/// database client would be.
type Lookup = (usize, oneshot::Sender<String>);

async fn storage(mut lookups: mpsc::Receiver<Lookup>) {
    while let Some((index, reply)) = lookups.recv().await {
        let document = format!(
            "document {} says hello to the world {} times",
            index,
            index % 7
        );
        let _ = reply.send(document);
    }
}

async fn handle(request: Request, storage: mpsc::Sender<Lookup>) -> Response {
    match request {
        Request::Items { rows } => {
            let mut body = String::new();
            for row in 0..rows {
                body.push_str(&format!(
                    "{:>6} | item {:<20} | {:>8.2}\n",
                    row,
                    row * 37,
                    row as f64 * 1.25
                ));
            }
            Response { status: 200, body }
        }
        Request::Upload { bytes } => {
            let mut received: Vec<u8> = Vec::new();
            let mut left = bytes;
            while left > 0 {
                let chunk = left.min(4096);
                // Past the request's limit the reservation fails: the
                // request is refused, the server goes on.
                if received.try_reserve(chunk).is_err() {
                    return Response {
                        status: 413,
                        body: format!("upload refused after {} bytes", received.len()),
                    };
                }
                received.extend(std::iter::repeat(b'u').take(chunk));
                left -= chunk;
                tokio::task::yield_now().await;
            }
            Response {
                status: 200,
                body: format!("stored {} bytes", received.len()),
            }
        }
        Request::Report => {
            let mut words: BTreeMap<String, usize> = BTreeMap::new();
            for index in 0..20 {
                let (reply, answer) = oneshot::channel();
                if storage.send((index, reply)).await.is_err() {
                    return Response {
                        status: 503,
                        body: "storage is gone".to_string(),
                    };
                }
                let document = answer.await.unwrap_or_default();
                for word in document.split_whitespace() {
                    *words.entry(word.to_string()).or_insert(0) += 1;
                }
            }
            let body = words
                .iter()
                .map(|(word, count)| format!("{} {}", word, count))
                .collect::<Vec<_>>()
                .join("\n");
            Response { status: 200, body }
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("tokio_tasks: {}", message);
    process::exit(1);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap_or_else(|error| fail(&format!("runtime: {}", error)));
    let server = Heap::builder().name("server").build().unwrap();
    // With the status each must get: a vector that doubles holds the old
    // buffer and the new one at once, so 60 KB fit in 256 KiB, 1 MB not.
    let (requests, expected): (Vec<Request>, Vec<u16>) = vec![
        (Request::Items { rows: 10 }, 200),
        (Request::Upload { bytes: 20_000 }, 200),
        (Request::Report, 200),
        (Request::Items { rows: 1000 }, 200),
        (Request::Upload { bytes: 1 << 20 }, 413),
        (Request::Items { rows: 300 }, 200),
        (Request::Upload { bytes: 60_000 }, 200),
        (Request::Report, 200),
    ]
    .into_iter()
    .unzip();

    let served = runtime.block_on(async {
        let (lookups, lookups_rx) = mpsc::channel(16);
        let storage_task = tokio::spawn(storage(lookups_rx));
        let permits = Arc::new(Semaphore::new(CONCURRENT));
        let mut tasks = Vec::new();
        for (id, request) in requests.into_iter().enumerate() {
            let heap = Heap::builder()
                .name(&format!("request {}", id + 1))
                .limit(REQUEST_LIMIT)
                .parent(&server)
                .build()
                .unwrap();
            let what = request.describe();
            let permits = permits.clone();
            let lookups = lookups.clone();
            let task = tokio::spawn(heap.scope(async move {
                let _permit = permits.acquire_owned().await;
                let response = handle(request, lookups).await;
                // Only the status and the body's length leave the task:
                // the body itself goes with the task's memory.
                (response.status, response.body.len())
            }));
            tasks.push((heap, what, task));
        }
        let mut served = Vec::new();
        for (heap, what, task) in tasks {
            let (status, length) = task.await.unwrap_or_else(|_| fail("a request panicked"));
            served.push((heap, what, status, length));
        }
        drop(lookups);
        storage_task
            .await
            .unwrap_or_else(|_| fail("storage panicked"));
        served
    });

    for ((heap, what, status, length), expected) in served.iter().zip(&expected) {
        let stats = heap.stats();
        println!(
            "{:<11} {:<30} {}  {:>7} bytes out  peak {:>7} bytes  refusals {}",
            heap.name(),
            what,
            status,
            length,
            stats.peak_bytes,
            stats.limit_refusals
        );
        if status != expected {
            fail(&format!(
                "{}: status {}, expected {}",
                heap.name(),
                status,
                expected
            ));
        }
        if stats.peak_bytes > REQUEST_LIMIT || (*status == 413) != (stats.limit_refusals > 0) {
            fail(&format!("{}: {:?}", heap.name(), stats));
        }
    }
    let stats = server.stats();
    println!(
        "server      peak {} bytes over all requests, {} bytes live",
        stats.peak_bytes, stats.live_bytes
    );
    if stats.peak_bytes < REQUEST_LIMIT / 2 {
        fail(&format!("server: {:?}", stats));
    }

    // Blocks that the runtime grew during a request's poll (a channel's
    // slots, the workers' lists of deferred wakers) belong to that
    // request's heap, which waits for them; once the runtime is gone, every
    // heap can go.
    drop(served);
    drop(server);
    drop(runtime);
    let waiting = zkmem::reclaim_heaps();
    println!("heaps still waiting for their blocks: {}", waiting);
    if waiting != 0 {
        fail("heaps left after the runtime");
    }
}
