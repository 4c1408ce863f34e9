//! Allocation workloads of a real async runtime: Tokio's multi-thread
//! scheduler moving heap-allocated messages between tasks.
//!
//!   zkmem-tokio-bench pipeline [--ops N] [--threads N] [--seed N]
//!   zkmem-tokio-bench reqrep   [--ops N] [--threads N] [--seed N]
//!
//! Shared by two binaries. zkmem-tokio-bench (main.rs) allocates through
//! Rust's default global allocator, which is the C library's malloc, so the
//! allocator under test is chosen from outside with LD_PRELOAD exactly as
//! for bench_malloc. zkmem-tokio-bench-crate (../crate/main.rs) has zkmem's
//! crate as its global allocator, and may run each request in a task heap.
//! Both print one JSON line in bench_malloc's shape (ops, seconds,
//! ops_per_s, ns_per_op, peak_rss_kib, extras).
//!
//! Unlike bench_malloc, what is timed here includes the runtime's own work
//! (wake-ups, channel bookkeeping, task cells) and the programs' writes into
//! the buffers: the figure says how much the allocator changes a whole
//! program, not the cost of one call.

use std::env;
use std::fs;
use std::future::Future;
use std::process;
use std::time::Instant;

use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// What a binary is: its name, the "alloc" of its JSON line, and the ways
/// it can run reqrep's request tasks (`--scope`, first the default).
pub struct Binary {
    pub name: &'static str,
    pub alloc: &'static str,
    pub scopes: &'static [(&'static str, &'static str)],
}

/// Spawns reqrep's task per request: the binaries differ in how.
pub trait Requests: Clone + Send + Sync + 'static {
    fn spawn<F>(&self, request: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static;
}

/// xorshift64* seeded through splitmix64, as in bench/workloads/bench.h, so
/// that every allocator sees the same sizes without an external crate.
#[derive(Clone)]
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Prng {
        Prng(mix(seed).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [low, high]; the modulo bias is irrelevant at these ranges.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + (self.next() >> 11) % (high - low + 1)
    }

    /// 16 B .. 4 KiB - 1, log-uniform by octave: as many small messages as
    /// large ones, the shape of real programs' size histograms.
    fn message_size(&mut self) -> usize {
        let base = 1u64 << self.range(4, 11);
        (base + self.range(0, base - 1)) as usize
    }
}

fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn fail(message: &str) -> ! {
    let program = env::args().next().unwrap_or_default();
    let program = program.rsplit('/').next().unwrap_or("zkmem-tokio-bench");
    eprintln!("{}: {}", program, message);
    process::exit(1);
}

struct Options {
    workload: String,
    ops: u64,
    threads: usize,
    seed: u64,
    scope: &'static str,
}

fn usage(binary: &Binary) -> String {
    let mut usage = format!(
        "usage: {} pipeline|reqrep [--ops N] [--threads N] [--seed N]{}
  pipeline  messages of 16 B-4 KiB through a chain of tasks and bounded
            channels, modified and sometimes reallocated on the way
            (op = one message delivered; default 400000)
  reqrep    a task spawned per request, a String request to a server task,
            a fresh Vec reply through a oneshot (op = one round trip;
            default 200000)
  --threads N  runtime worker threads (default 2)
  --seed N     PRNG seed (default 1)",
        binary.name,
        if binary.scopes.is_empty() {
            ""
        } else {
            " [--scope S]"
        }
    );
    if !binary.scopes.is_empty() {
        usage.push_str("\n  --scope S    how reqrep runs its request tasks:");
        for (scope, what) in binary.scopes {
            usage.push_str(&format!("\n    {:<9}  {}", scope, what));
        }
    }
    usage
}

