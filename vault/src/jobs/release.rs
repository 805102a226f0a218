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
//! Before the hash, [`protect`] withholds every histogram bucket that
//! counts fewer than k customers, and as many further buckets as it takes
//! for no withheld count in 1..k-1 to be derivable from the released ones
//! and the cohort size; it adds k and the cohort digest, so the anchored
//! hash covers which customers the aggregate is about.
//!
//! Does not: check the submit-time policies (the service does) or keep
//! decrypted values after the release.

use crate::crypto::fhe::FheSecret;
use sha2::{Digest as _, Sha256};
use sovra_proto::sandbox::v1 as pb;
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::release;
use sovra_sandbox::spec::{AggregateOp, Model};
use sovra_sandbox::tree::OUTPUT_LOG;
use sovra_sandbox::{
    CustomerValue, EncryptedAggregate, EncryptedHistogram, EncryptedOutput, ScoredBlock,
    ValidatedSpec,
};
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
        EncryptedOutput::PerCustomer(blocks) => open_scores(secret, spec, blocks, customers),
        EncryptedOutput::PerCustomerValue(values) => open_values(secret, values, customers),
        EncryptedOutput::Histogram(h) => open_histogram(secret, spec, h),
        EncryptedOutput::Aggregate(a) => open_aggregate(secret, spec, a),
    }
}

