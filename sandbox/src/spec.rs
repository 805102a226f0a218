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

use crate::error::{InvalidSpec, Result};
use crate::params::{noise_bound, MAX_RESULT, NOISE_CEILING};
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
    },
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
    },
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
    /// The linear part evaluated per customer (None for `count`).
    pub fn linear(&self) -> Option<LinearModel> {
        match &self.model {
            Model::Linear(m) | Model::Logistic { linear: m, .. } => Some(m.clone()),
            Model::Aggregate { over, .. } => over.as_ref().map(AggregateInput::as_linear),
        }
    }
    /// The features the job uses, sorted.
    pub fn features(&self) -> Vec<String> {
        self.linear()
            .map(|m| m.terms.into_iter().map(|(f, _)| f).collect())
            .unwrap_or_default()
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
        return Err(InvalidSpec::error(
            format!("{what}.weights"),
            format!(
                "a model uses 1 to {MAX_TERMS} features, this one {}",
                weights.len()
            ),
        ));
    }
    if bias.unsigned_abs() > MAX_BIAS as u64 {
        return Err(InvalidSpec::error(
            format!("{what}.bias"),
            format!("|bias| must be at most {MAX_BIAS}"),
        ));
    }
    let mut magnitude = u128::from(bias.unsigned_abs());
    let mut terms = Vec::with_capacity(weights.len());
    for (f, w) in weights {
        let info = catalog.iter().find(|i| i.name == f).ok_or_else(|| {
            let known: Vec<&str> = catalog.iter().map(|i| i.name.as_str()).collect();
            InvalidSpec::error(
                format!("{what}.weights.{f}"),
                format!(
                    "`{f}` is not an encrypted feature (features: {})",
                    known.join(", ")
                ),
            )
        })?;
        if w.unsigned_abs() > MAX_WEIGHT as u64 {
            return Err(InvalidSpec::error(
                format!("{what}.weights.{f}"),
                format!("weight {w} is outside -{MAX_WEIGHT}..={MAX_WEIGHT}"),
            ));
        }
        magnitude += u128::from(w.unsigned_abs()) * u128::from(info.max);
        terms.push((f, w));
    }
    let m = LinearModel { bias, terms };
    if magnitude > u128::from(MAX_RESULT) {
        return Err(InvalidSpec::error(
            what.to_owned(),
            format!(
                "magnitude bound: |bias| + Σ|weight|·max(feature) = {magnitude} exceeds the plaintext space (±{MAX_RESULT}); use smaller weights"
            ),
        ));
    }
    let noise = noise_bound(m.l1());
    if noise >= u128::from(NOISE_CEILING) {
        return Err(InvalidSpec::error(
            what.to_owned(),
            format!(
                "noise bound: Σ|weight| = {} times the fresh noise 2^17 reaches the ceiling 2^31 (Σ|weight| must stay below 16384)",
                m.l1()
            ),
        ));
    }
    Ok((m, magnitude as u64))
}

/// Parses a TOML spec and validates it against `catalog`.
pub fn parse(text: &str, catalog: &[FeatureInfo]) -> Result<ValidatedSpec> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(InvalidSpec::error(
            "spec",
            format!(
                "{} bytes, more than the {MAX_SPEC_BYTES} a spec may have",
                text.len()
            ),
        ));
    }
    let raw: RawSpec =
        toml::from_str(text).map_err(|e| InvalidSpec::error("spec", e.message().to_owned()))?;
    validate(raw, catalog)
}

fn validate(raw: RawSpec, catalog: &[FeatureInfo]) -> Result<ValidatedSpec> {
    let canonical = serde_json::to_vec(&raw)
        .map_err(|e| InvalidSpec::error("spec", format!("cannot encode: {e}")))?;
    let sha256: [u8; 32] = Sha256::digest(&canonical).into();
    if !is_name(&raw.name, 64) {
        return Err(InvalidSpec::error(
            "name",
            "1 to 64 characters of [a-z0-9_-], starting with a letter",
        ));
    }
    if !is_name(&raw.purpose, 64) || raw.purpose.contains('-') {
        return Err(InvalidSpec::error(
            "purpose",
            "1 to 64 characters of [a-z0-9_], starting with a letter",
        ));
    }
    if raw.explain > MAX_EXPLAIN {
        return Err(InvalidSpec::error(
            "explain",
            format!("at most {MAX_EXPLAIN} contributing features may be named"),
        ));
    }
    let (model, bound) = match raw.model {
        RawModel::Linear { bias, weights } => {
            let (m, b) = linear("model", bias, weights, catalog)?;
            (Model::Linear(m), b)
        }
        RawModel::Logistic {
            bias,
            weights,
            scale,
            bands,
        } => {
            let (m, b) = linear("model", bias, weights, catalog)?;
            if !(1..=MAX_SCALE).contains(&scale) {
                return Err(InvalidSpec::error(
                    "model.scale",
                    format!("must be 1..={MAX_SCALE}"),
                ));
            }
            let bands = bands.unwrap_or_default();
            if !(bands.medium > 0.0 && bands.medium < bands.high && bands.high < 1.0) {
                return Err(InvalidSpec::error(
                    "model.bands",
                    "need 0 < medium < high < 1",
                ));
            }
            (
                Model::Logistic {
                    linear: m,
                    scale,
                    bands,
                },
                b,
            )
        }
        RawModel::Aggregate {
            op,
            feature,
            linear: lin,
        } => {
            let (over, b) = match (op, feature, lin) {
                (AggregateOp::Count, None, None) => (None, 1),
                (AggregateOp::Count, _, _) => {
                    return Err(InvalidSpec::error(
                        "model",
                        "`count` counts the cohort: give neither `feature` nor `linear`",
                    ))
                }
                (_, Some(f), None) => {
                    let (_, b) = linear("model", 0, BTreeMap::from([(f.clone(), 1)]), catalog)?;
                    (Some(AggregateInput::Feature(f)), b)
                }
                (_, None, Some(l)) => {
                    let (m, b) = linear("model.linear", l.bias, l.weights, catalog)?;
                    (Some(AggregateInput::Linear(m)), b)
                }
                _ => {
                    return Err(InvalidSpec::error(
                        "model",
                        "`sum` and `mean` need exactly one of `feature` or `linear`",
                    ))
                }
            };
            (Model::Aggregate { op, over }, b)
        }
    };
    let aggregate = matches!(model, Model::Aggregate { .. });
    match (raw.output, aggregate) {
        (OutputClass::Aggregate, false) => {
            return Err(InvalidSpec::error(
                "output",
                "`aggregate` output needs an aggregate model (kind = \"aggregate\")",
            ))
        }
        (OutputClass::PerCustomer, true) => {
            return Err(InvalidSpec::error(
                "output",
                "an aggregate model has `aggregate` output",
            ))
        }
        _ => {}
    }
    if aggregate && raw.explain > 0 {
        return Err(InvalidSpec::error(
            "explain",
            "only per-customer outputs name contributing features",
        ));
    }
    let spec = ValidatedSpec {
        name: raw.name,
        purpose: raw.purpose,
        output: raw.output,
        explain: raw.explain,
        model,
        sha256,
        per_customer_bound: bound,
    };
    if spec.aggregate_chunk() == 0 {
        return Err(InvalidSpec::error(
            "model",
            "one customer's value already reaches the noise or magnitude bound",
        ));
    }
    Ok(spec)
}
