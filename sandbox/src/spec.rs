//! Job specs: what a job computes, for which purpose, and who may receive
//! the result; validated before anything runs.
//!
//! Guarantees: a [`ValidatedSpec`] names only features of the catalogue it
//! was checked against, stays inside the bounds below, and cannot overflow
//! the plaintext space or exceed the noise ceiling on any input the
//! catalogue allows (worst case, not average). Refusals name the bound.
//!
//! Does not: decide who may run the job or on whom (policy, in the vault),
//! or choose the cohort.

use crate::error::{InvalidSpecError, Result};
use crate::params::{noise_bound, MAX_RESULT, NOISE_CEILING};
use crate::tree::{Node, Tree};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The most bytes a spec file may have.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// The most features a model may use.
pub const MAX_TERMS: usize = 32;
/// The largest weight magnitude.
pub const MAX_WEIGHT: i64 = 1 << 16;
/// The largest bias magnitude.
pub const MAX_BIAS: i64 = 1 << 30;
/// The largest logistic scale.
pub const MAX_SCALE: i64 = 1 << 20;
/// The most features a per-customer explanation may name.
pub const MAX_EXPLAIN: u32 = 5;
/// The deepest a decision tree may be (splits on the longest path).
pub const MAX_TREE_DEPTH: usize = 6;
/// The largest magnitude of a tree's leaf value: its output is read at a
/// scale of 2^57 after up to 64 bootstraps were added (see [`crate::tree`]).
pub const MAX_LEAF: i64 = 63;
/// The largest magnitude of a tree threshold or a histogram edge.
pub const MAX_THRESHOLD: i64 = 1 << 30;
/// The most edges a histogram may have (it has one bucket more).
pub const MAX_EDGES: usize = 16;
/// The largest Σ|weight| of a score that is compared homomorphically: its
/// noise, Σ|weight|·2^17, must stay within the comparison's input bound
/// (2^28, [`crate::bootstrap::MAX_INPUT_NOISE_LOG`]).
pub const MAX_COMPARED_L1: u128 = 1 << (crate::bootstrap::MAX_INPUT_NOISE_LOG - 17);

/// A feature the vault keeps encrypted, as the sandbox sees it: its name
/// and the largest quantised value it may hold (values are 0..=max).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureInfo {
    /// The feature's (field's) name.
    pub name: String,
    /// Largest quantised value.
    pub max: u32,
}

/// Who may receive a job's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputClass {
    /// A score per customer, released only to a service of the department
    /// that owns the purpose.
    PerCustomer,
    /// One value over the cohort, released only for cohorts of at least k.
    Aggregate,
}

impl OutputClass {
    /// The name used in specs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputClass::PerCustomer => "per_customer",
            OutputClass::Aggregate => "aggregate",
        }
    }
}

/// Aggregate operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateOp {
    /// Customers in the cohort.
    Count,
    /// Sum over the cohort.
    Sum,
    /// Sum divided by the cohort size (division after decryption).
    Mean,
    /// Customers per bucket between the given edges, counted on
    /// ciphertexts with programmable bootstrapping. With one edge it is a
    /// thresholded count.
    Histogram,
}

impl AggregateOp {
    /// The name used in specs and results.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateOp::Count => "count",
            AggregateOp::Sum => "sum",
            AggregateOp::Mean => "mean",
            AggregateOp::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    purpose: String,
    output: OutputClass,
    #[serde(default)]
    explain: u32,
    model: RawModel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RawModel {
    Linear {
        #[serde(default)]
        bias: i64,
        weights: BTreeMap<String, i64>,
    },
    Logistic {
        #[serde(default)]
        bias: i64,
        weights: BTreeMap<String, i64>,
        scale: i64,
        #[serde(default)]
        bands: Option<Bands>,
    },
    Aggregate {
        op: AggregateOp,
        #[serde(default)]
        feature: Option<String>,
        #[serde(default)]
        linear: Option<RawLinear>,
        // Absent from the canonical form when not given, so the hashes of
        // specs written before histograms existed do not change.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        edges: Option<Vec<i64>>,
    },
    Tree {
        tree: RawNode,
    },
}

/// A tree node as written: a leaf, or a split with both children.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    leaf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threshold: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    below: Option<Box<RawNode>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_least: Option<Box<RawNode>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinear {
    #[serde(default)]
    bias: i64,
    weights: BTreeMap<String, i64>,
}

