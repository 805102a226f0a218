//! Cohort selection: which customers a job may compute on, and the
//! encrypted input it gets.
//!
//! Guarantees: the cohort is exactly the customers of the job's tenant who
//! have encrypted features and for whom the policy set in force allows
//! `compute` on every feature the job uses, for the job's purpose and the
//! principal it runs as, given the customer's attributes (kind, contract
//! value, consent state from the ledger); every other customer with
//! features is counted as excluded, with the policies that refused it. The
//! input holds the cohort's slots only; the selection keeps the cohort's
//! pseudonyms (sorted), never more than the slot-to-customer map the gate
//! needs.
//!
//! Does not: decrypt anything, or check the release policies (the service
//! and the gate do).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sovra_ledger::Digest;
use sovra_policy::{Action, Context, FieldAttrs, Scope};
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::{JobInput, ValidatedSpec};

use crate::access::auth::Principal;
use crate::access::policy;
use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::schema::FieldDef;

/// The customers a job may compute on, and its encrypted input.
pub(crate) struct Selection {
    pub(crate) input: JobInput,
    pub(crate) customers: HashMap<u32, String>,
    /// The cohort's pseudonyms, sorted: what the release record keeps.
    pub(crate) subjects: Vec<Digest>,
    pub(crate) excluded: u64,
    pub(crate) policies: Vec<String>,
    /// Policies that refused `compute` for excluded customers, with counts.
    pub(crate) denied_by: BTreeMap<String, u64>,
}

impl Selection {
    /// Why nobody is in an empty cohort.
    pub(crate) fn empty_reason(&self, spec: &ValidatedSpec) -> String {
        if self.denied_by.is_empty() {
            "no customer has encrypted features yet".to_owned()
        } else {
            format!(
                "policy refuses `compute` on {} for purpose `{}` for all {} customers with features (refused by: {})",
                spec.features().join(", "),
                spec.purpose(),
                self.excluded,
                self.denied_by
                    .iter()
                    .map(|(id, n)| format!("{id} ×{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// Blocks with at least one cohort member: a leveled job's work.
    pub(crate) fn blocks(&self) -> u64 {
        self.input.cohort.iter().filter(|c| !c.is_empty()).count() as u64
    }
}

/// What the policy set decided about `compute` for one customer.
enum Compute {
    /// Allowed on every feature, by these policies.
    Allowed(Vec<String>),
    /// Refused on a feature, by these policies.
    Refused(Vec<String>),
}

/// `compute` for one customer on every feature the job uses, up to the
/// first refusal.
fn decide_compute(
    active: &policy::Active,
    scope: &Scope,
    feature_defs: &[&FieldDef],
    ctx: &Context,
) -> Result<Compute> {
    let mut ids = Vec::new();
    for f in feature_defs {
        let d = active
            .policies
            .decide(scope, Action::Compute, Some(&f.name), ctx)?;
        if !d.allowed() {
            return Ok(Compute::Refused(d.policies().to_vec()));
        }
        ids.extend(d.policies().iter().cloned());
    }
    Ok(Compute::Allowed(ids))
}

/// Picks the cohort: every customer with encrypted features for whom
/// `compute` is allowed on every feature the job uses.
pub(crate) fn select(
    engine: &Engine,
    ledger: &sovra_ledger::Ledger,
    active: &policy::Active,
    run_as: &Principal,
    spec: &ValidatedSpec,
) -> Result<Selection> {
    let tenant = &run_as.tenant;
    // INVARIANT: every acknowledged feature write is in the blocks before
    // the job reads them (writes only mark their slot pending).
    engine.pack_features_for_job(tenant, &spec.features())?;
    let schema = engine.schema();
    let feature_defs: Vec<&FieldDef> = spec
        .features()
        .iter()
        .map(|f| schema.field(f))
        .collect::<Result<_>>()?;
    let attrs: Vec<&FieldAttrs> = feature_defs.iter().map(|d| &d.policy).collect();
    let fetch = policy::attribute_fields(schema);
    let ctx = policy::context(spec.purpose(), 0);
    let mut customers = HashMap::new();
    let mut subjects = Vec::new();
    let mut excluded = 0u64;
    let mut policies = BTreeSet::new();
    let mut max_slot = None;
    let mut denied_by: BTreeMap<String, u64> = BTreeMap::new();
    for (r, slot) in engine.features().slots(tenant)? {
        // Storage holds references; the id is sealed with the pad.
        let customer = match engine.customer_id(tenant, &r) {
            Ok(c) => c,
            Err(VaultError::NotFound(_)) => {
                excluded += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (subject, revealed) = if fetch.is_empty() {
            (engine.pseudonym(tenant, &customer, false)?, Vec::new())
        } else {
            match engine.get(tenant, &customer, &fetch) {
                Ok(x) => x,
                Err(VaultError::NotFound(_)) => {
                    excluded += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        let consent = ledger.consent_state(&subject)?;
        let attrs_c = policy::customer_attrs(&revealed, consent);
        let scope = active
            .policies
            .scope(&run_as.policy, tenant, &attrs_c, &attrs)?;
        match decide_compute(active, &scope, &feature_defs, &ctx)? {
            Compute::Allowed(ids) => {
                policies.extend(ids);
                max_slot = max_slot.max(Some(slot));
                customers.insert(slot, customer);
                subjects.push(subject);
            }
            Compute::Refused(refused_by) => {
                for id in refused_by {
                    *denied_by.entry(id).or_default() += 1;
                }
                excluded += 1;
            }
        }
    }
    let blocks = max_slot.map_or(0, |s| s as usize / SLOTS + 1);
    let input = job_input(engine, tenant, spec, &customers, blocks)?;
    subjects.sort_unstable();
    subjects.dedup();
    Ok(Selection {
        input,
        customers,
        subjects,
        excluded,
        policies: policies.into_iter().collect(),
        denied_by,
    })
}

/// The job's input: the cohort's slots per block, and each feature's
/// encrypted column over `blocks` blocks.
fn job_input(
    engine: &Engine,
    tenant: &str,
    spec: &ValidatedSpec,
    customers: &HashMap<u32, String>,
    blocks: usize,
) -> Result<JobInput> {
    let mut cohort = vec![Vec::new(); blocks];
    let mut slots: Vec<u32> = customers.keys().copied().collect();
    slots.sort_unstable();
    for s in slots {
        // INVARIANT: s % SLOTS < 2048 fits u16.
        cohort[s as usize / SLOTS].push((s as usize % SLOTS) as u16);
    }
    let mut columns = BTreeMap::new();
    for f in spec.features() {
        columns.insert(f.clone(), engine.features().column(tenant, &f, blocks)?);
    }
    Ok(JobInput { columns, cohort })
}
