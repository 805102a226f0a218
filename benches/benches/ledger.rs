//! The ledger: batched appends (durable per batch), proof generation and
//! verification in a log of one million entries, checkpoint signing and
//! verification. Durable one-at-a-time appends through gRPC are measured
//! with `sovra-load --mode consent` (see benches/README.md).

// Benchmark harness code: a failed setup should abort the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sovra_ledger::entry::{Decision, Disclosure, FieldAccess, Reveal};
use sovra_ledger::{
    leaf_hash, verify_checkpoint, verify_consistency, verify_inclusion, Body, Digest, Ledger,
    LedgerOptions, LogKey,
};

const BIG: u64 = 1_000_000;

// As in the server binary: glibc malloc showed up at 13% of append time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn reveal(i: u64) -> Body {
    Body::FieldRevealed(Reveal {
        tenant: "default".into(),
        subject: Digest([(i % 251) as u8; 32]),
        actor: "crm-backend".into(),
        role: "service".into(),
        purpose: "customer_service".into(),
        decision: Decision::Allowed,
        reason: String::new(),
        fields: vec![
            FieldAccess {
                field: "phone".into(),
                disclosure: Disclosure::Plaintext,
            },
            FieldAccess {
                field: "national_id".into(),
                disclosure: Disclosure::Masked,
            },
        ],
        lineage: sovra_ledger::Digest([0x5a; 32]),
    })
}

fn key() -> LogKey {
    LogKey::from_seed("sovra.bench/ledger", &[9; 32]).unwrap()
}

fn open(dir: &std::path::Path) -> Ledger {
    Ledger::open(
        dir,
        key(),
        LedgerOptions {
            verify_on_open: false,
            ..LedgerOptions::default()
        },
    )
    .unwrap()
}

fn appends(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let batch: Vec<Body> = (0..1000).map(reveal).collect();
    let mut g = c.benchmark_group("ledger_append");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("batch_of_1000_durable", |b| {
        b.iter(|| {
            l.append(&batch).unwrap();
            l.flush().unwrap();
        })
    });
    g.finish();
}

fn big_log() -> (tempfile::TempDir, Ledger, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let t = Instant::now();
    let mut first = Vec::new();
    for chunk in 0..BIG / 10_000 {
        let bodies: Vec<Body> = (0..10_000).map(|i| reveal(chunk * 10_000 + i)).collect();
        let a = l.append(&bodies).unwrap();
        if chunk == 0 {
            first = a[0].bytes.clone();
        }
    }
    l.flush().unwrap();
    eprintln!(
        "built a log of {BIG} entries in {:.1} s ({:.0} entries/s, 10,000 per batch)",
        t.elapsed().as_secs_f64(),
        BIG as f64 / t.elapsed().as_secs_f64()
    );
    (dir, l, first)
}

fn proofs(c: &mut Criterion) {
    let (_dir, l, _) = big_log();
    let root = l.tree_root(BIG).unwrap();
    let mut g = c.benchmark_group("ledger_proofs_1m");
    let mut i = 0u64;
    g.bench_function("inclusion_generate", |b| {
        b.iter(|| {
            i = (i + 7_919_993) % BIG;
            l.inclusion_proof(i, BIG).unwrap()
        })
    });
    let idx = 777_777;
    let (bytes, _) = l.entry(idx).unwrap();
    let leaf = leaf_hash(&bytes);
    let proof = l.inclusion_proof(idx, BIG).unwrap();
    g.bench_function("inclusion_verify", |b| {
        b.iter(|| verify_inclusion(idx, BIG, &leaf, &proof, &root).unwrap())
    });
    let old = 654_321;
    let old_root = l.tree_root(old).unwrap();
    g.bench_function("consistency_generate", |b| {
        b.iter(|| l.consistency_proof(old, BIG).unwrap())
    });
    let cproof = l.consistency_proof(old, BIG).unwrap();
    g.bench_function("consistency_verify", |b| {
        b.iter(|| verify_consistency(old, BIG, &cproof, &old_root, &root).unwrap())
    });
    g.finish();

    let k = key();
    let mut g = c.benchmark_group("ledger_checkpoint");
    g.bench_function("root_and_sign_at_1m", |b| {
        b.iter(|| k.sign_checkpoint(BIG, &l.tree_root(BIG).unwrap()).unwrap())
    });
    let cp = k.sign_checkpoint(BIG, &root).unwrap();
    let vkey = k.verifier_key();
    g.bench_function("verify", |b| {
        b.iter(|| verify_checkpoint(&cp.note, &vkey).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("ledger_open");
    g.sample_size(10);
    drop(l);
    g.bench_function("verify_all_1m_entries", |b| {
        b.iter_batched(
            || (),
            |()| {
                Ledger::open(_dir.path(), key(), LedgerOptions::default()).unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, appends, proofs);
criterion_main!(benches);
