//! Property tests for the bootstrapped models: random decision trees (up to
//! 3 deep, balanced or not) and random histograms over a feature or a
//! linear score, on random customers, decrypt to exactly the plaintext
//! reference on the same quantised inputs. The seed is fixed, so a failure
//! reproduces. Bootstraps are slow, so cases and customers are few; the
//! thresholds are drawn to land on and next to customers' values, where an
//! inexact comparison would show.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use sovra_sandbox::params::{self, SLOTS};
use sovra_sandbox::spec::{self, FeatureInfo, Model};
use sovra_sandbox::{
    run, BootstrapKey, EncryptedOutput, EvaluationMaterial, JobInput, Limits, Progress,
};
use sovra_testkit::fhe::Key;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

const FEATURES: [(&str, i64); 2] = [("budget", 1023), ("visits", 15)];

fn keys() -> &'static (Key, Arc<BootstrapKey>) {
    static KEYS: OnceLock<(Key, Arc<BootstrapKey>)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let k = Key::new();
        let b = Arc::new(k.bootstrap_key());
        (k, b)
    })
}

fn catalog() -> Vec<FeatureInfo> {
    FEATURES
        .iter()
        .map(|(f, m)| FeatureInfo {
            name: (*f).into(),
            max: *m as u32,
        })
        .collect()
}