fn parse_options(binary: &Binary) -> Options {
    let usage = usage(binary);
    let arguments: Vec<String> = env::args().skip(1).collect();
    if arguments.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", usage);
        process::exit(0);
    }
    let mut options = Options {
        workload: String::new(),
        ops: 0,
        threads: 2,
        seed: 1,
        scope: binary.scopes.first().map_or("", |(scope, _)| *scope),
    };
    let mut index = 0;
    while index < arguments.len() {
        let argument = arguments[index].as_str();
        if !argument.starts_with("--") {
            if !options.workload.is_empty() {
                fail(&format!("one workload only, got '{}'\n{}", argument, usage));
            }
            options.workload = argument.to_string();
            index += 1;
            continue;
        }
        // The driver passes --json to every workload; this one has no other
        // output format, so it accepts and ignores it.
        if argument == "--json" {
            index += 1;
            continue;
        }
        let value = match arguments.get(index + 1) {
            Some(value) => value,
            None => fail(&format!("{}: missing value", argument)),
        };
        if argument == "--scope" && !binary.scopes.is_empty() {
            options.scope = match binary.scopes.iter().find(|(scope, _)| scope == value) {
                Some((scope, _)) => scope,
                None => fail(&format!("unknown scope '{}'\n{}", value, usage)),
            };
            index += 2;
            continue;
        }
        let number: u64 = match value.parse() {
            Ok(number) => number,
            Err(_) => fail(&format!("{} wants a number, got '{}'", argument, value)),
        };
        match argument {
            "--ops" => options.ops = number,
            "--threads" => options.threads = number.clamp(1, 1024) as usize,
            "--seed" => options.seed = number,
            _ => fail(&format!("unknown option '{}'\n{}", argument, usage)),
        }
        index += 2;
    }
    match options.workload.as_str() {
        "pipeline" if options.ops == 0 => options.ops = 400_000,
        "reqrep" if options.ops == 0 => options.ops = 200_000,
        "pipeline" | "reqrep" => {}
        "" => fail(&usage),
        other => fail(&format!("unknown workload '{}'\n{}", other, usage)),
    }
    let default_scope = binary.scopes.first().map_or("", |(scope, _)| *scope);
    if options.workload == "pipeline" && options.scope != default_scope {
        fail("--scope applies to reqrep's request tasks only");
    }
    options
}

// ---- pipeline ------------------------------------------------------------

/// Tasks after the source: three that modify, the sink that checks.
const PIPELINE_STAGES: usize = 4;
/// A few dozen messages in flight per hop: enough that stages run in
/// bursts on different workers, few enough to stay in the caches.
const PIPELINE_CHANNEL: usize = 64;
const HEADER: usize = 8;

/// The length a message has when it reaches the sink: stage 1 appends 64
/// bytes to every fourth message, stage 3 halves every sixteenth.
fn delivered_length(sequence: u64, size: usize) -> usize {
    let mut length = size;
    if sequence % 4 == 0 {
        length += 64;
    }
    if sequence % 16 == 2 {
        length = (length / 2).max(HEADER + 1);
    }
    length
}

async fn pipeline_source(tx: mpsc::Sender<Vec<u8>>, mut prng: Prng, messages: u64) {
    for sequence in 0..messages {
        let size = prng.message_size();
        let mut message = Vec::with_capacity(size);
        message.extend_from_slice(&sequence.to_le_bytes());
        message.resize(size, sequence as u8);
        if tx.send(message).await.is_err() {
            fail("pipeline: a stage hung up");
        }
    }
}

async fn pipeline_stage(stage: usize, mut rx: mpsc::Receiver<Vec<u8>>, tx: mpsc::Sender<Vec<u8>>) {
    while let Some(mut message) = rx.recv().await {
        let sequence = u64::from_le_bytes(message[..HEADER].try_into().unwrap());
        // Every stage leaves a mark the sink checks: the payload is real,
        // written memory, not a pointer passed along untouched.
        message[HEADER] = message[HEADER].wrapping_add(stage as u8);
        match stage {
            // Grows past the exact capacity the source asked for: realloc.
            1 if sequence % 4 == 0 => message.extend_from_slice(&[stage as u8; 64]),
            // A fresh copy on this worker, the original (allocated on
            // whichever worker ran the source) freed here.
            2 if sequence % 8 == 1 => message = message.as_slice().to_vec(),
            // Shrinks in place or moves: realloc downwards.
            3 if sequence % 16 == 2 => {
                let length = (message.len() / 2).max(HEADER + 1);
                message.truncate(length);
                message.shrink_to_fit();
            }
            _ => {}
        }
        if tx.send(message).await.is_err() {
            fail("pipeline: a stage hung up");
        }
    }
}