/// Probability thresholds of the score bands of a logistic model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bands {
    /// Probability at or above which a customer is `high`.
    pub high: f64,
    /// Probability at or above which a customer is `medium` (else `low`).
    pub medium: f64,
}

impl Default for Bands {
    fn default() -> Bands {
        Bands {
            high: 0.7,
            medium: 0.4,
        }
    }
}

/// A linear model over quantised features: bias + Σ weight·feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearModel {
    /// The bias.
    pub bias: i64,
    /// (feature, weight), sorted by feature.
    pub terms: Vec<(String, i64)>,
}

impl LinearModel {
    /// Σ|w|: the factor by which the model multiplies the noise.
    pub fn l1(&self) -> u128 {
        self.terms
            .iter()
            .map(|(_, w)| u128::from(w.unsigned_abs()))
            .sum()
    }

    /// The plaintext reference on one customer's quantised features
    /// (missing features count as 0).
    pub fn reference(&self, features: &BTreeMap<String, i64>) -> i64 {
        self.terms.iter().fold(self.bias, |acc, (f, w)| {
            acc + w * features.get(f).copied().unwrap_or(0)
        })
    }
}

/// What the model computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// A linear score per customer.
    Linear(LinearModel),
    /// A linear score mapped through sigmoid((score) / scale) and bands;
    /// the sigmoid is monotone and runs after the release gate decrypts the
    /// score, which the owning service receives anyway.
    Logistic {
        /// The linear part.
        linear: LinearModel,
        /// Score units per logit unit.
        scale: i64,
        /// Probability thresholds of the bands.
        bands: Bands,
    },
    /// One value over the cohort.
    Aggregate {
        /// The operation.
        op: AggregateOp,
        /// What is aggregated (None for `count`).
        over: Option<AggregateInput>,
        /// Histogram bucket edges, strictly increasing (empty otherwise).
        edges: Vec<i64>,
    },
    /// A decision tree over features, evaluated with bootstraps; its
    /// output per customer is the reached leaf's value.
    Tree(Tree),
}

/// The per-customer value an aggregate adds up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggregateInput {
    /// One feature.
    Feature(String),
    /// A linear model's score.
    Linear(LinearModel),
}

impl AggregateInput {
    /// As a linear model (a feature is the model `1·feature`).
    pub fn as_linear(&self) -> LinearModel {
        match self {
            AggregateInput::Feature(f) => LinearModel {
                bias: 0,
                terms: vec![(f.clone(), 1)],
            },
            AggregateInput::Linear(m) => m.clone(),
        }
    }
}

/// A spec that passed every check against a feature catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedSpec {
    name: String,
    purpose: String,
    output: OutputClass,
    explain: u32,
    model: Model,
    sha256: [u8; 32],
    per_customer_bound: u64,
    feature_max: BTreeMap<String, i64>,
}

