//! Bootstrapped sandbox costs (k = 1, N = 2048, the published
//! V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128): bootstrap-key
//! generation and sizes, one programmable bootstrap (key switch + blind
//! rotation + sample extraction), an exact comparison of a 10-bit feature,
//! the encrypted lead-scoring band of one customer (the logistic model's
//! two band thresholds compared on the encrypted score: what a partner's
//! band histogram costs per customer), and a full depth-4 tree over four
//! 10-bit features per customer. Criterion runs them on one thread, so
//! every figure is per customer per core.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion};
use sovra_sandbox::bootstrap::{extract, Bootstrapper};
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::spec::{self, FeatureInfo};
use sovra_sandbox::{run, EvaluationMaterial, JobInput, Limits, Progress};
use sovra_testkit::fhe::Key;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

fn bench(c: &mut Criterion) {
    // One thread: the figures are per core.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .ok();
    let key = Key::new();
    let t = Instant::now();
    let bk = key.bootstrap_key();
    let keygen = t.elapsed();
    let (ksk, bsk) = bk.byte_sizes();
    eprintln!(
        "sandbox: bootstrap key generation {keygen:.2?} (one thread); key-switching key {:.1} MB, Fourier bootstrapping key {:.1} MB",
        ksk as f64 / 1e6,
        bsk as f64 / 1e6
    );
    let bk = Arc::new(bk);
    let names = ["f0", "f1", "f2", "f3"];
    let small_names = ["s0", "s1", "s2", "s3"];
    let catalog: Vec<FeatureInfo> = names
        .iter()
        .map(|n| FeatureInfo {
            name: (*n).into(),
            max: 1023,
        })
        .chain(small_names.iter().map(|n| FeatureInfo {
            name: (*n).into(),
            max: 15,
        }))
        .chain([
            FeatureInfo {
                name: "budget".into(),
                max: 1023,
            },
            FeatureInfo {
                name: "purchase_count".into(),
                max: 255,
            },
            FeatureInfo {
                name: "whitepaper_dwell_s".into(),
                max: 1023,
            },
        ])
        .collect();
    let values: Vec<i64> = (0..SLOTS as i64).map(|i| (i * 7919) % 1024).collect();
    let block = key.encrypt(&values);

    let mut g = c.benchmark_group("sandbox_bootstrap");
    g.sample_size(10);
    let mut bs = Bootstrapper::new(&bk);
    let x = extract(block.glwe(), 1);
    let small = key.encrypt(&[5i64; 4]);
    let xs = extract(small.glwe(), 0);
    g.bench_function("one_bootstrap", |b| {
        b.iter(|| bs.at_least(&xs, 0, 15, 3, 60))
    });
    g.bench_function("compare_10bit_feature_5_bootstraps", |b| {
        b.iter(|| bs.at_least(&x, 0, 1023, 300, 60))
    });

    let mut columns = BTreeMap::new();
    for n in names
        .iter()
        .chain(&["budget", "purchase_count", "whitepaper_dwell_s"])
    {
        columns.insert((*n).to_owned(), vec![Some(key.encrypt(&values))]);
    }
    let small_values: Vec<i64> = values.iter().map(|v| v % 16).collect();
    for n in &small_names {
        columns.insert((*n).to_owned(), vec![Some(key.encrypt(&small_values))]);
    }
    let one = JobInput {
        columns,
        cohort: vec![vec![7]],
    };
    let m = EvaluationMaterial::with_bootstrap(bk.clone());

    // The lead-scoring model's bands (p ≥ 0.4, p ≥ 0.7 at scale 1000) as
    // thresholds on the encrypted score.
    let band = spec::parse(
        "name = \"bands\"\npurpose = \"analytics\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nedges = [-405, 848]\n[model.linear]\nbias = -3499\nweights = { budget = 7, purchase_count = 53, whitepaper_dwell_s = 35 }\n",
        &catalog,
    )
    .unwrap();
    eprintln!(
        "sandbox: lead-scoring band per customer = {} bootstraps",
        band.bootstraps_per_customer()
    );
    g.bench_function("lead_score_band_one_customer", |b| {
        b.iter(|| run(&m, &band, &one, &Progress::default(), &Limits::default()).unwrap())
    });

    // A full depth-4 tree (15 splits, 16 leaves) over four features, with
    // 10-bit features (0..1023) and with 4-bit ones (0..15).
    let depth4 = |names: &[&str; 4], step: i64| {
        let mut tree = String::new();
        let mut frontier = vec!["model.tree".to_owned()];
        for depth in 0..4 {
            let mut next = Vec::new();
            for (i, path) in frontier.iter().enumerate() {
                tree.push_str(&format!(
                    "[{path}]\nfeature = \"{}\"\nthreshold = {}\n",
                    names[(depth + i) % 4],
                    step / 2 + step * ((i + depth) % 4) as i64
                ));
                next.push(format!("{path}.below"));
                next.push(format!("{path}.at_least"));
            }
            frontier = next;
        }
        for (i, path) in frontier.iter().enumerate() {
            tree.push_str(&format!("[{path}]\nleaf = {}\n", i as i64 - 8));
        }
        spec::parse(
            &format!("name = \"t\"\npurpose = \"analytics\"\noutput = \"per_customer\"\n[model]\nkind = \"tree\"\n{tree}"),
            &catalog,
        )
        .unwrap()
    };
    for (label, names, step) in [
        ("tree_depth4_10bit_features_one_customer", &names, 200),
        ("tree_depth4_4bit_features_one_customer", &small_names, 4),
    ] {
        let tree = depth4(names, step);
        eprintln!(
            "sandbox: {label}: {} bootstraps",
            tree.bootstraps_per_customer()
        );
        g.bench_function(label, |b| {
            b.iter(|| run(&m, &tree, &one, &Progress::default(), &Limits::default()).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
