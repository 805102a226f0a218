//! Malformed, out-of-range, oversized and hostile specs and ciphertexts are
//! refused with a message naming what is wrong; nothing panics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovra_sandbox::spec::{self, FeatureInfo, MAX_SPEC_BYTES};
use sovra_sandbox::workload;
use sovra_sandbox::{FeatureBlock, SandboxError};

fn catalog() -> Vec<FeatureInfo> {
    ["budget", "purchase_count", "whitepaper_dwell_s"]
        .iter()
        .map(|f| FeatureInfo {
            name: (*f).into(),
            max: 1023,
        })
        .collect()
}

fn refused(text: &str, needle: &str) {
    match spec::parse(text, &catalog()) {
        Err(SandboxError::InvalidSpec(e)) => {
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            )
        }
        other => panic!("expected a refusal mentioning {needle}, got {other:?}"),
    }
}

const HEAD: &str = "name = \"j\"\npurpose = \"analytics\"\n";

#[test]
fn malformed_and_out_of_range_specs() {
    refused("not toml at all [", "spec");
    refused("name = 5", "spec");
    refused(
        &format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"forest\"\n"),
        "unknown variant",
    );
    refused(&format!("{HEAD}output = \"everything\"\n[model]\nkind = \"linear\"\nweights = {{ budget = 1 }}\n"), "unknown variant");
    refused(&format!("{HEAD}output = \"per_customer\"\nsneaky = 1\n[model]\nkind = \"linear\"\nweights = {{ budget = 1 }}\n"), "unknown field");
    refused(
        &format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ }}\n"),
        "1 to 32 features",
    );
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ salary = 1 }}\n"), "not an encrypted feature");
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ budget = 70000 }}\n"), "outside");
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nbias = 2000000000\nweights = {{ budget = 1 }}\n"), "bias");
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ budget = 9000, purchase_count = 9000 }}\n"), "noise bound");
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"logistic\"\nscale = 0\nweights = {{ budget = 1 }}\n"), "scale");
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"logistic\"\nscale = 10\nweights = {{ budget = 1 }}\n[model.bands]\nhigh = 0.3\nmedium = 0.5\n"), "bands");
    refused(&format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"linear\"\nweights = {{ budget = 1 }}\n"), "aggregate model");
    refused(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nfeature = \"budget\"\n"), "aggregate` output");
    refused(
        &format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\n"),
        "exactly one",
    );
    refused(&format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"count\"\nfeature = \"budget\"\n"), "counts the cohort");
    refused(&format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"budget\"\n"), "needs `edges`");
    refused(&format!("{HEAD}output = \"per_customer\"\nexplain = 9\n[model]\nkind = \"linear\"\nweights = {{ budget = 1 }}\n"), "explain");
    refused("name = \"../../etc\"\npurpose = \"analytics\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { budget = 1 }\n", "name");
    refused("name = \"j\"\npurpose = \"Robert'); DROP\"\noutput = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = { budget = 1 }\n", "purpose");
    refused(&"#".repeat(MAX_SPEC_BYTES + 1), "more than");
}

#[test]
fn spec_hash_ignores_layout_but_not_content() {
    let a = spec::parse(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ budget = 1, purchase_count = 2 }}\n"), &catalog()).unwrap();
    let b = spec::parse(&format!("# comment\n{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\n[model.weights]\npurchase_count = 2\nbudget = 1\n"), &catalog()).unwrap();
    let c = spec::parse(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ budget = 1, purchase_count = 3 }}\n"), &catalog()).unwrap();
    assert_eq!(a.sha256(), b.sha256());
    assert_ne!(a.sha256(), c.sha256());
}

#[test]
fn corrupted_and_hostile_blocks_are_refused() {
    for bytes in [
        Vec::new(),
        vec![0u8; 10],
        vec![0xffu8; 4096],
        vec![7u8; 40_000],
    ] {
        let e = FeatureBlock::from_bytes(&bytes, "block 0 of feature `budget`").unwrap_err();
        assert!(matches!(e, SandboxError::BadCiphertext(_)), "{e}");
        assert!(e.to_string().contains("block 0 of feature `budget`"), "{e}");
    }
}