/// Regenerates the source's sizes from the same seed to check each message.
async fn pipeline_sink(mut rx: mpsc::Receiver<Vec<u8>>, mut prng: Prng, messages: u64) -> u64 {
    // The first byte after the header collects 1 + 2 + 3 from the stages.
    let marks: u8 = (1..PIPELINE_STAGES as u8).sum();
    let mut checksum = 0u64;
    for expected in 0..messages {
        let message = match rx.recv().await {
            Some(message) => message,
            None => fail("pipeline: the chain ended early"),
        };
        let size = prng.message_size();
        let sequence = u64::from_le_bytes(message[..HEADER].try_into().unwrap());
        if sequence != expected
            || message.len() != delivered_length(sequence, size)
            || message[HEADER] != (sequence as u8).wrapping_add(marks)
        {
            fail(&format!(
                "pipeline: message {} arrived as {} with {} bytes",
                expected,
                sequence,
                message.len()
            ));
        }
        checksum = checksum.wrapping_add(message.len() as u64);
    }
    checksum
}

/// One chain per worker thread, each its own seed: source -> 3 stages ->
/// sink, each task spawned, so the scheduler spreads them over the workers
/// and a message is freed on another thread than the one that made it.
async fn pipeline_run(chains: usize, messages: u64, seed: u64) -> u64 {
    let mut sinks = Vec::with_capacity(chains);
    for chain in 0..chains {
        let count = messages / chains as u64 + u64::from((chain as u64) < messages % chains as u64);
        let prng = Prng::new(seed ^ mix(chain as u64 + 1));
        let (source_tx, mut rx) = mpsc::channel(PIPELINE_CHANNEL);
        tokio::spawn(pipeline_source(source_tx, prng.clone(), count));
        for stage in 1..PIPELINE_STAGES {
            let (tx, next_rx) = mpsc::channel(PIPELINE_CHANNEL);
            tokio::spawn(pipeline_stage(stage, rx, tx));
            rx = next_rx;
        }
        sinks.push(tokio::spawn(pipeline_sink(rx, prng, count)));
    }
    let mut checksum = 0u64;
    for sink in sinks {
        checksum = checksum.wrapping_add(sink.await.unwrap_or_else(|_| fail("sink panicked")));
    }
    checksum
}

// ---- reqrep --------------------------------------------------------------

/// Requests in flight at once: the client spawns this many tasks, then
/// waits for all of them before the next wave.
const REQREP_WAVE: usize = 256;
const REQREP_CHANNEL: usize = 128;

struct Request {
    id: u64,
    body: String,
    reply: oneshot::Sender<Vec<u8>>,
}

fn reply_size(id: u64) -> usize {
    let mut prng = Prng::new(id);
    prng.message_size()
}

/// Parses the id out of the request line, as a server would, and answers
/// with a fresh buffer sized by the id.
async fn reqrep_server(mut rx: mpsc::Receiver<Request>) {
    while let Some(request) = rx.recv().await {
        let id: u64 = request
            .body
            .strip_prefix("GET /items/")
            .and_then(|rest| rest.split('?').next())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| fail(&format!("reqrep: bad request '{}'", request.body)));
        if id != request.id {
            fail("reqrep: request id mismatch");
        }
        let size = reply_size(id);
        let mut reply = Vec::with_capacity(size);
        reply.extend_from_slice(&id.to_le_bytes());
        reply.resize(size, id as u8);
        // A client that gave up is not an error of the allocator's.
        let _ = request.reply.send(reply);
    }
}

async fn reqrep_client(id: u64, server: mpsc::Sender<Request>) -> usize {
    let (reply_tx, reply_rx) = oneshot::channel();
    let body = format!("GET /items/{}?client={} HTTP/1.1", id, id % 97);
    let request = Request {
        id,
        body,
        reply: reply_tx,
    };
    if server.send(request).await.is_err() {
        fail("reqrep: the server hung up");
    }
    let reply = reply_rx.await.unwrap_or_else(|_| fail("reqrep: no reply"));
    if reply.len() != reply_size(id)
        || reply[..HEADER] != id.to_le_bytes()
        || reply[reply.len() - 1] != id as u8
    {
        fail(&format!("reqrep: wrong reply to request {}", id));
    }
    reply.len()
}

