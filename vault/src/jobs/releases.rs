//! The durable record of released aggregates, and the no-differencing rule
//! it enforces.
//!
//! Guarantees: no aggregate is released to a receiver (a principal of a
//! tenant) whose cohort differs from the cohort of an aggregate released to
//! the same receiver before by 1..k-1 customers ([`NO_DIFFERENCING_POLICY`],
//! FAILED_PRECONDITION); every earlier aggregate counts, whatever its spec.
//! "Check, then record" is one step under one lock, so two concurrent jobs
//! cannot both pass against each other. The record (sled tree
//! [`RELEASES_TREE`]) holds pseudonyms, never customer ids, survives
//! restarts, and once complete also holds the released aggregate, so it
//! alone reproduces the anchored output hash.
//!
//! Does not: stop receivers who collude (each receiver is checked against
//! its own releases only; see SECURITY.md, "Release privacy"), or forget a
//! record (a release that failed after the record was written still
//! counts, which is conservative).

use std::sync::{Arc, Mutex};

use sovra_ledger::Digest;

use crate::access::auth::Principal;
use crate::engine::Engine;
use crate::error::{Result, VaultError};

/// The rule that refuses an aggregate whose cohort differs from one already
/// released to the same receiver by 1..k-1 customers. The vault enforces it
/// (it needs the set of earlier cohorts, which Cedar does not see); k is
/// that of [`super::release_policy::MIN_COHORT_POLICY`].
pub(crate) const NO_DIFFERENCING_POLICY: &str = "release-aggregate-no-differencing";

/// The sled tree of released aggregates: key `tenant 0 receiver 0 job_id`,
/// value [`ReleaseRecord`]. Never holds a customer id, only pseudonyms.
const RELEASES_TREE: &str = "sandbox_releases";

/// What the vault keeps of an aggregate it released: the cohort's sorted
/// pseudonyms (never customer ids) and, once decrypted, the released
/// aggregate as encoded in the anchored hash. Durable with the ledger entry
/// of the release (the recorder's commit flushes both).
struct ReleaseRecord {
    job_id: String,
    subjects: Vec<Digest>,
}

const RECORD_VERSION: u8 = 1;

fn release_key(tenant: &str, receiver: &str, job_id: &str) -> Vec<u8> {
    let mut k = release_prefix(tenant, receiver);
    k.extend_from_slice(job_id.as_bytes());
    k
}

fn release_prefix(tenant: &str, receiver: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + receiver.len() + 2);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(receiver.as_bytes());
    k.push(0);
    k
}

/// `version, u32 count, count × 32-byte pseudonym, [released aggregate]`.
fn encode_record(subjects: &[Digest], aggregate: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + 32 * subjects.len() + aggregate.len());
    v.push(RECORD_VERSION);
    // INVARIANT: a cohort has at most Limits::max_customers (10^6) members.
    v.extend_from_slice(&(subjects.len() as u32).to_be_bytes());
    for s in subjects {
        v.extend_from_slice(&s.0);
    }
    v.extend_from_slice(aggregate);
    v
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<ReleaseRecord> {
    let bad = || {
        VaultError::integrity(format!(
            "tree `{RELEASES_TREE}`: a release record is malformed"
        ))
    };
    let job_id = key
        .rsplit(|b| *b == 0)
        .next()
        .and_then(|j| std::str::from_utf8(j).ok())
        .ok_or_else(bad)?
        .to_owned();
    let (&version, rest) = value.split_first().ok_or_else(bad)?;
    if version != RECORD_VERSION || rest.len() < 4 {
        return Err(bad());
    }
    let (n, rest) = rest.split_at(4);
    let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
    let body = rest
        .get(..n.checked_mul(32).ok_or_else(bad)?)
        .ok_or_else(bad)?;
    let subjects = body
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            Digest(d)
        })
        .collect();
    Ok(ReleaseRecord { job_id, subjects })
}

/// |a △ b| for sorted sets, counting no further than `stop`.
fn symmetric_difference(a: &[Digest], b: &[Digest], stop: u64) -> u64 {
    let (mut i, mut j, mut d) = (0, 0, 0u64);
    while (i < a.len() || j < b.len()) && d < stop {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                i += 1;
                d += 1;
            }
            (Some(_), Some(_)) | (None, Some(_)) => {
                j += 1;
                d += 1;
            }
            (Some(_), None) => {
                i += 1;
                d += 1;
            }
            (None, None) => break,
        }
    }
    d
}