impl ValidatedSpec {
    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The declared purpose.
    pub fn purpose(&self) -> &str {
        &self.purpose
    }
    /// The output class.
    pub fn output(&self) -> OutputClass {
        self.output
    }
    /// How many top contributing features to name per customer (0: none).
    pub fn explain(&self) -> u32 {
        self.explain
    }
    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// SHA-256 of the spec's canonical form (independent of TOML layout).
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
    /// The linear part evaluated per customer (None for `count` and trees).
    pub fn linear(&self) -> Option<LinearModel> {
        match &self.model {
            Model::Linear(m) | Model::Logistic { linear: m, .. } => Some(m.clone()),
            Model::Aggregate { over, .. } => over.as_ref().map(AggregateInput::as_linear),
            Model::Tree(_) => None,
        }
    }
    /// The features the job uses, sorted.
    pub fn features(&self) -> Vec<String> {
        match &self.model {
            Model::Tree(t) => t.features(),
            _ => self
                .linear()
                .map(|m| m.terms.into_iter().map(|(f, _)| f).collect())
                .unwrap_or_default(),
        }
    }
    /// Whether the job needs programmable bootstrapping (trees and
    /// histograms), and so the tenant's bootstrap key.
    pub fn needs_bootstrap(&self) -> bool {
        matches!(
            self.model,
            Model::Tree(_)
                | Model::Aggregate {
                    op: AggregateOp::Histogram,
                    ..
                }
        )
    }
    /// The largest quantised value of each feature the job uses.
    pub fn feature_max(&self, feature: &str) -> i64 {
        self.feature_max.get(feature).copied().unwrap_or(0)
    }
    /// The smallest and largest value of the per-customer linear score
    /// (None without one).
    pub fn score_range(&self) -> Option<(i64, i64)> {
        self.linear().map(|m| {
            m.terms.iter().fold((m.bias, m.bias), |(lo, hi), (f, w)| {
                let top = w * self.feature_max(f);
                (lo + top.min(0), hi + top.max(0))
            })
        })
    }
    /// Bootstraps one customer costs (0 for leveled jobs).
    pub fn bootstraps_per_customer(&self) -> u64 {
        match &self.model {
            Model::Tree(t) => t.bootstraps(&|f| self.feature_max(f)),
            Model::Aggregate { edges, .. } if !edges.is_empty() => {
                let (lo, hi) = self.score_range().unwrap_or((0, 0));
                edges
                    .iter()
                    .map(|&e| crate::bootstrap::comparison_cost(lo, hi, e))
                    .sum()
            }
            _ => 0,
        }
    }
    /// The largest magnitude one customer's value can reach.
    pub fn per_customer_bound(&self) -> u64 {
        self.per_customer_bound
    }
    /// How many customers an aggregate may add up in one ciphertext before
    /// the sum could overflow or its noise reach the ceiling.
    pub fn aggregate_chunk(&self) -> usize {
        let l1 = self.linear().map_or(1, |m| m.l1()).max(1);
        let by_noise = (u128::from(NOISE_CEILING) - 1) / noise_bound(l1);
        let by_magnitude = u128::from(MAX_RESULT) / u128::from(self.per_customer_bound.max(1));
        usize::try_from(by_noise.min(by_magnitude)).unwrap_or(usize::MAX)
    }
}

/// Whether `|v| <= max`, without computing `|v|`: `i64::MIN.abs()` wraps
/// to itself in release builds (and panics in debug ones), so every bound
/// on a signed spec value goes through this check.
fn within(v: i64, max: i64) -> bool {
    v.checked_abs().is_some_and(|a| a <= max)
}

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && s.as_bytes()[0].is_ascii_lowercase()
}

fn linear(
    what: &str,
    bias: i64,
    weights: BTreeMap<String, i64>,
    catalog: &[FeatureInfo],
) -> Result<(LinearModel, u64)> {
    if weights.is_empty() || weights.len() > MAX_TERMS {
        return Err(InvalidSpecError::error(
            format!("{what}.weights"),
            format!(
                "a model uses 1 to {MAX_TERMS} features, this one {}",
                weights.len()
            ),
        ));
    }
    if !within(bias, MAX_BIAS) {
        return Err(InvalidSpecError::error(
            format!("{what}.bias"),
            format!("|bias| must be at most {MAX_BIAS}"),
        ));
    }
    // INVARIANT: u128 cannot overflow here: |bias| ≤ 2^30 and at most 32
    // terms of |w| ≤ 2^16 times max ≤ 2^32 add up to less than 2^54.
    let mut magnitude = u128::from(bias.unsigned_abs());
    let mut terms = Vec::with_capacity(weights.len());
    for (f, w) in weights {
        let info = catalog.iter().find(|i| i.name == f).ok_or_else(|| {
            let known: Vec<&str> = catalog.iter().map(|i| i.name.as_str()).collect();
            InvalidSpecError::error(
                format!("{what}.weights.{f}"),
                format!(
                    "`{f}` is not an encrypted feature (features: {})",
                    known.join(", ")
                ),
            )
        })?;
        if !within(w, MAX_WEIGHT) {
            return Err(InvalidSpecError::error(
                format!("{what}.weights.{f}"),
                format!("weight {w} is outside -{MAX_WEIGHT}..={MAX_WEIGHT}"),
            ));
        }
        magnitude += u128::from(w.unsigned_abs()) * u128::from(info.max);
        terms.push((f, w));
    }
    let m = LinearModel { bias, terms };
    if magnitude > u128::from(MAX_RESULT) {
        return Err(InvalidSpecError::error(
            what.to_owned(),
            format!(
                "magnitude bound: |bias| + Σ|weight|·max(feature) = {magnitude} exceeds the plaintext space (±{MAX_RESULT}); use smaller weights"
            ),
        ));
    }
    let noise = noise_bound(m.l1());
    if noise >= u128::from(NOISE_CEILING) {
        return Err(InvalidSpecError::error(
            what.to_owned(),
            format!(
                "noise bound: Σ|weight| = {} times the fresh noise 2^17 reaches the ceiling 2^31 (Σ|weight| must stay below 16384)",
                m.l1()
            ),
        ));
    }
    // INVARIANT: magnitude ≤ MAX_RESULT < 2^63 (checked above).
    Ok((m, magnitude as u64))
}