/// One server task per worker thread; a client task per request.
async fn reqrep_run<R: Requests>(spawner: R, servers: usize, requests: u64, first_id: u64) -> u64 {
    let mut senders = Vec::with_capacity(servers);
    let mut server_handles = Vec::with_capacity(servers);
    for _ in 0..servers {
        let (tx, rx) = mpsc::channel(REQREP_CHANNEL);
        senders.push(tx);
        server_handles.push(tokio::spawn(reqrep_server(rx)));
    }
    let mut checksum = 0u64;
    let mut wave = Vec::with_capacity(REQREP_WAVE);
    let mut id = first_id;
    let end = first_id + requests;
    while id < end {
        while id < end && wave.len() < REQREP_WAVE {
            let server = senders[(id % servers as u64) as usize].clone();
            wave.push(spawner.spawn(reqrep_client(id, server)));
            id += 1;
        }
        for client in wave.drain(..) {
            let length = client.await.unwrap_or_else(|_| fail("client panicked"));
            checksum = checksum.wrapping_add(length as u64);
        }
    }
    drop(senders);
    for server in server_handles {
        server.await.unwrap_or_else(|_| fail("server panicked"));
    }
    checksum
}

// ---- main ----------------------------------------------------------------

/// VmHWM: the process's own peak (getrusage would report the driver's,
/// inherited across exec).
fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn run<R: Requests>(
    runtime: &Runtime,
    options: &Options,
    spawner: &R,
    ops: u64,
    seed: u64,
) -> (f64, u64) {
    let threads = options.threads;
    let workload = options.workload.clone();
    let spawner = spawner.clone();
    let started = Instant::now();
    // Spawned, not run by block_on itself: the driving task then lives on a
    // worker, and its spawns go to that worker's queue as in a server.
    let checksum = runtime.block_on(async move {
        let task = tokio::spawn(async move {
            if workload == "pipeline" {
                pipeline_run(threads, ops, seed).await
            } else {
                reqrep_run(spawner, threads, ops, seed.wrapping_mul(1 << 20)).await
            }
        });
        task.await.unwrap_or_else(|_| fail("workload panicked"))
    });
    (started.elapsed().as_secs_f64(), checksum)
}

/// The binary's main: `spawner` makes reqrep's request-task spawner for
/// the `--scope` chosen.
pub fn main<R: Requests>(binary: Binary, spawner: impl FnOnce(&str) -> R) {
    let options = parse_options(&binary);
    let spawner = spawner(options.scope);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .build()
        .unwrap_or_else(|error| fail(&format!("runtime: {}", error)));
    // A short warm-up, as in bench_malloc: the figure describes the steady
    // state, not the first page faults of the allocator and the runtime.
    run(
        &runtime,
        &options,
        &spawner,
        options.ops / 16 + 1,
        options.seed ^ 0x5eed,
    );
    let (seconds, checksum) = run(&runtime, &options, &spawner, options.ops, options.seed);
    let seconds = seconds.max(1e-9);
    let (unit, shape) = if options.workload == "pipeline" {
        (
            "message",
            format!(
                "\"chains\":{},\"stages\":{},\"channel\":{}",
                options.threads, PIPELINE_STAGES, PIPELINE_CHANNEL
            ),
        )
    } else {
        (
            "request",
            format!(
                "\"servers\":{},\"wave\":{},\"channel\":{}",
                options.threads, REQREP_WAVE, REQREP_CHANNEL
            ),
        )
    };
    let scope = if binary.scopes.is_empty() {
        String::new()
    } else {
        format!(",\"scope\":\"{}\"", options.scope)
    };
    println!(
        "{{\"scenario\":\"tokio-{}\",\"alloc\":\"{}\",\"ops\":{},\"seconds\":{:.6},\
\"ops_per_s\":{:.1},\"ns_per_op\":{:.3},\"peak_rss_kib\":{},\"unit\":\"{}\",\
\"threads\":{},{}{},\"checksum\":{}}}",
        options.workload,
        binary.alloc,
        options.ops,
        seconds,
        options.ops as f64 / seconds,
        seconds * 1e9 / options.ops as f64,
        peak_rss_kib(),
        unit,
        options.threads,
        shape,
        scope,
        checksum
    );
}
