//! Property tests: every encrypted result equals the plaintext reference on
//! the same quantised inputs, for random data, models and cohorts. The seed
//! is fixed, so a failure reproduces. The key, encryption and decryption
//! here are the test's own (core_crypto), standing in for the vault's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::spec::{self, AggregateOp, FeatureInfo, Model};
use sovra_sandbox::{run, EncryptedOutput, EvaluationMaterial, JobInput, Limits, Progress};
use sovra_testkit::fhe::Key;
use std::collections::BTreeMap;

const FEATURES: [&str; 3] = ["budget", "purchase_count", "whitepaper_dwell_s"];
const MAX: i64 = 1023;

fn catalog() -> Vec<FeatureInfo> {
    FEATURES
        .iter()
        .map(|f| FeatureInfo {
            name: (*f).into(),
            max: MAX as u32,
        })
        .collect()
}

/// Customers' quantised features (one Vec per feature, slot-indexed over
/// `blocks` blocks) and a cohort.
#[derive(Debug, Clone)]
struct Data {
    values: Vec<Vec<i64>>,
    cohort: Vec<u32>,
}

fn data(blocks: usize) -> impl Strategy<Value = Data> {
    let n = blocks * SLOTS;
    (
        prop::collection::vec(prop::collection::vec(0..=MAX, n), FEATURES.len()),
        prop::collection::btree_set(0..n as u32, 1..200),
    )
        .prop_map(|(values, cohort)| Data {
            values,
            cohort: cohort.into_iter().collect(),
        })
}

fn input(key: &Key, d: &Data) -> JobInput {
    let blocks = d.values[0].len() / SLOTS;
    let mut columns = BTreeMap::new();
    for (f, v) in FEATURES.iter().zip(&d.values) {
        columns.insert(
            (*f).to_string(),
            (0..blocks)
                .map(|b| Some(key.encrypt(&v[b * SLOTS..(b + 1) * SLOTS])))
                .collect(),
        );
    }
    let mut cohort = vec![Vec::new(); blocks];
    for &s in &d.cohort {
        cohort[s as usize / SLOTS].push((s as usize % SLOTS) as u16);
    }
    JobInput { columns, cohort }
}

fn features_of(d: &Data, slot: u32) -> BTreeMap<String, i64> {
    FEATURES
        .iter()
        .zip(&d.values)
        .map(|(f, v)| ((*f).to_string(), v[slot as usize]))
        .collect()
}

fn weights() -> impl Strategy<Value = (i64, Vec<i64>)> {
    (
        -100_000i64..100_000,
        prop::collection::vec(-4000i64..4000, FEATURES.len()),
    )
}

