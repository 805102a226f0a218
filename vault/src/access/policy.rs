//! The one authorization layer every RPC of every service goes through: the
//! active Cedar policy set, how a call becomes a policy request, and policy
//! reloads.
//!
//! Guarantees:
//! - deny by default, per field: a field read is plaintext only if `reveal`
//!   is permitted, masked only if `read` is, and withheld otherwise;
//! - a denial names its determining policy ids and never a value;
//! - a reload validates the new set completely before it swaps it in,
//!   atomically; an invalid set is refused and the old one stays in force;
//! - every change of the active set (at start-up or reload) is in the
//!   ledger, durably, before the new set decides anything.
//!
//! Does not guarantee: tenant isolation, which the services enforce by
//! scoping every call to the caller's own tenant before asking here.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use sovra_ledger::entry::{Digest, PolicyChange};
use sovra_ledger::{Body, Ledger};
use sovra_policy::{Action, Context, CustomerAttrs, Decision, Disclosure, FieldAttrs, Policies};

use crate::access::auth::Principal;
use crate::error::{PermissionDeniedError, Result, VaultError};
use crate::schema::FieldValue;

/// The active policy set and where it came from.
#[derive(Debug)]
pub struct Active {
    /// The validated set.
    pub policies: Policies,
    /// When it took effect (ms since the epoch).
    pub loaded_at_ms: i64,
    /// The ledger entry that recorded it (None if it was already recorded
    /// by an earlier start).
    pub ledger_index: Option<u64>,
}

/// The result of a reload.
#[derive(Debug)]
pub struct Reloaded {
    /// The set now in force.
    pub active: Arc<Active>,
    /// Whether it differs from the one before.
    pub changed: bool,
}

/// Holds the active set; shared by every service.
#[derive(Debug)]
pub struct PolicyHolder {
    current: RwLock<Arc<Active>>,
    dir: Option<PathBuf>,
    ledger: Arc<Ledger>,
    reloading: tokio::sync::Mutex<()>,
}

const META_KEY: &[u8] = b"policy_sha256";

use crate::clock::now_ms;