/// A linear or logistic model's scores, with probability, band and top
/// features where the spec asks for them.
fn open_scores(
    secret: &FheSecret,
    spec: &ValidatedSpec,
    blocks: &[ScoredBlock],
    customers: &HashMap<u32, String>,
) -> Released {
    let mut scores = Vec::new();
    for b in blocks {
        let values = secret.decrypt_glwe(&b.score);
        let terms: Vec<(String, Option<zeroize::Zeroizing<Vec<i64>>>)> = if spec.explain() > 0 {
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

/// A tree's leaf value per customer.
fn open_values(
    secret: &FheSecret,
    values: &[CustomerValue],
    customers: &HashMap<u32, String>,
) -> Released {
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

/// A histogram's bucket counts from the decrypted "at least edge" counts.
fn open_histogram(secret: &FheSecret, spec: &ValidatedSpec, h: &EncryptedHistogram) -> Released {
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
            ..Default::default()
        }),
    }
}

/// A count, sum or mean over the cohort.
fn open_aggregate(secret: &FheSecret, spec: &ValidatedSpec, a: &EncryptedAggregate) -> Released {
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

/// Which histogram buckets to withhold so that every released count is at
/// least `k`, and no withheld count in 1..k-1 can be derived.
///
/// What a receiver knows, worst case: the released counts, the cohort size
/// (so the sum `t` of the withheld counts), k, and this rule, and so which
/// withheld buckets are below k ("primary") and which were withheld only to
/// protect them ("secondary", each ≥ k). With only primaries (each in
/// 0..=k-1), a primary's count is pinned when `t` is 1..k-1 (the union of
/// the withheld buckets itself would count fewer than k customers) or when
/// `t` = m·(k-1) (all m at their maximum). With at least one secondary (no
/// upper bound), each primary ranges over 0..=min(k-1, t - k·secondaries),
/// which is a single value only if that value is 0. So one secondary, the
/// smallest released bucket, always suffices, when there is one.
///
/// `None` when nothing can be released safely: every bucket is below k and
/// their counts would still be derivable.
pub(crate) fn suppression(buckets: &[u64], k: u64) -> Option<Vec<bool>> {
    let mut withheld: Vec<bool> = buckets.iter().map(|&b| k > 1 && b < k).collect();
    let m = withheld.iter().filter(|&&w| w).count() as u64;
    let t: u64 = buckets
        .iter()
        .zip(&withheld)
        .filter(|(_, &w)| w)
        .map(|(b, _)| *b)
        .sum();
    // INVARIANT: k > 1 whenever m > 0, so k - 1 does not underflow.
    let pinned = m > 0 && ((1..k).contains(&t) || (t > 0 && Some(t) == m.checked_mul(k - 1)));
    if pinned {
        let smallest = buckets
            .iter()
            .enumerate()
            .filter(|(i, _)| !withheld[*i])
            .min_by_key(|(i, b)| (**b, *i))
            .map(|(i, _)| i)?;
        withheld[smallest] = true;
    }
    Some(withheld)
}

/// Why a release is refused after decryption.
#[derive(Debug)]
pub(crate) struct Unreleasable(pub String);

/// Applies the release rules to what [`open`] decrypted: withholds the
/// histogram buckets [`suppression`] names (their counts read 0 and are
/// flagged), and records `k` and the cohort digest in the aggregate.
/// Per-customer outputs are left as they are (they go to the owning
/// service, not under k-anonymity).
pub(crate) fn protect(
    released: &mut Released,
    k: u64,
    cohort_sha256: &[u8; 32],
) -> Result<(), Unreleasable> {
    let Some(a) = released.aggregate.as_mut() else {
        return Ok(());
    };
    if a.op == "histogram" {
        let withheld = suppression(&a.buckets, k).ok_or_else(|| {
            Unreleasable(format!(
                "every bucket of the histogram counts fewer than {k} customers, and their counts could be derived from the cohort size"
            ))
        })?;
        for (b, w) in a.buckets.iter_mut().zip(&withheld) {
            if *w {
                *b = 0;
            }
        }
        a.suppressed = withheld;
    }
    a.min_count = k;
    a.cohort_sha256 = hex::encode(cohort_sha256);
    Ok(())
}

/// SHA-256 over the job id and the sorted pseudonyms of the cohort: what a
/// release's anchored hash says about who it covered. The job id salts it,
/// so equal cohorts of two jobs do not have equal digests.
pub(crate) fn cohort_digest(job_id: &str, sorted_pseudonyms: &[sovra_ledger::Digest]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"sovra-cohort-v1\0");
    h.update((job_id.len() as u64).to_be_bytes());
    h.update(job_id.as_bytes());
    for p in sorted_pseudonyms {
        h.update(p.0);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// Whether withheld bucket `i` (true count `b[i]`) has another value
    /// consistent with what a receiver knows: the released counts, the
    /// withheld total, and for each withheld bucket whether it is below k
    /// (worst case). Brute force, independent of the reasoning in
    /// [`suppression`].
    fn ambiguous(b: &[u64], w: &[bool], k: u64, i: usize) -> bool {
        let idx: Vec<usize> = (0..b.len()).filter(|&j| w[j]).collect();
        let t: u64 = idx.iter().map(|&j| b[j]).sum();
        // Enumerate assignments of the withheld buckets summing to t.
        fn go(
            idx: &[usize],
            b: &[u64],
            k: u64,
            left: u64,
            at: usize,
            x: &mut Vec<u64>,
            i: usize,
        ) -> bool {
            if at == idx.len() {
                return left == 0 && idx.iter().zip(x.iter()).any(|(&j, &v)| j == i && v != b[i]);
            }
            let j = idx[at];
            let (lo, hi) = if b[j] < k { (0, k - 1) } else { (k, left) };
            for v in lo..=hi.min(left) {
                x.push(v);
                if go(idx, b, k, left - v, at + 1, x, i) {
                    return true;
                }
                x.pop();
            }
            false
        }
        go(&idx, b, k, t, 0, &mut Vec::new(), i)
    }

    #[test]
    fn withheld_counts_are_neither_small_nor_derivable() {
        for k in [2u64, 3, 4] {
            for n in 1..=4usize {
                let mut b = vec![0u64; n];
                loop {
                    match suppression(&b, k) {
                        Some(w) => {
                            let t: u64 = b.iter().zip(&w).filter(|(_, &w)| w).map(|(x, _)| x).sum();
                            assert!(t == 0 || t >= k, "{b:?} k={k}: withheld total {t}");
                            for (j, (&x, &wj)) in b.iter().zip(&w).enumerate() {
                                if !wj {
                                    assert!(x >= k, "{b:?} k={k}: released {x}");
                                } else if x > 0 && x < k {
                                    assert!(
                                        ambiguous(&b, &w, k, j),
                                        "{b:?} k={k}: bucket {j} derivable"
                                    );
                                }
                            }
                        }
                        None => {
                            assert!(b.iter().all(|&x| x < k), "{b:?} k={k}");
                        }
                    }
                    // Next vector, counts 0..=2k+1.
                    let mut p = 0;
                    while p < n && b[p] == 2 * k + 1 {
                        b[p] = 0;
                        p += 1;
                    }
                    if p == n {
                        break;
                    }
                    b[p] += 1;
                }
            }
        }
    }

    #[test]
    fn the_reported_histogram_releases_no_bucket_of_one() {
        // Edges [25, 26] over 25 customers: [24, 1, 0] with k = 20.
        let w = suppression(&[24, 1, 0], 20).unwrap();
        assert_eq!(w, vec![true, true, true]);
        // Two large buckets and a small one: the smaller large one goes too.
        assert_eq!(
            suppression(&[30, 3, 25], 20).unwrap(),
            vec![false, true, true]
        );
        // Two small ones whose total is at least k and not pinned: enough.
        assert_eq!(
            suppression(&[30, 5, 17], 20).unwrap(),
            vec![false, true, true]
        );
        assert_eq!(
            suppression(&[30, 19, 19], 20).unwrap(),
            vec![true, true, true]
        );
        assert_eq!(suppression(&[19, 19], 20), None);
        assert_eq!(suppression(&[5, 0, 40], 1).unwrap(), vec![false; 3]);
        assert_eq!(suppression(&[40, 0], 20).unwrap(), vec![false, true]);
    }
}
