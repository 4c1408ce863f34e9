//! ZkMem as the global allocator: every layout the standard library can
//! ask for, and a multi-thread Tokio runtime whose tasks pass messages
//! allocated on one worker and freed on another.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use zkmem::ZkMem;

#[global_allocator]
static GLOBAL: ZkMem = ZkMem;

const ALIGNMENTS: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 4096, 1 << 16];
const SIZES: [usize; 14] = [
    1, 3, 7, 8, 15, 16, 17, 100, 1000, 4096, 65_536, 65_537, 300_000, 3_000_000,
];

fn fill(block: *mut u8, size: usize, seed: usize) {
    for index in 0..size {
        unsafe { *block.add(index) = (index.wrapping_mul(31) ^ seed) as u8 };
    }
}

fn check(block: *const u8, size: usize, seed: usize) {
    for index in 0..size {
        let expected = (index.wrapping_mul(31) ^ seed) as u8;
        assert_eq!(
            unsafe { *block.add(index) },
            expected,
            "byte {} of {}",
            index,
            size
        );
    }
}

#[test]
fn every_layout_aligned_and_kept_through_realloc() {
    for &align in &ALIGNMENTS {
        for &size in &SIZES {
            let layout = Layout::from_size_align(size, align).unwrap();
            let block = unsafe { ZkMem.alloc(layout) };
            assert!(!block.is_null());
            assert_eq!(
                block as usize % align,
                0,
                "{} bytes aligned {}",
                size,
                align
            );
            fill(block, size, align);
            let mut current = (block, layout);
            for &new_size in &[size * 2 + 1, size / 2 + 1, size + 100_000, 5] {
                let (block, layout) = current;
                let grown = unsafe { ZkMem.realloc(block, layout, new_size) };
                assert!(!grown.is_null());
                assert_eq!(
                    grown as usize % align,
                    0,
                    "realloc {} -> {} aligned {}",
                    size,
                    new_size,
                    align
                );
                let kept = layout.size().min(new_size);
                check(grown, kept, align);
                fill(grown, new_size, align);
                current = (grown, Layout::from_size_align(new_size, align).unwrap());
            }
            unsafe { ZkMem.dealloc(current.0, current.1) };
        }
    }
}

#[test]
fn zeroed_blocks_are_zero_after_reuse() {
    for &align in &ALIGNMENTS {
        for &size in &SIZES {
            let layout = Layout::from_size_align(size, align).unwrap();
            // A dirty block of the same size freed first, so that the
            // zeroed one can reuse it.
            let dirty = unsafe { ZkMem.alloc(layout) };
            unsafe { dirty.write_bytes(0xa5, size) };
            unsafe { ZkMem.dealloc(dirty, layout) };
            let block = unsafe { ZkMem.alloc_zeroed(layout) };
            assert!(!block.is_null());
            assert_eq!(block as usize % align, 0);
            let bytes = unsafe { std::slice::from_raw_parts(block, size) };
            assert!(
                bytes.iter().all(|&byte| byte == 0),
                "{} bytes aligned {}",
                size,
                align
            );
            unsafe { ZkMem.dealloc(block, layout) };
        }
    }
}

/// Cache-line aligned, to cross threads with an alignment zk_malloc does
/// not give by itself.
#[repr(align(128))]
struct Stamp {
    chain: usize,
    sequence: usize,
}

struct Message {
    sequence: usize,
    payload: Vec<u8>,
    label: String,
    stamp: Box<Stamp>,
}

const CHAINS: usize = 80;
const STAGES: usize = 25;
const MESSAGES: usize = 40;

fn payload_size(chain: usize, sequence: usize) -> usize {
    1 + (chain * 7919 + sequence * 104_729) % 6000
}

fn byte(chain: usize, sequence: usize) -> u8 {
    (chain * 31 + sequence * 17) as u8
}

async fn source(chain: usize, tx: mpsc::Sender<Message>) {
    for sequence in 0..MESSAGES {
        let size = payload_size(chain, sequence);
        let message = Message {
            sequence,
            payload: vec![byte(chain, sequence); size],
            label: format!("chain {} message {}", chain, sequence),
            stamp: Box::new(Stamp { chain, sequence }),
        };
        tx.send(message)
            .await
            .unwrap_or_else(|_| panic!("chain {} closed", chain));
    }
}

/// Checks what the stages before it did, adds its own mark: each stage
/// appends its number (growing the vector) and every third copies the
/// message into fresh allocations made on its own worker.
async fn stage(
    chain: usize,
    number: usize,
    mut rx: mpsc::Receiver<Message>,
    tx: mpsc::Sender<Message>,
) {
    while let Some(mut message) = rx.recv().await {
        let size = payload_size(chain, message.sequence);
        assert_eq!(message.payload.len(), size + number - 1);
        assert_eq!(message.payload[size - 1], byte(chain, message.sequence));
        assert_eq!(message.stamp.chain, chain);
        assert_eq!(&*message.stamp as *const Stamp as usize % 128, 0);
        message.payload.push(number as u8);
        if number % 3 == 0 {
            message = Message {
                sequence: message.sequence,
                payload: message.payload.clone(),
                label: message.label.clone(),
                stamp: Box::new(Stamp {
                    chain,
                    sequence: message.stamp.sequence,
                }),
            };
        }
        tx.send(message)
            .await
            .unwrap_or_else(|_| panic!("chain {} closed", chain));
    }
}

async fn sink(chain: usize, mut rx: mpsc::Receiver<Message>) -> usize {
    let mut received = 0;
    while let Some(message) = rx.recv().await {
        assert_eq!(message.sequence, received);
        let size = payload_size(chain, message.sequence);
        assert!(message.payload[..size]
            .iter()
            .all(|&b| b == byte(chain, message.sequence)));
        let marks: Vec<u8> = (1..STAGES + 1).map(|number| number as u8).collect();
        assert_eq!(&message.payload[size..], &marks[..]);
        assert_eq!(
            message.label,
            format!("chain {} message {}", chain, message.sequence)
        );
        assert_eq!(message.stamp.sequence, message.sequence);
        received += 1;
    }
    received
}

static WORKERS_SEEN: AtomicUsize = AtomicUsize::new(0);

#[test]
fn tokio_tasks_pass_messages_between_workers() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .on_thread_start(|| {
            WORKERS_SEEN.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    let delivered = runtime.block_on(async {
        let mut sinks = Vec::new();
        for chain in 0..CHAINS {
            let (tx, mut rx) = mpsc::channel(4);
            tokio::spawn(source(chain, tx));
            for number in 1..=STAGES {
                let (next_tx, next_rx) = mpsc::channel(4);
                tokio::spawn(stage(chain, number, rx, next_tx));
                rx = next_rx;
            }
            sinks.push(tokio::spawn(sink(chain, rx)));
        }
        let mut delivered = 0;
        for sink in sinks {
            delivered += sink.await.unwrap();
        }
        delivered
    });
    assert_eq!(delivered, CHAINS * MESSAGES);
    assert!(WORKERS_SEEN.load(Ordering::Relaxed) >= 4);
    assert!(zkmem::stats().bytes_live > 0);
}
