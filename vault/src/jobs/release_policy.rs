//! The release policy of a job's output: whether the receiver may have the
//! output class over a cohort of that size, and the k the policy implies.
//!
//! Guarantees: both checks ask the policy set the caller hands in (the one
//! in force), as the receiver, for the job's purpose, with the cohort size
//! as context; a refusal by [`MIN_COHORT_POLICY`] is FAILED_PRECONDITION
//! (the cohort is too small, which may change), any other refusal is
//! PERMISSION_DENIED naming the determining policies.
//!
//! Does not: know about earlier releases (the no-differencing rule is
//! [`super::releases`]) or withhold small histogram buckets (the gate,
//! [`super::release`]).

use sovra_policy::Action;
use sovra_sandbox::{OutputClass, ValidatedSpec};

use crate::access::auth::Principal;
use crate::access::policy;
use crate::error::{Result, VaultError};

/// The policy whose refusal means "cohort below k".
pub(crate) const MIN_COHORT_POLICY: &str = "release-aggregate-min-cohort";

/// Checks the receiver may get the output class of `spec` over `cohort`
/// customers; FAILED_PRECONDITION for a cohort below k.
pub(crate) fn check_release(
    active: &policy::Active,
    p: &Principal,
    spec: &ValidatedSpec,
    cohort: u64,
) -> Result<Vec<String>> {
    let action = match spec.output() {
        OutputClass::PerCustomer => Action::ReleaseScores,
        OutputClass::Aggregate => Action::ReleaseAggregate,
    };
    let mut ctx = policy::context(spec.purpose(), 0);
    ctx.cohort_size = i64::try_from(cohort).unwrap_or(i64::MAX);
    let d = policy::decide_tenant(active, p, action, &ctx)?;
    if d.allowed() {
        return Ok(d.policies().to_vec());
    }
    if d.policies().iter().any(|id| id == MIN_COHORT_POLICY) {
        return Err(VaultError::precondition(format!(
            "the cohort has {cohort} customers whose consent and policy allow purpose `{}`; policy `{MIN_COHORT_POLICY}` releases aggregates only over larger cohorts",
            spec.purpose()
        )));
    }
    Err(policy::denied(p, action, None, &ctx, &d))
}

/// k: the smallest cohort the release policy in force lets `p` have an
/// aggregate of `spec` over, found by bisection on `cohort_size` between 1
/// and `cohort` (which the caller checked is allowed). The policy's
/// `cohort_size < k` rule is monotone; k = 1 when nothing forbids small
/// cohorts.
pub(crate) fn min_cohort(
    active: &policy::Active,
    p: &Principal,
    spec: &ValidatedSpec,
    cohort: u64,
) -> Result<u64> {
    let allowed = |n: u64| -> Result<bool> {
        let mut ctx = policy::context(spec.purpose(), 0);
        ctx.cohort_size = i64::try_from(n).unwrap_or(i64::MAX);
        let d = policy::decide_tenant(active, p, Action::ReleaseAggregate, &ctx)?;
        Ok(d.allowed())
    };
    // INVARIANT: allowed(hi) holds (checked by the caller); lo is the
    // largest size known refused (0: none yet).
    let (mut lo, mut hi) = (0u64, cohort.max(1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if allowed(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}