/// Parses a TOML spec and validates it against `catalog`.
pub fn parse(text: &str, catalog: &[FeatureInfo]) -> Result<ValidatedSpec> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(InvalidSpecError::error(
            "spec",
            format!(
                "{} bytes, more than the {MAX_SPEC_BYTES} a spec may have",
                text.len()
            ),
        ));
    }
    let raw: RawSpec = toml::from_str(text)
        .map_err(|e| InvalidSpecError::error("spec", e.message().to_owned()))?;
    validate(raw, catalog)
}

fn validate(raw: RawSpec, catalog: &[FeatureInfo]) -> Result<ValidatedSpec> {
    let canonical = serde_json::to_vec(&raw)
        .map_err(|e| InvalidSpecError::error("spec", format!("cannot encode: {e}")))?;
    let sha256: [u8; 32] = Sha256::digest(&canonical).into();
    check_names(&raw)?;
    let (model, bound) = model_of(raw.model, catalog)?;
    check_output(raw.output, raw.explain, &model)?;
    let mut spec = ValidatedSpec {
        name: raw.name,
        purpose: raw.purpose,
        output: raw.output,
        explain: raw.explain,
        model,
        sha256,
        per_customer_bound: bound,
        feature_max: BTreeMap::new(),
    };
    spec.feature_max = spec
        .features()
        .into_iter()
        .map(|f| {
            let max = catalog
                .iter()
                .find(|i| i.name == f)
                .map_or(0, |i| i64::from(i.max));
            (f, max)
        })
        .collect();
    if spec.aggregate_chunk() == 0 {
        return Err(InvalidSpecError::error(
            "model",
            "one customer's value already reaches the noise or magnitude bound",
        ));
    }
    Ok(spec)
}

/// The spec's name and purpose, and how many features it may explain.
fn check_names(raw: &RawSpec) -> Result<()> {
    if !is_name(&raw.name, 64) {
        return Err(InvalidSpecError::error(
            "name",
            "1 to 64 characters of [a-z0-9_-], starting with a letter",
        ));
    }
    if !is_name(&raw.purpose, 64) || raw.purpose.contains('-') {
        return Err(InvalidSpecError::error(
            "purpose",
            "1 to 64 characters of [a-z0-9_], starting with a letter",
        ));
    }
    if raw.explain > MAX_EXPLAIN {
        return Err(InvalidSpecError::error(
            "explain",
            format!("at most {MAX_EXPLAIN} contributing features may be named"),
        ));
    }
    Ok(())
}

