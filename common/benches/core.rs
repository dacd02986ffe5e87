//! Micro-benchmarks of the hot pure functions: the digest, the event envelope and the
//! partition choice. `cargo bench -p msghash-common --no-default-features --bench core`
//! (docs/performance.md, "Micro-benchmarks").

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use msghash_common::{partition_for, Digest, MessageHashed};
use std::hint::black_box;
use std::num::NonZeroU32;

fn message(len: usize) -> String {
    "abcdefghijklmnopqrstuvwxyz0123456789"
        .chars()
        .cycle()
        .take(len)
        .collect()
}

fn digest(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest_of");
    for (name, len) in [("16B", 16), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let m = message(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &m, |b, m| {
            b.iter(|| Digest::of(black_box(m)))
        });
    }
    group.finish();

    let hex = Digest::of("foo").to_hex();
    c.bench_function("digest_parse_hex", |b| {
        b.iter(|| Digest::parse(black_box(&hex)))
    });
    let d = Digest::of("foo");
    c.bench_function("digest_to_hex", |b| b.iter(|| black_box(&d).to_hex()));
}

fn envelope(c: &mut Criterion) {
    for (name, len) in [("66B", 66), ("1KiB", 1024)] {
        let event = MessageHashed::new(message(len));
        let value = event.encode();
        let key = event.key().to_vec();
        c.bench_function(&format!("event_encode/{name}"), |b| {
            b.iter(|| black_box(&event).encode())
        });
        c.bench_function(&format!("event_decode/{name}"), |b| {
            b.iter(|| MessageHashed::decode(Some(black_box(&key)), Some(black_box(&value))))
        });
    }
}

fn partition(c: &mut Criterion) {
    let d = Digest::of("foo");
    for count in [8u32, 1024] {
        let n = NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN);
        c.bench_function(&format!("partition_for/{count}"), |b| {
            b.iter(|| partition_for(black_box(&d), black_box(n)))
        });
    }
}

criterion_group!(benches, digest, envelope, partition);
criterion_main!(benches);
