//! The contract runtime's durable timers with 100,000 pending: arming one
//! (a logged write to the due-time-keyed tree), cancelling it, and finding
//! the timers due now (a range scan from the tree's start), on the real
//! engine and its write-ahead log (not synced per operation: a commit is
//! one fsync per group, measured elsewhere).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use sovra_vault::crypto::keys::RootKey;
use sovra_vault::engine::contract_runtime::{timer_key, TIMER_DEADLINE};
use sovra_vault::engine::Engine;
use sovra_vault::schema::Schema;

const PENDING: u64 = 100_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), RootKey::generate(), Schema::default_crm()).unwrap();
    // 100,000 timers due over the next 28 hours.
    let base = sovra_vault::clock::now_ms() + 60_000;
    for chunk in (0..PENDING).collect::<Vec<_>>().chunks(1_000) {
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = chunk
            .iter()
            .map(|i| {
                (
                    timer_key(base + (*i as i64) * 1_000, "bench", *i, "obligation"),
                    Some(vec![TIMER_DEADLINE]),
                )
            })
            .collect();
        engine.rt_write(&writes).unwrap();
    }
    assert_eq!(engine.pending_timers() as u64, PENDING);
    let mut g = c.benchmark_group("contract_timers_100k_pending");
    let mut n = PENDING;
    g.bench_function("arm_and_cancel", |b| {
        b.iter(|| {
            n += 1;
            let k = timer_key(
                base + (n as i64 % PENDING as i64) * 1_000 + 7,
                "bench",
                n,
                "x",
            );
            engine
                .rt_write(&[(k.clone(), Some(vec![TIMER_DEADLINE]))])
                .unwrap();
            engine.rt_write(&[(k, None)]).unwrap();
        })
    });
    g.bench_function("next_due", |b| b.iter(|| engine.next_timer().unwrap()));
    g.bench_function("due_now_none", |b| {
        b.iter(|| engine.due_timers(base - 1, 256).unwrap())
    });
    g.bench_function("due_now_256", |b| {
        b.iter(|| engine.due_timers(base + 300_000, 256).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