impl PolicyHolder {
    /// Puts `policies` in force, recording it in the ledger first if it is
    /// not the set the previous start recorded (kept in `meta`).
    ///
    /// With `shared_log` (a log kept in PostgreSQL, which other servers
    /// write too) the set is recorded at every start: this server's `meta`
    /// knows only what it recorded, not what a server before it reloaded.
    pub async fn start(
        policies: Policies,
        dir: Option<PathBuf>,
        ledger: Arc<Ledger>,
        meta: &sled::Tree,
        shared_log: bool,
    ) -> Result<PolicyHolder> {
        let hash = policies.sha256_hex();
        let recorded = if shared_log {
            None
        } else {
            meta.get(META_KEY)?
        };
        let ledger_index = if recorded.as_deref() == Some(hash.as_bytes()) {
            None
        } else {
            let i = record(&ledger, "startup", &policies, "in force at start-up").await?;
            meta.insert(META_KEY, hash.as_bytes())?;
            meta.flush_async().await?;
            Some(i)
        };
        tracing::info!(policy_sha256 = %hash, policies = policies.len(), "policy set in force");
        Ok(PolicyHolder {
            current: RwLock::new(Arc::new(Active {
                policies,
                loaded_at_ms: now_ms(),
                ledger_index,
            })),
            dir,
            ledger,
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The set in force.
    pub fn current(&self) -> Arc<Active> {
        match self.current.read() {
            Ok(g) => g.clone(),
            // A panic while holding the lock cannot leave a half-written
            // Arc behind; the value is still whole.
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Where reloads read from (None: the compiled-in set).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// Re-reads the policy directory. A valid new set is recorded in the
    /// ledger (durably) and then swapped in; an invalid one is refused with
    /// every problem located, and the set in force stays.
    pub async fn reload(&self, actor: &str, meta: &sled::Tree) -> Result<Reloaded> {
        let _one_at_a_time = self.reloading.lock().await;
        let policies = match &self.dir {
            Some(d) => {
                let d = d.clone();
                tokio::task::spawn_blocking(move || Policies::load_dir(&d))
                    .await
                    .map_err(|e| VaultError::storage(format!("policy load task failed: {e}")))??
            }
            None => Policies::embedded()?,
        };
        let old = self.current();
        if old.policies.sha256_hex() == policies.sha256_hex() {
            return Ok(Reloaded {
                active: old,
                changed: false,
            });
        }
        let summary = format!(
            "reloaded: {} policies in {} files",
            policies.len(),
            policies.files().len()
        );
        // INVARIANT: the change is durable in the ledger before the new set
        // decides anything.
        let index = record(&self.ledger, actor, &policies, &summary).await?;
        meta.insert(META_KEY, policies.sha256_hex().as_bytes())?;
        let active = Arc::new(Active {
            policies,
            loaded_at_ms: now_ms(),
            ledger_index: Some(index),
        });
        match self.current.write() {
            Ok(mut g) => *g = active.clone(),
            Err(p) => *p.into_inner() = active.clone(),
        }
        tracing::info!(actor, policy_sha256 = %active.policies.sha256_hex(), ledger_index = index, "policy set reloaded");
        Ok(Reloaded {
            active,
            changed: true,
        })
    }
}

async fn record(ledger: &Ledger, actor: &str, p: &Policies, summary: &str) -> Result<u64> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(p.sha256_hex(), &mut h)
        .map_err(|e| VaultError::storage(format!("policy hash: {e}")))?;
    let a = ledger
        .append_durable(&[Body::PolicyChanged(PolicyChange {
            actor: actor.to_owned(),
            policy_sha256: Digest(h),
            summary: summary.to_owned(),
        })])
        .await?;
    Ok(a.first().map_or(0, |a| a.index))
}

/// The policy context of a call.
pub fn context(purpose: &str, approvals: i64) -> Context {
    Context {
        purpose: purpose.to_owned(),
        time_ms: now_ms(),
        approvals,
        cohort_size: 0,
    }
}

/// The field whose value is the policy attribute `Customer.kind`.
pub const CUSTOMER_KIND_FIELD: &str = "customer_kind";
/// The field whose value is the policy attribute `Customer.contract_value`.
pub const CONTRACT_VALUE_FIELD: &str = "contract_value";

/// The schema's fields that hold a customer's policy attributes (kind and
/// contract value): what every decision about a customer reads with the
/// fields it is about.
pub fn attribute_fields(schema: &crate::schema::Schema) -> Vec<&crate::schema::FieldDef> {
    [CUSTOMER_KIND_FIELD, CONTRACT_VALUE_FIELD]
        .into_iter()
        .filter_map(|n| schema.field(n).ok())
        .collect()
}

/// A customer's policy attributes: kind and contract value from its record
/// (`values` may hold other fields too), consents from its ledger consent
/// state.
pub fn customer_attrs(
    values: &[crate::schema::Revealed<'_>],
    consent: Vec<sovra_ledger::log::ConsentStatus>,
) -> CustomerAttrs {
    let mut c = CustomerAttrs::default();
    for r in values {
        match (r.def.name.as_str(), &r.value) {
            (CUSTOMER_KIND_FIELD, FieldValue::Text(t)) => c.kind = t.to_string(),
            (CONTRACT_VALUE_FIELD, FieldValue::Integer(v)) => c.contract_value = *v,
            _ => {}
        }
    }
    for s in consent {
        if s.action == sovra_ledger::ConsentAction::Withdraw {
            c.withdrawn.insert(s.purpose);
        } else {
            c.consents.insert(s.purpose);
        }
    }
    c
}

/// The decision on a tenant or customer action, allowed or not (customer
/// attributes empty: these actions do not look at consents).
pub fn decide_tenant(
    active: &Active,
    p: &Principal,
    action: Action,
    ctx: &Context,
) -> Result<Decision> {
    let scope = active
        .policies
        .scope(&p.policy, &p.tenant, &CustomerAttrs::default(), &[])?;
    Ok(active.policies.decide(&scope, action, None, ctx)?)
}

/// Checks a tenant or customer action: [`decide_tenant`], a denial as
/// PERMISSION_DENIED.
pub fn check(active: &Active, p: &Principal, action: Action, ctx: &Context) -> Result<Decision> {
    let d = decide_tenant(active, p, action, ctx)?;
    if d.allowed() {
        Ok(d)
    } else {
        Err(denied(p, action, None, ctx, &d))
    }
}

/// Checks a field action on each of `fields`; fails on the first denial.
/// Returns the determining policy ids of the allowed decisions.
pub fn check_fields(
    active: &Active,
    p: &Principal,
    action: Action,
    customer: &CustomerAttrs,
    fields: &[&FieldAttrs],
    ctx: &Context,
) -> Result<Vec<String>> {
    let scope = active
        .policies
        .scope(&p.policy, &p.tenant, customer, fields)?;
    let mut ids = Vec::new();
    for f in fields {
        let d = active.policies.decide(&scope, action, Some(&f.name), ctx)?;
        if !d.allowed() {
            return Err(denied(p, action, Some(&f.name), ctx, &d));
        }
        ids.extend(d.policies().iter().cloned());
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// The PERMISSION_DENIED error for a decision: who, what, which field and
/// purpose, and the determining policies; never a value.
pub fn denied(
    p: &Principal,
    action: Action,
    field: Option<&str>,
    ctx: &Context,
    d: &Decision,
) -> VaultError {
    let what = match field {
        Some(f) => format!("{} field `{f}`", action.name()),
        None => action.name().to_owned(),
    };
    let purpose = if ctx.purpose.is_empty() {
        String::new()
    } else {
        format!(" for purpose `{}`", ctx.purpose)
    };
    PermissionDeniedError::new(
        &p.name,
        p.role.as_str(),
        format!("{what}{purpose} ({})", d.summary()),
    )
    .into()
}

/// Explains a decision: for `read` and `reveal` how a read would disclose
/// the field, for other actions whether it is allowed; with the
/// determining policies either way.
pub fn explain(
    pol: &Policies,
    subject: &Principal,
    action: Action,
    field: Option<&FieldAttrs>,
    customer: &CustomerAttrs,
    ctx: &Context,
) -> Result<sovra_proto::policy::v1::Explanation> {
    let fields: Vec<&FieldAttrs> = field.into_iter().collect();
    let scope = pol.scope(&subject.policy, &subject.tenant, customer, &fields)?;
    if matches!(action, Action::Read | Action::Reveal) {
        let d = pol
            .read_fields(&scope, &fields, ctx)?
            .into_iter()
            .next()
            .ok_or_else(|| VaultError::invalid("field", "read and reveal need a field"))?;
        let allowed = match action {
            Action::Reveal => d.disclosure == Disclosure::Plaintext,
            _ => d.disclosure != Disclosure::Denied,
        };
        Ok(sovra_proto::policy::v1::Explanation {
            allowed,
            policies: d.determining(),
            disclosure: match d.disclosure {
                Disclosure::Plaintext => "plaintext",
                Disclosure::Masked => "masked",
                Disclosure::Denied => "denied",
            }
            .into(),
            summary: d.summary(),
            policy_sha256: pol.sha256_hex(),
            withheld: Vec::new(),
            withheld_read_by: Vec::new(),
        })
    } else {
        let d = pol.decide(&scope, action, field.map(|f| f.name.as_str()), ctx)?;
        Ok(sovra_proto::policy::v1::Explanation {
            allowed: d.allowed(),
            policies: d.policies().to_vec(),
            disclosure: String::new(),
            summary: d.summary(),
            policy_sha256: pol.sha256_hex(),
            withheld: Vec::new(),
            withheld_read_by: Vec::new(),
        })
    }
}

/// Distinct policy ids, joined and bounded for a ledger `reason` field.
pub fn reason(ids: impl IntoIterator<Item = String>) -> String {
    let ids: std::collections::BTreeSet<String> = ids.into_iter().collect();
    let mut out = String::from("policies:");
    let total = ids.len();
    for (n, id) in ids.into_iter().enumerate() {
        let sep = if n == 0 { " " } else { "," };
        // INVARIANT: the ledger bounds strings to 256 bytes.
        if out.len() + sep.len() + id.len() + 16 > sovra_ledger::entry::MAX_STRING_LEN {
            out.push_str(&format!(" +{} more", total - n));
            break;
        }
        out.push_str(sep);
        out.push_str(&id);
    }
    out
}

#[cfg(test)]
mod view_only {
    /// The key this module writes outside the log is one `sovra migrate`
    /// leaves out.
    #[test]
    fn the_recorded_policy_hash_is_view_bookkeeping() {
        assert!(crate::store::VIEW_ONLY_META_KEYS.contains(&super::META_KEY));
    }
}