/// The checked model and its per-customer magnitude bound.
fn model_of(raw: RawModel, catalog: &[FeatureInfo]) -> Result<(Model, u64)> {
    match raw {
        RawModel::Linear { bias, weights } => {
            let (m, b) = linear("model", bias, weights, catalog)?;
            Ok((Model::Linear(m), b))
        }
        RawModel::Logistic {
            bias,
            weights,
            scale,
            bands,
        } => logistic(bias, weights, scale, bands, catalog),
        RawModel::Tree { tree } => {
            let t = tree_of(&tree, catalog)?;
            Ok((Model::Tree(t), MAX_LEAF as u64))
        }
        RawModel::Aggregate {
            op,
            feature,
            linear: lin,
            edges,
        } => {
            let (over, b) = aggregate_input(op, feature, lin, catalog)?;
            let edges = aggregate_edges(op, edges, over.as_ref())?;
            Ok((Model::Aggregate { op, over, edges }, b))
        }
    }
}

/// A logistic model: its linear part, scale and bands.
fn logistic(
    bias: i64,
    weights: BTreeMap<String, i64>,
    scale: i64,
    bands: Option<Bands>,
    catalog: &[FeatureInfo],
) -> Result<(Model, u64)> {
    let (m, b) = linear("model", bias, weights, catalog)?;
    if !(1..=MAX_SCALE).contains(&scale) {
        return Err(InvalidSpecError::error(
            "model.scale",
            format!("must be 1..={MAX_SCALE}"),
        ));
    }
    let bands = bands.unwrap_or_default();
    if !(bands.medium > 0.0 && bands.medium < bands.high && bands.high < 1.0) {
        return Err(InvalidSpecError::error(
            "model.bands",
            "need 0 < medium < high < 1",
        ));
    }
    Ok((
        Model::Logistic {
            linear: m,
            scale,
            bands,
        },
        b,
    ))
}

/// What an aggregate adds up (None for `count`), and its per-customer
/// magnitude bound.
fn aggregate_input(
    op: AggregateOp,
    feature: Option<String>,
    lin: Option<RawLinear>,
    catalog: &[FeatureInfo],
) -> Result<(Option<AggregateInput>, u64)> {
    match (op, feature, lin) {
        (AggregateOp::Count, None, None) => Ok((None, 1)),
        (AggregateOp::Count, _, _) => Err(InvalidSpecError::error(
            "model",
            "`count` counts the cohort: give neither `feature` nor `linear`",
        )),
        (_, Some(f), None) => {
            let (_, b) = linear("model", 0, BTreeMap::from([(f.clone(), 1)]), catalog)?;
            Ok((Some(AggregateInput::Feature(f)), b))
        }
        (_, None, Some(l)) => {
            let (m, b) = linear("model.linear", l.bias, l.weights, catalog)?;
            Ok((Some(AggregateInput::Linear(m)), b))
        }
        _ => Err(InvalidSpecError::error(
            "model",
            "`sum`, `mean` and `histogram` need exactly one of `feature` or `linear`",
        )),
    }
}

/// An aggregate's histogram edges: given for a histogram and only for one.
fn aggregate_edges(
    op: AggregateOp,
    edges: Option<Vec<i64>>,
    over: Option<&AggregateInput>,
) -> Result<Vec<i64>> {
    match (op, edges) {
        (AggregateOp::Histogram, Some(e)) => {
            check_edges(&e)?;
            let l1 = over.map_or(1, |o| o.as_linear().l1());
            if l1 > MAX_COMPARED_L1 {
                return Err(InvalidSpecError::error(
                    "model.linear",
                    format!(
                        "noise bound: a histogram compares the score on ciphertexts, so Σ|weight| must be at most {MAX_COMPARED_L1}, this one is {l1}"
                    ),
                ));
            }
            Ok(e)
        }
        (AggregateOp::Histogram, None) => Err(InvalidSpecError::error(
            "model.edges",
            "a histogram needs `edges` (strictly increasing bucket boundaries)",
        )),
        (_, Some(_)) => Err(InvalidSpecError::error(
            "model.edges",
            "only a `histogram` has edges",
        )),
        (_, None) => Ok(Vec::new()),
    }
}