fn weights_toml(w: &[i64]) -> String {
    FEATURES
        .iter()
        .zip(w)
        .map(|(f, w)| format!("{f} = {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn per_customer(key: &Key, out: &EncryptedOutput) -> BTreeMap<u32, i64> {
    let EncryptedOutput::PerCustomer(blocks) = out else {
        panic!("expected per-customer output");
    };
    let mut m = BTreeMap::new();
    for b in blocks {
        let v = key.decrypt(&b.score);
        for &s in &b.slots {
            m.insert((b.block * SLOTS + usize::from(s)) as u32, v[usize::from(s)]);
        }
    }
    m
}

fn config() -> Config {
    Config {
        cases: 6,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5017a),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn linear_and_logistic_equal_the_reference(d in data(2), (bias, w) in weights(), logistic in any::<bool>()) {
        let key = Key::new();
        let kind = if logistic { "kind = \"logistic\"\nscale = 500" } else { "kind = \"linear\"" };
        let text = format!(
            "name = \"p\"\npurpose = \"lead_scoring\"\noutput = \"per_customer\"\nexplain = 2\n[model]\n{kind}\nbias = {bias}\nweights = {{ {} }}\n",
            weights_toml(&w)
        );
        let spec = spec::parse(&text, &catalog()).unwrap();
        let out = run(&EvaluationMaterial::new(), &spec, &input(&key, &d), &Progress::default(), &Limits::default()).unwrap();
        let got = per_customer(&key, &out);
        let linear = spec.linear().unwrap();
        prop_assert_eq!(got.len(), d.cohort.len());
        for &s in &d.cohort {
            prop_assert_eq!(got[&s], linear.reference(&features_of(&d, s)), "slot {}", s);
        }
        // The per-feature terms are exact too (the gate ranks them).
        let EncryptedOutput::PerCustomer(blocks) = &out else { unreachable!() };
        for b in blocks {
            for (f, ct) in &b.terms {
                let v = key.decrypt(ct.as_ref().unwrap());
                let wi = linear.terms.iter().find(|(n, _)| n == f).unwrap().1;
                let fi = FEATURES.iter().position(|n| n == f).unwrap();
                for &s in &b.slots {
                    let slot = b.block * SLOTS + usize::from(s);
                    prop_assert_eq!(v[usize::from(s)], wi * d.values[fi][slot]);
                }
            }
        }
        if let Model::Logistic { .. } = spec.model() {
            prop_assert!(matches!(out, EncryptedOutput::PerCustomer(_)));
        }
    }

    #[test]
    fn aggregates_equal_the_reference(d in data(3), (bias, w) in weights(), op in 0..3u8, over_model in any::<bool>()) {
        let key = Key::new();
        let op_name = ["count", "sum", "mean"][op as usize];
        let over = match (op, over_model) {
            (0, _) => String::new(),
            (_, false) => "feature = \"budget\"\n".into(),
            (_, true) => format!("[model.linear]\nbias = {}\nweights = {{ {} }}\n", bias / 100, weights_toml(&w.iter().map(|x| x / 10).collect::<Vec<_>>())),
        };
        let text = format!(
            "name = \"a\"\npurpose = \"analytics\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"{op_name}\"\n{over}"
        );
        let spec = spec::parse(&text, &catalog()).unwrap();
        let out = run(&EvaluationMaterial::new(), &spec, &input(&key, &d), &Progress::default(), &Limits::default()).unwrap();
        let EncryptedOutput::Aggregate(a) = out else { panic!("expected an aggregate") };
        prop_assert_eq!(a.cohort_size, d.cohort.len() as u64);
        let got: i64 = a.chunks.iter().map(|c| key.decrypt_lwe(c)).sum();
        let want: i64 = match spec.linear() {
            None => 0,
            Some(m) => d.cohort.iter().map(|&s| m.reference(&features_of(&d, s))).sum(),
        };
        prop_assert_eq!(got, want);
        if let Model::Aggregate { op: AggregateOp::Count, .. } = spec.model() {
            prop_assert!(a.chunks.is_empty());
        }
    }
}

#[test]
fn a_sum_over_more_customers_than_one_chunk_holds_is_split_and_exact() {
    // 16,383 customers fit the noise bound of one chunk; 3 full blocks
    // (6,144) of a model with Σ|w| = 4 need 2 chunks of at most 4,095.
    let key = Key::new();
    let n = 3 * SLOTS;
    let values: Vec<Vec<i64>> = (0..FEATURES.len())
        .map(|f| (0..n).map(|i| ((i * 7 + f * 13) % 1024) as i64).collect())
        .collect();
    let d = Data {
        values,
        cohort: (0..n as u32).collect(),
    };
    let text = "name = \"s\"\npurpose = \"analytics\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\n[model.linear]\nweights = { budget = 3, purchase_count = -1 }\n";
    let spec = spec::parse(text, &catalog()).unwrap();
    assert_eq!(spec.aggregate_chunk(), 4095);
    let out = run(
        &EvaluationMaterial::new(),
        &spec,
        &input(&key, &d),
        &Progress::default(),
        &Limits::default(),
    )
    .unwrap();
    let EncryptedOutput::Aggregate(a) = out else {
        panic!()
    };
    assert!(a.chunks.len() >= 2);
    let got: i64 = a.chunks.iter().map(|c| key.decrypt_lwe(c)).sum();
    let want: i64 = (0..n).map(|i| 3 * d.values[0][i] - d.values[1][i]).sum();
    assert_eq!(got, want);
}
