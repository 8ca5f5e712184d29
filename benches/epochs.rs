//! The purge-epoch check a hit makes, as prefix purges accumulate.
//!
//! `cargo bench --bench epochs`. A hit judges its entry against tag, URI and prefix epochs;
//! prefix purges are indexed by their bytes, so the check should cost the same with 0, 10,000
//! or 30,000 prefix purges recorded (issue 10 measured hit throughput falling from 74.8k to
//! 22.6k req/s after 30k prefix purges when they were a list scanned on every hit).

use aisle::storage::epochs::{Epoch, Epochs};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::{Duration, UNIX_EPOCH};

/// A hard purge at `at_ms`.
fn hard(at_ms: u64) -> Epoch {
    Epoch { at_ms, soft: false }
}

/// Epochs holding one unrelated tag purge, so the check runs past its empty fast path.
fn epochs_with_a_tag_purge() -> Epochs {
    let epochs = Epochs::default();
    epochs.purge_tag("other", hard(1_000));
    epochs
}

fn bench(c: &mut Criterion) {
    let created = UNIX_EPOCH + Duration::from_millis(2_000);
    let tags = ["vendors", "vendor:v-42"];
    for n in [0usize, 10_000, 30_000] {
        let epochs = epochs_with_a_tag_purge();
        for i in 0..n {
            epochs.purge_prefix(&format!("api.example/api/weddings/w-{i}/"), hard(1_000));
        }
        c.bench_function(&format!("judge a hit, {n} prefix purges"), |b| {
            b.iter(|| {
                black_box(epochs.judge(
                    black_box(created),
                    tags,
                    black_box("api.example/api/weddings/w-123456/timeline"),
                    7,
                ))
            })
        });
    }
}

/// URI purges (one per unsafe request) are bounded: the newest 65,536 exact, older ones folded
/// into fixed buckets; the check stays one hash lookup and one array read.
fn bench_uris(c: &mut Criterion) {
    let created = UNIX_EPOCH + Duration::from_millis(2_000_000);
    for n in [0u64, 65_536, 1_000_000] {
        let epochs = epochs_with_a_tag_purge();
        for i in 0..n {
            epochs.purge_uri(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), hard(1_000 + i));
        }
        let (exact, folded) = epochs.uri_len();
        c.bench_function(
            &format!("judge a hit, {n} URI purges ({exact} exact, folded: {folded})"),
            |b| b.iter(|| black_box(epochs.judge(black_box(created), ["vendors"], "h/x", 7))),
        );
    }
}

criterion_group!(benches, bench, bench_uris);
criterion_main!(benches);