#[test]
fn the_shipped_workloads_load_and_a_tampered_manifest_does_not() {
    let w = workload::builtin(&catalog()).unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!(w[0].id, "lead_scoring");
    assert_eq!(w[0].spec.purpose(), "lead_scoring");
    assert_eq!(w[1].id, "lead_tier");
    assert!(w[1].spec.needs_bootstrap());
    // Three 10-bit comparisons (5 bootstraps each) and two leaf pairs.
    assert_eq!(w[1].spec.bootstraps_per_customer(), 17);
    let manifest = include_str!("../workloads/lead_scoring.toml");
    let spec_text = include_str!("../workloads/lead_scoring.spec.toml");
    let tampered = spec_text.replace("budget = ", "budget = 1");
    let e = workload::load(manifest, &tampered, &catalog()).unwrap_err();
    assert!(e.to_string().contains("spec_sha256"), "{e}");
    let lying = manifest.replace("\"whitepaper_dwell_s\"", "\"budget\"");
    let e = workload::load(&lying, spec_text, &catalog()).unwrap_err();
    assert!(e.to_string().contains("features"), "{e}");
}

const TREE: &str = "output = \"per_customer\"\n[model]\nkind = \"tree\"\n";

/// A tree `depth` splits deep along its `at_least` side.
fn deep_tree(depth: usize) -> String {
    let mut t = String::new();
    let mut path = "model.tree".to_owned();
    for _ in 0..depth {
        t.push_str(&format!(
            "[{path}]\nfeature = \"budget\"\nthreshold = 10\nbelow = {{ leaf = 1 }}\n"
        ));
        path.push_str(".at_least");
    }
    t.push_str(&format!("[{path}]\nleaf = 2\n"));
    format!("{HEAD}{TREE}{t}")
}

#[test]
fn oversized_and_malformed_trees_are_refused() {
    assert!(spec::parse(&deep_tree(6), &catalog()).is_ok());
    refused(&deep_tree(7), "at most 6 splits deep");
    // A hostile nesting far beyond any limit: refused, no stack overflow.
    let hostile = deep_tree(400);
    match spec::parse(&hostile, &catalog()) {
        Err(SandboxError::InvalidSpec(_)) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nleaf = 64\n"),
        "within ±63",
    );
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nleaf = 1\nfeature = \"budget\"\n"),
        "either `leaf = VALUE`",
    );
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = 3\nbelow = {{ leaf = 1 }}\n"),
        "model.tree",
    );
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nfeature = \"salary\"\nthreshold = 3\nbelow = {{ leaf = 1 }}\nat_least = {{ leaf = 0 }}\n"),
        "not an encrypted feature",
    );
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = 9999999999\nbelow = {{ leaf = 1 }}\nat_least = {{ leaf = 0 }}\n"),
        "thresholds must be within",
    );
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = 3\nbelow = {{ leaf = 1, colour = 2 }}\nat_least = {{ leaf = 0 }}\n"),
        "unknown field",
    );
    refused(
        &format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = \"high\"\nbelow = {{ leaf = 1 }}\nat_least = {{ leaf = 0 }}\n"),
        "spec",
    );
    refused(
        &format!(
            "{HEAD}output = \"aggregate\"\n[model]\nkind = \"tree\"\n[model.tree]\nleaf = 1\n"
        ),
        "aggregate model",
    );
    refused(
        &format!("{HEAD}explain = 2\n{TREE}[model.tree]\nleaf = 1\n"),
        "no per-feature terms",
    );
}

