//! The release gate: the only code that decrypts a sandbox job's output.
//!
//! Guarantees: it decrypts only the cohort's slots of a job that finished,
//! only after policy allowed the receiver the job's output class
//! (`release_scores` or `release_aggregate`, the latter with the cohort
//! size as context so the k-anonymity policy applies); per-customer scores
//! carry the score, the logistic probability and band, and the names (never
//! the values) of the features that raised the score most; a tree's
//! output per customer is the value of the leaf reached; aggregates carry
//! one number; histograms carry one count per bucket (the gate decrypts one
//! count per edge and chunk of at most 63 customers and releases only the
//! totals). The hash of what is released is computed here and
//! anchored in the ledger by the caller before anything is returned.
//!
//! Does not: check the submit-time policies (the service does) or keep
//! decrypted values after the release.

use crate::fhe::FheSecret;
use sha2::{Digest as _, Sha256};
use sovra_proto::sandbox::v1 as pb;
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::release;
use sovra_sandbox::spec::{AggregateOp, Model};
use sovra_sandbox::tree::OUTPUT_LOG;
use sovra_sandbox::{EncryptedOutput, ValidatedSpec};
use std::collections::HashMap;

/// What the gate releases.
#[derive(Debug, Clone, Default)]
pub(crate) struct Released {
    /// Per-customer outputs, by customer id.
    pub scores: Vec<pb::CustomerScore>,
    /// The aggregate.
    pub aggregate: Option<pb::Aggregate>,
}

impl Released {
    /// SHA-256 of the released output's canonical encoding (protobuf,
    /// scores sorted by customer).
    pub(crate) fn sha256(&self) -> [u8; 32] {
        use prost::Message;
        let canonical = pb::JobResult {
            scores: self.scores.clone(),
            aggregate: self.aggregate.clone(),
            ..Default::default()
        };
        Sha256::digest(canonical.encode_to_vec()).into()
    }
}

/// Decrypts `output` for the cohort (`customers` maps a global slot to its
/// customer id).
pub(crate) fn open(
    secret: &FheSecret,
    spec: &ValidatedSpec,
    output: &EncryptedOutput,
    customers: &HashMap<u32, String>,
) -> Released {
    match output {
        EncryptedOutput::PerCustomer(blocks) => {
            let mut scores = Vec::new();
            for b in blocks {
                let values = secret.decrypt_glwe(&b.score);
                let terms: Vec<(String, Option<zeroize::Zeroizing<Vec<i64>>>)> =
                    if spec.explain() > 0 {
                        b.terms
                            .iter()
                            .map(|(f, ct)| (f.clone(), ct.as_ref().map(|c| secret.decrypt_glwe(c))))
                            .collect()
                    } else {
                        Vec::new()
                    };
                for &slot in &b.slots {
                    let s = usize::from(slot);
                    let global = (b.block * SLOTS + s) as u32;
                    let Some(customer) = customers.get(&global) else {
                        continue;
                    };
                    let score = values[s];
                    let (probability, band) = match spec.model() {
                        Model::Logistic { scale, bands, .. } => {
                            let p = release::probability(score, *scale);
                            (p, release::band(p, bands).as_str().to_owned())
                        }
                        _ => (0.0, String::new()),
                    };
                    let per_feature: Vec<(String, i64)> = terms
                        .iter()
                        .map(|(f, v)| (f.clone(), v.as_ref().map_or(0, |v| v[s])))
                        .collect();
                    scores.push(pb::CustomerScore {
                        customer_id: customer.clone(),
                        score,
                        probability,
                        band,
                        top_features: release::top_features(&per_feature, spec.explain() as usize),
                    });
                }
            }
            scores.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
            Released {
                scores,
                aggregate: None,
            }
        }
        EncryptedOutput::PerCustomerValue(values) => {
            let mut scores: Vec<pb::CustomerScore> = values
                .iter()
                .filter_map(|v| {
                    let global = (v.block * SLOTS + usize::from(v.slot)) as u32;
                    customers.get(&global).map(|c| pb::CustomerScore {
                        customer_id: c.clone(),
                        score: secret.decrypt_lwe_at(&v.value, OUTPUT_LOG),
                        ..Default::default()
                    })
                })
                .collect();
            scores.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
            Released {
                scores,
                aggregate: None,
            }
        }
        EncryptedOutput::Histogram(h) => {
            let edges = match spec.model() {
                Model::Aggregate { edges, .. } => edges.clone(),
                _ => Vec::new(),
            };
            let cohort = h.cohort_size;
            // Customers at or above each edge; clamped so a count can
            // never exceed the one below it (it cannot, unless the stored
            // ciphertexts were tampered with, and then nothing negative or
            // larger than the cohort is released).
            let mut at_least: Vec<u64> = h
                .at_least
                .iter()
                .map(|chunks| {
                    chunks
                        .iter()
                        .map(|c| secret.decrypt_lwe_at(c, OUTPUT_LOG).max(0) as u64)
                        .sum::<u64>()
                })
                .collect();
            let mut above = cohort;
            for c in &mut at_least {
                *c = (*c).min(above);
                above = *c;
            }
            let mut buckets = Vec::with_capacity(at_least.len() + 1);
            let mut prev = cohort;
            for &c in &at_least {
                buckets.push(prev - c);
                prev = c;
            }
            buckets.push(prev);
            Released {
                scores: Vec::new(),
                aggregate: Some(pb::Aggregate {
                    op: "histogram".into(),
                    value: cohort as f64,
                    sum: cohort as i64,
                    edges,
                    buckets,
                }),
            }
        }
        EncryptedOutput::Aggregate(a) => {
            let op = match spec.model() {
                Model::Aggregate { op, .. } => *op,
                _ => AggregateOp::Sum,
            };
            let sum: i64 = a.chunks.iter().map(|c| secret.decrypt_lwe(c)).sum();
            let (name, value, sum) = match op {
                AggregateOp::Count => ("count", a.cohort_size as f64, a.cohort_size as i64),
                AggregateOp::Sum => ("sum", sum as f64, sum),
                // INVARIANT: a histogram is always bootstrapped and arrives
                // as EncryptedOutput::Histogram, never here.
                AggregateOp::Mean | AggregateOp::Histogram => (
                    "mean",
                    if a.cohort_size == 0 {
                        0.0
                    } else {
                        sum as f64 / a.cohort_size as f64
                    },
                    sum,
                ),
            };
            Released {
                scores: Vec::new(),
                aggregate: Some(pb::Aggregate {
                    op: name.into(),
                    value,
                    sum,
                    ..Default::default()
                }),
            }
        }
    }
}