fn config() -> Config {
    Config {
        cases: 3,
        rng_seed: RngSeed::Fixed(0x50f2a),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Customers in slots 0.. of one block: per feature, their values.
fn input(key: &Key, values: &[Vec<i64>]) -> JobInput {
    let mut columns = BTreeMap::new();
    for ((f, _), v) in FEATURES.iter().zip(values) {
        let mut slots = vec![0i64; SLOTS];
        slots[..v.len()].copy_from_slice(v);
        columns.insert((*f).to_string(), vec![Some(key.encrypt(&slots))]);
    }
    let n = values[0].len() as u16;
    JobInput {
        columns,
        cohort: vec![(0..n).collect()],
    }
}

fn features_of(values: &[Vec<i64>], c: usize) -> BTreeMap<String, i64> {
    FEATURES
        .iter()
        .zip(values)
        .map(|((f, _), v)| ((*f).to_string(), v[c]))
        .collect()
}

/// A written tree: `shape` decides, node by node (pre-order), whether a
/// node above the last level is a split (true) or a leaf.
fn tree_toml(
    depth: usize,
    shape: &mut impl Iterator<Item = bool>,
    pick: &mut impl Iterator<Item = (usize, i64, i64)>,
    path: &str,
    out: &mut String,
) {
    let (f, t, leaf) = pick.next().unwrap_or((0, 0, 0));
    if depth == 0 || (!path.ends_with("tree") && !shape.next().unwrap_or(true)) {
        out.push_str(&format!("[{path}]\nleaf = {leaf}\n"));
        return;
    }
    let (name, max) = FEATURES[f % FEATURES.len()];
    let threshold = t.rem_euclid(max + 2);
    out.push_str(&format!(
        "[{path}]\nfeature = \"{name}\"\nthreshold = {threshold}\n"
    ));
    tree_toml(depth - 1, shape, pick, &format!("{path}.below"), out);
    tree_toml(depth - 1, shape, pick, &format!("{path}.at_least"), out);
}

fn values(n: usize) -> impl Strategy<Value = Vec<Vec<i64>>> {
    (
        prop::collection::vec(0..=FEATURES[0].1, n),
        prop::collection::vec(0..=FEATURES[1].1, n),
    )
        .prop_map(|(a, b)| vec![a, b])
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn encrypted_trees_equal_the_plaintext_reference(
        depth in 1usize..=3,
        shape in prop::collection::vec(any::<bool>(), 16),
        picks in prop::collection::vec((0usize..2, 0i64..1100, -63i64..=63), 16),
        values in values(3),
    ) {
        let (key, bk) = keys();
        // Thresholds on and next to the first customer's values.
        let mut picks = picks;
        for (i, p) in picks.iter_mut().enumerate().take(4) {
            let v = values[p.0 % 2][0];
            p.1 = v + (i as i64 % 2);
        }
        let mut body = String::new();
        tree_toml(depth, &mut shape.into_iter(), &mut picks.into_iter(), "model.tree", &mut body);
        let text = format!(
            "name = \"t\"\npurpose = \"analytics\"\noutput = \"per_customer\"\n[model]\nkind = \"tree\"\n{body}"
        );
        let spec = spec::parse(&text, &catalog()).unwrap();
        let Model::Tree(tree) = spec.model() else { panic!("not a tree") };
        let out = run(
            &EvaluationMaterial::with_bootstrap(bk.clone()),
            &spec,
            &input(key, &values),
            &Progress::default(),
            &Limits::default(),
        )
        .unwrap();
        let EncryptedOutput::PerCustomerValue(got) = out else { panic!("{out:?}") };
        prop_assert_eq!(got.len(), values[0].len());
        for v in got {
            let c = usize::from(v.slot);
            let decrypted = params::decode_at(key.phase(&v.value), sovra_sandbox::tree::OUTPUT_LOG);
            prop_assert_eq!(decrypted, tree.reference(&features_of(&values, c)), "customer {} of\n{}", c, text);
        }
    }

    #[test]
    fn encrypted_histograms_equal_the_plaintext_reference(
        w in (-20i64..=20, -20i64..=20),
        bias in -500i64..500,
        over_feature in any::<bool>(),
        edges in prop::collection::btree_set(-600i64..1100, 1..=2),
        values in values(4),
    ) {
        let (key, bk) = keys();
        let over = if over_feature {
            "feature = \"budget\"".to_owned()
        } else {
            format!("linear = {{ bias = {bias}, weights = {{ budget = {}, visits = {} }} }}", w.0.max(1), w.1)
        };
        let edges: Vec<i64> = edges.into_iter().collect();
        let text = format!(
            "name = \"h\"\npurpose = \"analytics\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\n{over}\nedges = {edges:?}\n"
        );
        let spec = spec::parse(&text, &catalog()).unwrap();
        let linear = spec.linear().unwrap();
        let out = run(
            &EvaluationMaterial::with_bootstrap(bk.clone()),
            &spec,
            &input(key, &values),
            &Progress::default(),
            &Limits::default(),
        )
        .unwrap();
        let EncryptedOutput::Histogram(h) = out else { panic!("{out:?}") };
        for (e, chunks) in edges.iter().zip(&h.at_least) {
            let got: i64 = chunks
                .iter()
                .map(|c| params::decode_at(key.phase(c), sovra_sandbox::tree::OUTPUT_LOG))
                .sum();
            let want = (0..values[0].len())
                .filter(|&c| linear.reference(&features_of(&values, c)) >= *e)
                .count() as i64;
            prop_assert_eq!(got, want, "edge {} of\n{}", e, text);
        }
    }
}

#[test]
fn bootstrapped_jobs_need_the_bootstrap_key_and_report_progress_per_customer() {
    let spec = spec::parse(
        "name = \"t\"\npurpose = \"analytics\"\noutput = \"per_customer\"\n[model]\nkind = \"tree\"\n[model.tree]\nfeature = \"visits\"\nthreshold = 3\nbelow = { leaf = -1 }\nat_least = { leaf = 1 }\n",
        &catalog(),
    )
    .unwrap();
    assert!(spec.needs_bootstrap());
    assert_eq!(spec.bootstraps_per_customer(), 2);
    let input = JobInput {
        columns: BTreeMap::new(),
        cohort: vec![vec![0, 1]],
    };
    let e = run(
        &EvaluationMaterial::new(),
        &spec,
        &input,
        &Progress::default(),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, sovra_sandbox::SandboxError::NoBootstrapKey),
        "{e}"
    );
    // With the key: customers without a stored value read as 0 (< 3).
    let (key, bk) = keys();
    let p = Progress::default();
    let out = run(
        &EvaluationMaterial::with_bootstrap(bk.clone()),
        &spec,
        &input,
        &p,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(p.get(), (2, 2));
    assert_eq!(p.unit(), "customers");
    let EncryptedOutput::PerCustomerValue(v) = out else {
        panic!("{out:?}")
    };
    for c in v {
        assert_eq!(params::decode_at(key.phase(&c.value), 57), -1);
    }
}