#[test]
fn malformed_histograms_are_refused() {
    let h = |rest: &str| {
        format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\n{rest}")
    };
    refused(&h("feature = \"budget\"\n"), "needs `edges`");
    refused(&h("feature = \"budget\"\nedges = []\n"), "1 to 16 edges");
    refused(
        &h("feature = \"budget\"\nedges = [5, 5]\n"),
        "strictly increasing",
    );
    refused(
        &h("feature = \"budget\"\nedges = [9, 5]\n"),
        "strictly increasing",
    );
    refused(
        &h(&format!(
            "feature = \"budget\"\nedges = {:?}\n",
            (0..17).collect::<Vec<_>>()
        )),
        "1 to 16 edges",
    );
    refused(&h("feature = \"budget\"\nedges = [4000000000]\n"), "within");
    refused(&h("edges = [1]\n"), "exactly one");
    refused(
        &h("linear = { weights = { budget = 2000, purchase_count = 100 } }\nedges = [1]\n"),
        "Σ|weight| must be at most 2048",
    );
    refused(
        &format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nfeature = \"budget\"\nedges = [1]\n"),
        "only a `histogram` has edges",
    );
    let ok = spec::parse(&h("feature = \"budget\"\nedges = [100, 500]\n"), &catalog()).unwrap();
    assert!(ok.needs_bootstrap());
    // Two 10-bit comparisons: 5 bootstraps each.
    assert_eq!(ok.bootstraps_per_customer(), 10);
}

/// Every numeric field of a spec, at the integer extremes: refused with a
/// message naming the bound (or the TOML parser's range), never accepted
/// and never a panic. `i64::MIN` matters most: its `abs()` wraps to itself
/// in release builds, which is how a leaf of −2^63 once passed the ±63
/// check.
#[test]
fn every_numeric_bound_holds_at_the_integer_extremes() {
    let extremes: Vec<String> = [
        i64::MIN,
        i64::MIN + 1,
        -1 - (1 << 30),
        (1 << 30) + 1,
        i64::MAX,
    ]
    .iter()
    .map(|v| v.to_string())
    .chain(["18446744073709551615".to_owned()]) // u64::MAX: not a TOML integer
    .collect();
    let lin = |bias: &str, w: &str| {
        format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nbias = {bias}\nweights = {{ budget = {w} }}\n")
    };
    let logistic = |scale: &str| {
        format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"logistic\"\nscale = {scale}\nweights = {{ budget = 1 }}\n")
    };
    let agg = |bias: &str, w: &str| {
        format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"sum\"\nlinear = {{ bias = {bias}, weights = {{ budget = {w} }} }}\n")
    };
    let hist = |e: &str| {
        format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"budget\"\nedges = [{e}]\n")
    };
    let hist2 = |e: &str| {
        format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"budget\"\nedges = [0, {e}]\n")
    };
    let leaf = |v: &str| format!("{HEAD}{TREE}[model.tree]\nleaf = {v}\n");
    let split_leaf = |v: &str| {
        format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = 3\nbelow = {{ leaf = {v} }}\nat_least = {{ leaf = 0 }}\n")
    };
    let threshold = |v: &str| {
        format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = {v}\nbelow = {{ leaf = 1 }}\nat_least = {{ leaf = 0 }}\n")
    };
    for v in &extremes {
        let big = v.len() > 19; // u64::MAX: the parser refuses it
        let why = |bound: &str| {
            if big {
                "spec".to_owned()
            } else {
                bound.to_owned()
            }
        };
        refused(&lin(v, "1"), &why("bias"));
        refused(&lin("0", v), &why("outside"));
        refused(&logistic(v), &why("scale"));
        refused(&agg(v, "1"), &why("bias"));
        refused(&agg("0", v), &why("outside"));
        refused(&hist(v), &why("within"));
        if v.starts_with('-') {
            // Negative edges are refused for their size before order.
            refused(&hist2(v), &why("within"));
        }
        refused(&leaf(v), &why("within ±63"));
        refused(&split_leaf(v), &why("within ±63"));
        refused(&threshold(v), &why("thresholds must be within"));
    }
    // The just-inside and just-outside values of each bound.
    refused(&leaf("-64"), "within ±63");
    assert!(spec::parse(&leaf("-63"), &catalog()).is_ok());
    assert!(spec::parse(&leaf("63"), &catalog()).is_ok());
    refused(&lin("0", "-65537"), "outside");
    // Within ±2^16 but over the noise bound (Σ|weight| < 2^14).
    refused(&lin("0", "-65536"), "noise bound");
    assert!(spec::parse(&lin("0", "-16383"), &catalog()).is_ok());
    refused(&lin("-1073741825", "1"), "bias");
    assert!(spec::parse(&lin("-1073741824", "1"), &catalog()).is_ok());
    refused(&threshold("-1073741825"), "thresholds must be within");
    assert!(spec::parse(&threshold("-1073741824"), &catalog()).is_ok());
    refused(&logistic("1048577"), "scale");
    assert!(spec::parse(&logistic("1048576"), &catalog()).is_ok());
    // explain is a u32: negative, u32::MAX and beyond.
    for e in [
        "-1",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
    ] {
        refused(
            &format!("{HEAD}output = \"per_customer\"\nexplain = {e}\n[model]\nkind = \"linear\"\nweights = {{ budget = 1 }}\n"),
            if e == "4294967295" { "explain" } else { "spec" },
        );
    }
    // Bands are floats: NaN and infinities are refused, not compared true.
    for (high, medium) in [
        ("nan", "0.4"),
        ("0.7", "nan"),
        ("inf", "0.4"),
        ("0.7", "-inf"),
    ] {
        refused(
            &format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"logistic\"\nscale = 10\nweights = {{ budget = 1 }}\n[model.bands]\nhigh = {high}\nmedium = {medium}\n"),
            "bands",
        );
    }
}

