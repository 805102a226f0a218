//! Sandbox costs on packed TFHE ciphertexts (k = 1, N = 2048): key
//! generation, block encryption (the write path), a 17-feature linear score
//! per block of 2,048 customers including the gate's decryption, and the
//! encrypted sum of one feature over 10,000 customers including the final
//! decryption. Per-customer figures are the per-block time / 2,048.
//! Bytes at rest and key sizes are printed before the runs.
//!
//! With `--features fheuint-baseline`, the same run also measures tfhe's
//! high-level FheUint32 API (default parameters) on one scalar
//! multiplication and one addition, and times one 17-feature score with it
//! once: the baseline the packed evaluation is compared against.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion};
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::spec::{self, FeatureInfo};
use sovra_sandbox::{run, EncryptedOutput, EvaluationMaterial, JobInput, Limits, Progress};
use sovra_testkit::fhe::Key;
use std::collections::BTreeMap;

fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..17).map(|i| format!("f{i:02}")).collect();
    let catalog: Vec<FeatureInfo> = names
        .iter()
        .map(|n| FeatureInfo {
            name: n.clone(),
            max: 1023,
        })
        .collect();
    let key = Key::new();
    let values: Vec<i64> = (0..SLOTS as i64).map(|i| (i * 7919) % 1024).collect();
    let block = key.encrypt_fresh(&values);
    let stored = block.to_bytes().expect("serialise");
    eprintln!(
        "sandbox: a stored block is {} bytes for {SLOTS} values = {:.2} bytes per encrypted feature value; the secret key is {} coefficients ({} bytes packed, {} wrapped)",
        stored.len(),
        stored.len() as f64 / SLOTS as f64,
        SLOTS,
        SLOTS / 8,
        SLOTS / 8 + 12 + 16
    );

    let mut g = c.benchmark_group("sandbox");
    g.sample_size(20);
    g.bench_function("keygen_glwe_secret_key", |b| b.iter(Key::new));
    g.bench_function("encrypt_block_2048_values", |b| {
        b.iter(|| key.encrypt_fresh(&values))
    });

    // 17-feature linear score of 2,048 customers, then the gate decrypts.
    let weights = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n} = {}", (i as i64 % 7) - 3 + 10))
        .collect::<Vec<_>>()
        .join(", ");
    let linear = spec::parse(
        &format!("name = \"b\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nbias = -100\nweights = {{ {weights} }}\n"),
        &catalog,
    )
    .expect("spec");
    let mut columns = BTreeMap::new();
    for n in &names {
        columns.insert(n.clone(), vec![Some(key.encrypt_fresh(&values))]);
    }
    let one_block = JobInput {
        columns,
        cohort: vec![(0..SLOTS as u16).collect()],
    };
    let m = EvaluationMaterial::new();
    g.bench_function("linear17_block_2048_customers_with_gate_decryption", |b| {
        b.iter(|| {
            let out = run(
                &m,
                &linear,
                &one_block,
                &Progress::default(),
                &Limits::default(),
            )
            .expect("run");
            let EncryptedOutput::PerCustomer(blocks) = out else {
                unreachable!()
            };
            key.decrypt(&blocks[0].score)
        })
    });
    g.bench_function("linear17_block_2048_customers_eval_only", |b| {
        b.iter(|| {
            run(
                &m,
                &linear,
                &one_block,
                &Progress::default(),
                &Limits::default(),
            )
        })
    });

    // Sum of one feature over 10,000 customers (5 blocks), then decrypt.
    let sum = spec::parse(
        "name = \"s\"\npurpose = \"analytics\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nfeature = \"f00\"\n",
        &catalog,
    )
    .expect("spec");
    let n = 10_000usize;
    let blocks = n.div_ceil(SLOTS);
    let mut cohort = vec![Vec::new(); blocks];
    for i in 0..n {
        cohort[i / SLOTS].push((i % SLOTS) as u16);
    }
    let ten_k = JobInput {
        columns: [(
            "f00".to_owned(),
            (0..blocks)
                .map(|_| Some(key.encrypt_fresh(&values)))
                .collect(),
        )]
        .into(),
        cohort,
    };
    g.bench_function("sum_one_feature_10000_customers_with_decryption", |b| {
        b.iter(|| {
            let out = run(&m, &sum, &ten_k, &Progress::default(), &Limits::default()).expect("run");
            let EncryptedOutput::Aggregate(a) = out else {
                unreachable!()
            };
            a.chunks.iter().map(|c| key.decrypt_lwe(c)).sum::<i64>()
        })
    });
    g.finish();
    #[cfg(feature = "fheuint-baseline")]
    fheuint_baseline(c);
}

#[cfg(feature = "fheuint-baseline")]
fn fheuint_baseline(c: &mut Criterion) {
    use tfhe::prelude::*;
    use tfhe::{generate_keys, set_server_key, ConfigBuilder, FheUint32};
    let (ck, sk) = generate_keys(ConfigBuilder::default().build());
    set_server_key(sk);
    let a = FheUint32::encrypt(700u32, &ck);
    let b = FheUint32::encrypt(300u32, &ck);
    let mut g = c.benchmark_group("fheuint_baseline");
    g.sample_size(10);
    g.bench_function("fheuint32_scalar_mul", |bch| bch.iter(|| &a * 7u32));
    g.bench_function("fheuint32_add", |bch| bch.iter(|| &a + &b));
    g.finish();
    let xs: Vec<FheUint32> = (0..17u32)
        .map(|i| FheUint32::encrypt(i * 31, &ck))
        .collect();
    let t = std::time::Instant::now();
    let mut acc = &xs[0] * 3u32;
    for (i, x) in xs.iter().enumerate().skip(1) {
        acc = acc + x * (i as u32 % 7 + 7);
    }
    let elapsed = t.elapsed();
    let score: u32 = acc.decrypt(&ck);
    let want: u32 = (0..17u32)
        .map(|i| i * 31 * if i == 0 { 3 } else { i % 7 + 7 })
        .sum();
    assert_eq!(score, want);
    eprintln!("fheuint_baseline: one 17-feature FheUint32 score (17 scalar multiplications, 16 additions) took {elapsed:.2?}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