/// The earlier release to `receiver` in `tenant` whose cohort differs from
/// `subjects` by 1..k-1 customers, if any: releasing both would let the
/// receiver subtract one aggregate from the other and learn about fewer
/// than k customers. Every earlier aggregate counts, whatever its spec: a
/// count, sum or histogram over nearly the same cohort differences as well
/// as the same spec does.
fn differencing_conflict(
    tree: &sled::Tree,
    tenant: &str,
    receiver: &str,
    subjects: &[Digest],
    k: u64,
) -> Result<Option<String>> {
    if k <= 1 {
        return Ok(None);
    }
    for item in tree.scan_prefix(release_prefix(tenant, receiver)) {
        let (key, value) = item?;
        let r = decode_record(&key, &value)?;
        // Sizes that far apart differ by at least k anyway.
        if (r.subjects.len() as u64).abs_diff(subjects.len() as u64) >= k {
            continue;
        }
        let d = symmetric_difference(&r.subjects, subjects, k);
        if (1..k).contains(&d) {
            return Ok(Some(r.job_id));
        }
    }
    Ok(None)
}

fn differencing_error(k: u64, earlier: &str) -> VaultError {
    VaultError::precondition(format!(
        "policy `{NO_DIFFERENCING_POLICY}`: this aggregate's cohort differs by fewer than {k} customers from the cohort of aggregate job `{earlier}` already released to you, so the two results together would single those customers out; it is released once the cohorts differ by at least {k} customers (or are the same)"
    ))
}

/// The release log: durable records of released aggregates, and the lock
/// that makes "check for differencing, then record" one step.
#[derive(Clone, Default)]
pub(crate) struct Releases {
    lock: Arc<Mutex<()>>,
}

impl Releases {
    fn tree(engine: &Engine) -> Result<sled::Tree> {
        Ok(engine.store().db.open_tree(RELEASES_TREE)?)
    }

    /// Refuses if the cohort would difference an earlier release.
    pub(crate) async fn check(
        &self,
        engine: Arc<Engine>,
        p: &Principal,
        subjects: Vec<Digest>,
        k: u64,
    ) -> Result<()> {
        let (tenant, name) = (p.tenant.clone(), p.name.clone());
        let found = tokio::task::spawn_blocking(move || {
            differencing_conflict(&Self::tree(&engine)?, &tenant, &name, &subjects, k)
        })
        .await
        .map_err(|_| VaultError::internal("the release check task"))??;
        match found {
            Some(earlier) => Err(differencing_error(k, &earlier)),
            None => Ok(()),
        }
    }

    /// Checks, and if no earlier release conflicts, records this one (under
    /// the lock, so two concurrent jobs cannot both pass).
    pub(crate) async fn check_and_record(
        &self,
        engine: Arc<Engine>,
        p: &Principal,
        job_id: &str,
        subjects: Vec<Digest>,
        k: u64,
    ) -> Result<()> {
        let lock = self.lock.clone();
        let (tenant, name, job) = (p.tenant.clone(), p.name.clone(), job_id.to_owned());
        let found = tokio::task::spawn_blocking(move || {
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            let tree = Self::tree(&engine)?;
            if let Some(earlier) = differencing_conflict(&tree, &tenant, &name, &subjects, k)? {
                return Ok(Some(earlier));
            }
            engine.store().writer.insert(
                &tree,
                release_key(&tenant, &name, &job),
                encode_record(&subjects, &[]),
            )?;
            Ok::<_, VaultError>(None)
        })
        .await
        .map_err(|_| VaultError::internal("the release record task"))??;
        match found {
            Some(earlier) => Err(differencing_error(k, &earlier)),
            None => Ok(()),
        }
    }

    /// Adds the released aggregate to the job's record, so the record alone
    /// reproduces the anchored output hash.
    pub(crate) fn complete(
        engine: &Engine,
        p: &Principal,
        job_id: &str,
        subjects: &[Digest],
        aggregate: &[u8],
    ) -> Result<()> {
        engine.store().writer.insert(
            &Self::tree(engine)?,
            release_key(&p.tenant, &p.name, job_id),
            encode_record(subjects, aggregate),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_differences_and_records() {
        let d = |b: u8| Digest([b; 32]);
        let a = vec![d(1), d(2), d(3), d(5)];
        let b = vec![d(2), d(3), d(4)];
        assert_eq!(symmetric_difference(&a, &b, 100), 3);
        assert_eq!(symmetric_difference(&a, &b, 2), 2);
        assert_eq!(symmetric_difference(&a, &a, 100), 0);
        assert_eq!(symmetric_difference(&[], &a, 100), 4);
        let key = release_key("default", "partner", "job-1");
        let r = decode_record(&key, &encode_record(&a, b"tail")).unwrap();
        assert_eq!((r.job_id.as_str(), r.subjects), ("job-1", a));
        assert!(decode_record(&key, &[1, 0, 0, 0, 9]).is_err());
        assert!(decode_record(&key, &[]).is_err());
        assert!(decode_record(&key, &[2, 0, 0, 0, 0]).is_err());
    }
}