/// That the output class fits the model, and that only models with
/// per-feature terms explain.
fn check_output(output: OutputClass, explain: u32, model: &Model) -> Result<()> {
    let aggregate = matches!(model, Model::Aggregate { .. });
    match (output, aggregate) {
        (OutputClass::Aggregate, false) => {
            return Err(InvalidSpecError::error(
                "output",
                "`aggregate` output needs an aggregate model (kind = \"aggregate\")",
            ))
        }
        (OutputClass::PerCustomer, true) => {
            return Err(InvalidSpecError::error(
                "output",
                "an aggregate model has `aggregate` output",
            ))
        }
        _ => {}
    }
    if aggregate && explain > 0 {
        return Err(InvalidSpecError::error(
            "explain",
            "only per-customer outputs name contributing features",
        ));
    }
    if matches!(model, Model::Tree(_)) && explain > 0 {
        return Err(InvalidSpecError::error(
            "explain",
            "a tree's output is a leaf: there are no per-feature terms to rank",
        ));
    }
    Ok(())
}

fn check_edges(edges: &[i64]) -> Result<()> {
    if edges.is_empty() || edges.len() > MAX_EDGES {
        return Err(InvalidSpecError::error(
            "model.edges",
            format!(
                "a histogram has 1 to {MAX_EDGES} edges, this one {}",
                edges.len()
            ),
        ));
    }
    if edges.iter().any(|&e| !within(e, MAX_THRESHOLD)) {
        return Err(InvalidSpecError::error(
            "model.edges",
            format!("edges must be within ±{MAX_THRESHOLD}"),
        ));
    }
    if edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err(InvalidSpecError::error(
            "model.edges",
            "edges must be strictly increasing",
        ));
    }
    Ok(())
}

/// Flattens and checks a written tree: every node a leaf or a split with
/// both children, depth at most [`MAX_TREE_DEPTH`], features from the
/// catalogue, thresholds and leaves within bounds. Depth is checked before
/// descending, so a hostile nesting is refused at depth 7, not followed.
fn tree_of(root: &RawNode, catalog: &[FeatureInfo]) -> Result<Tree> {
    let mut nodes = Vec::new();
    flatten(root, "model.tree", 0, catalog, &mut nodes)?;
    Ok(Tree::new(nodes))
}

fn flatten(
    raw: &RawNode,
    path: &str,
    depth: usize,
    catalog: &[FeatureInfo],
    nodes: &mut Vec<Node>,
) -> Result<usize> {
    let at = nodes.len();
    match (raw.leaf, &raw.feature, raw.threshold, &raw.below, &raw.at_least) {
        (Some(v), None, None, None, None) => {
            if !within(v, MAX_LEAF) {
                return Err(InvalidSpecError::error(
                    format!("{path}.leaf"),
                    format!("leaf values are integers within ±{MAX_LEAF} (a tree's output is read at a scale that leaves 7 bits)"),
                ));
            }
            nodes.push(Node::Leaf(v));
            Ok(at)
        }
        (None, Some(f), Some(t), Some(below), Some(at_least)) => {
            if depth >= MAX_TREE_DEPTH {
                return Err(InvalidSpecError::error(
                    path.to_owned(),
                    format!("a tree is at most {MAX_TREE_DEPTH} splits deep"),
                ));
            }
            if !catalog.iter().any(|i| &i.name == f) {
                let known: Vec<&str> = catalog.iter().map(|i| i.name.as_str()).collect();
                return Err(InvalidSpecError::error(
                    format!("{path}.feature"),
                    format!("`{f}` is not an encrypted feature (features: {})", known.join(", ")),
                ));
            }
            if !within(t, MAX_THRESHOLD) {
                return Err(InvalidSpecError::error(
                    format!("{path}.threshold"),
                    format!("thresholds must be within ±{MAX_THRESHOLD}"),
                ));
            }
            nodes.push(Node::Leaf(0));
            let b = flatten(below, &format!("{path}.below"), depth + 1, catalog, nodes)?;
            let a = flatten(at_least, &format!("{path}.at_least"), depth + 1, catalog, nodes)?;
            nodes[at] = Node::Split {
                feature: f.clone(),
                threshold: t,
                below: b,
                at_least: a,
            };
            Ok(at)
        }
        _ => Err(InvalidSpecError::error(
            path.to_owned(),
            "a node is either `leaf = VALUE` or `feature`, `threshold`, `below` and `at_least` (customers with feature >= threshold go to `at_least`)",
        )),
    }
}