proptest::proptest! {
    /// A leaf, a threshold, an edge, a bias and a weight are accepted
    /// exactly when their magnitude (computed in i128, so nothing wraps) is
    /// within the bound.
    #[test]
    fn signed_bounds_match_exact_arithmetic(v in proptest::prop_oneof![
        proptest::num::i64::ANY,
        -70i64..70,
        (1i64 << 30) - 2..(1i64 << 30) + 2,
        -(1i64 << 30) - 2..-(1i64 << 30) + 2,
        (1i64 << 14) - 2..(1i64 << 14) + 2,
        -(1i64 << 14) - 2..-(1i64 << 14) + 2,
        proptest::strategy::Just(i64::MIN),
    ]) {
        let mag = i128::from(v).abs();
        let leaf = spec::parse(&format!("{HEAD}{TREE}[model.tree]\nleaf = {v}\n"), &catalog());
        proptest::prop_assert_eq!(leaf.is_ok(), mag <= 63);
        let t = spec::parse(&format!("{HEAD}{TREE}[model.tree]\nfeature = \"budget\"\nthreshold = {v}\nbelow = {{ leaf = 1 }}\nat_least = {{ leaf = 0 }}\n"), &catalog());
        proptest::prop_assert_eq!(t.is_ok(), mag <= 1 << 30);
        let e = spec::parse(&format!("{HEAD}output = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"budget\"\nedges = [{v}]\n"), &catalog());
        proptest::prop_assert_eq!(e.is_ok(), mag <= 1 << 30);
        let b = spec::parse(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nbias = {v}\nweights = {{ budget = 1 }}\n"), &catalog());
        proptest::prop_assert_eq!(b.is_ok(), mag <= 1 << 30);
        let w = spec::parse(&format!("{HEAD}output = \"per_customer\"\n[model]\nkind = \"linear\"\nweights = {{ budget = {v} }}\n"), &catalog());
        // |w| ≤ 2^16, 1023·|w| within the plaintext space and the noise
        // bound |w|·2^17 < 2^31: with one feature, the last decides.
        proptest::prop_assert_eq!(w.is_ok(), mag < 1 << 14);
    }
}
