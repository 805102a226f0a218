//! Field lineage: W3C-PROV-shaped records of where each field value came
//! from, what was derived from it and who used it, stored in the vault's
//! sled database and anchored in the ledger.
//!
//! Model: a field version (customer, field, version, HMAC of the value under
//! the tenant's lineage key) is an entity; an [`pb::Activity`] (collect,
//! update, transform, compute, reveal, export, erase) `used` and `generated`
//! field versions, and a generated version points at what it was
//! `derived_from`, each edge with an OpenLineage transformation type.
//!
//! This module holds the model (activities, usages, transformations, the
//! per-job aggregates); [`LineageStore`] (in `store.rs`, with the layout of
//! the `lineage` tree) stores and queries it. The engine holds the store and
//! resolves customers to their pseudonyms before calling it: lineage never
//! sees a data key and depends on neither the engine nor access control.
//!
//! Guarantees:
//! - Every activity's SHA-256 (over its stored bytes) is carried by the ledger
//!   entry of the same operation, and every query checks each activity it
//!   returns against that entry: an altered record fails with DATA_LOSS.
//! - Recording is part of the operation: activities are written in the same
//!   sled transaction as the data they describe (writes, erasures) or before
//!   the operation's answer leaves the server (reads); if recording fails the
//!   operation fails.
//! - Queries read per-customer index ranges; none scans the whole store
//!   (the tenant export excepted).
//! - Erasure removes every per-customer record, index entry and value hash
//!   in the erasure's transaction, after folding the customer's activities
//!   into customer-free per-job aggregates.
//!
//! Does not guarantee: that an activity deleted from the store is noticed by
//! a query that does not return it (the ledger still holds its anchor, so an
//! audit of the subject's ledger entries finds it), nor that sled overwrites
//! removed bytes on disk (see `store.rs`).

pub mod openlineage;
mod store;
pub mod view;

pub(crate) use store::Staged;
pub use store::{LineageStore, Page};

use std::collections::BTreeMap;

use prost::Message;
use sha2::{Digest as _, Sha256};
use sovra_ledger::entry::WrittenField;
use sovra_ledger::{Digest, Pseudonym};
use sovra_proto::lineage::v1 as pb;

use crate::clock::now_ms;
use crate::error::{Result, VaultError};

/// Domain separation of activity hashes.
const ACTIVITY_DOMAIN: &[u8] = b"sovra/v1/lineage-activity\0";
/// Most accesses one page returns.
pub const MAX_PAGE: u32 = 1000;

/// An activity as stored: its exact encoding (what the ledger anchors) and
/// the ledger entry that anchors it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredActivity {
    /// The activity's protobuf encoding, hashed as it is.
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    /// The ledger entry that carries its hash.
    #[prost(uint64, tag = "2")]
    pub ledger_index: u64,
}

/// SHA-256 of an activity's stored encoding, as carried by its ledger entry.
pub fn activity_hash(body: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(ACTIVITY_DOMAIN);
    h.update(body);
    Digest(h.finalize().into())
}

/// An activity built and hashed, not yet stored.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The activity.
    pub activity: pb::Activity,
    /// Its encoding.
    body: Vec<u8>,
    /// Its hash: what the ledger entry of the operation must carry.
    pub hash: Digest,
}

impl Pending {
    /// Encodes and hashes `activity`.
    pub fn new(activity: pb::Activity) -> Self {
        let body = activity.encode_to_vec();
        let hash = activity_hash(&body);
        Self {
            activity,
            body,
            hash,
        }
    }

    fn stored(&self, ledger_index: u64) -> Vec<u8> {
        StoredActivity {
            body: self.body.clone(),
            ledger_index,
        }
        .encode_to_vec()
    }
}

/// The usage of one field version by a read, disclosed as `d`.
pub fn read_usage(field: &str, version: u64, d: sovra_ledger::entry::Disclosure) -> pb::Usage {
    use sovra_ledger::entry::Disclosure;
    let (masking, disclosure) = match d {
        Disclosure::Plaintext => (false, "plaintext"),
        Disclosure::Masked => (true, "masked"),
        Disclosure::Withheld => (true, "withheld"),
    };
    pb::Usage {
        field: field.to_owned(),
        version,
        transformation: Some(transformation(
            pb::TransformationType::Direct,
            pb::TransformationSubtype::Identity,
            masking,
            "",
        )),
        disclosure: disclosure.to_owned(),
    }
}

/// The usage of a field by an erasure.
pub fn erased_usage(field: String) -> pb::Usage {
    pb::Usage {
        field,
        version: 0,
        transformation: Some(transformation(
            pb::TransformationType::Indirect,
            pb::TransformationSubtype::Filter,
            false,
            "erased",
        )),
        disclosure: String::new(),
    }
}

/// A transformation edge.
pub fn transformation(
    ty: pb::TransformationType,
    subtype: pb::TransformationSubtype,
    masking: bool,
    description: &str,
) -> pb::Transformation {
    pb::Transformation {
        r#type: ty as i32,
        subtype: subtype as i32,
        masking,
        description: description.to_owned(),
    }
}

/// The OpenLineage name of a transformation type.
pub fn type_name(t: &pb::Transformation) -> &'static str {
    match pb::TransformationType::try_from(t.r#type) {
        Ok(pb::TransformationType::Indirect) => "INDIRECT",
        _ => "DIRECT",
    }
}

/// The OpenLineage name of a transformation subtype.
pub fn subtype_name(t: &pb::Transformation) -> &'static str {
    match pb::TransformationSubtype::try_from(t.subtype) {
        Ok(pb::TransformationSubtype::Transformation) => "TRANSFORMATION",
        Ok(pb::TransformationSubtype::Aggregation) => "AGGREGATION",
        Ok(pb::TransformationSubtype::Filter) => "FILTER",
        Ok(pb::TransformationSubtype::Conditional) => "CONDITIONAL",
        _ => "IDENTITY",
    }
}

/// Who acted, for what, under which decision.
#[derive(Debug, Clone, Default)]
pub struct Agent {
    /// Principal name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// Declared purpose (or erasure reason).
    pub purpose: String,
    /// Determining policy ids.
    pub policies: Vec<String>,
}

impl Agent {
    /// The agent named `name` in `role` (a principal's name and role),
    /// acting for `purpose` (or an erasure reason) under `policies`.
    pub fn of(name: &str, role: &str, purpose: String, policies: Vec<String>) -> Agent {
        Agent {
            name: name.to_owned(),
            role: role.to_owned(),
            purpose,
            policies,
        }
    }

    /// An activity of `kind` by this agent, now.
    pub fn activity(&self, kind: pb::ActivityKind, tenant: &str) -> pb::Activity {
        let mut policies = self.policies.clone();
        policies.sort();
        policies.dedup();
        pb::Activity {
            kind: kind as i32,
            time_ms: now_ms(),
            tenant: tenant.to_owned(),
            agent: self.name.clone(),
            role: self.role.clone(),
            purpose: self.purpose.clone(),
            decision: pb::Decision::Allowed as i32,
            policies,
            ..Default::default()
        }
    }
}

/// The anchor callback of a recorded operation: appends the operation's
/// ledger entry carrying the activity hash, and returns its index.
pub type Anchor<'a> = dyn FnOnce(&Pseudonym, &Digest, Vec<WrittenField>) -> Result<u64> + 'a;

/// The export job an activity belongs to.
pub fn job_name(a: &pb::Activity) -> String {
    use pb::ActivityKind as K;
    match K::try_from(a.kind).unwrap_or(K::Unspecified) {
        K::Collect | K::Update => format!(
            "collect.{}",
            a.origin.as_ref().map_or("unknown", |o| o.channel.as_str())
        ),
        K::Reveal => format!("reveal.{}", a.purpose),
        K::Export => format!("export.{}", a.purpose),
        K::Compute | K::Transform => format!("sandbox.{}", a.job_id),
        K::Erase => "erase".to_owned(),
        K::Unspecified => "unknown".to_owned(),
    }
}

fn edge(out: &mut Vec<pb::FieldEdge>, output: &str, input: &str, t: Option<&pb::Transformation>) {
    let t = t.cloned().unwrap_or_default();
    let e = pb::FieldEdge {
        output: output.to_owned(),
        input: input.to_owned(),
        transformation: Some(t),
    };
    if !out.contains(&e) {
        out.push(e);
    }
}

/// Folds one activity into the per-job aggregates: counts, times, policies
/// and field edges; never the subject, versions or value hashes.
fn fold(jobs: &mut BTreeMap<String, pb::JobLineage>, a: &pb::Activity) {
    let name = job_name(a);
    let one = {
        // A channel's job both collects and updates: one kind for the job.
        let kind = if a.kind == pb::ActivityKind::Update as i32 {
            pb::ActivityKind::Collect as i32
        } else {
            a.kind
        };
        let mut j = pb::JobLineage {
            name: name.clone(),
            kind,
            purpose: a.purpose.clone(),
            runs: 1,
            allowed: u64::from(a.decision == pb::Decision::Allowed as i32),
            denied: u64::from(a.decision == pb::Decision::Denied as i32),
            policies: a.policies.clone(),
            first_ms: a.time_ms,
            last_ms: a.time_ms,
            edges: Vec::new(),
            spec_sha256: a.spec_sha256.clone(),
        };
        for g in &a.generated {
            if g.derived_from.is_empty() {
                edge(&mut j.edges, &g.field, "", g.transformation.as_ref());
            }
            for d in &g.derived_from {
                edge(&mut j.edges, &g.field, &d.field, d.transformation.as_ref());
            }
        }
        if a.generated.is_empty() {
            for u in a.used.iter().filter(|u| u.disclosure != "withheld") {
                edge(&mut j.edges, &u.field, &u.field, u.transformation.as_ref());
            }
        }
        j
    };
    match jobs.get_mut(&name) {
        Some(j) => merge(j, &one),
        None => {
            jobs.insert(name, one);
        }
    }
}

fn merge(into: &mut pb::JobLineage, from: &pb::JobLineage) {
    // Counts read back from disk: saturate rather than overflow.
    into.runs = into.runs.saturating_add(from.runs);
    into.allowed = into.allowed.saturating_add(from.allowed);
    into.denied = into.denied.saturating_add(from.denied);
    for p in &from.policies {
        if !into.policies.contains(p) {
            into.policies.push(p.clone());
        }
    }
    into.policies.sort();
    into.first_ms = into.first_ms.min(from.first_ms);
    into.last_ms = into.last_ms.max(from.last_ms);
    for e in &from.edges {
        if !into.edges.contains(e) {
            into.edges.push(e.clone());
        }
    }
    if into.spec_sha256.is_empty() {
        into.spec_sha256.clone_from(&from.spec_sha256);
    }
}

/// The index of the one entry an append of one body returned.
pub(crate) fn appended_index(appended: Vec<sovra_ledger::Appended>) -> Result<u64> {
    appended
        .first()
        .map(|a| a.index)
        .ok_or_else(|| VaultError::storage("the ledger appended nothing"))
}

/// What a sandbox job computed, as the jobs layer records it
/// (`jobs::record::Recorder`).
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// The tenant whose customers the job computed on.
    pub tenant: String,
    /// The job or workload id.
    pub job_id: String,
    /// SHA-256 of the job spec.
    pub spec_sha256: Digest,
    /// Who ran it and under which decision (purpose, policies).
    pub agent: Agent,
    /// The schema features the job read.
    pub features: Vec<String>,
    /// The output's name (`lead_score`, `budget_sum`).
    pub output: String,
    /// How each feature contributed to the output.
    pub transformation: pb::Transformation,
    /// The cohort: every customer the job computed on.
    pub cohort: Vec<String>,
    /// Per-customer outputs released (customer, encoded output value); empty
    /// for an aggregate job.
    pub per_customer: Vec<(String, Vec<u8>)>,
    /// SHA-256 of the released output.
    pub output_sha256: Digest,
}

impl JobRecord {
    /// The job's tenant-level compute activity: it used the features (no
    /// customer listed) and generated the output, derived INDIRECT from the
    /// cohort's features for aggregates.
    pub(crate) fn activity(&self) -> pb::Activity {
        let cohort: std::collections::BTreeSet<&str> =
            self.cohort.iter().map(String::as_str).collect();
        let sub = if self.per_customer.is_empty() {
            transformation(
                pb::TransformationType::Indirect,
                pb::TransformationSubtype::Aggregation,
                false,
                &self.transformation.description,
            )
        } else {
            self.transformation.clone()
        };
        let mut act = self.agent.activity(pb::ActivityKind::Compute, &self.tenant);
        act.job_id = self.job_id.clone();
        act.spec_sha256 = self.spec_sha256.to_hex();
        act.cohort_size = cohort.len() as u64;
        act.used = self
            .features
            .iter()
            .map(|f| pb::Usage {
                field: f.clone(),
                version: 0,
                transformation: Some(sub.clone()),
                disclosure: String::new(),
            })
            .collect();
        act.generated = vec![pb::Generation {
            field: self.output.clone(),
            version: 0,
            value_hash: String::new(),
            derived_from: self
                .features
                .iter()
                .map(|f| pb::Derivation {
                    field: f.clone(),
                    version: 0,
                    transformation: Some(sub.clone()),
                })
                .collect(),
            transformation: None,
        }];
        act
    }

    /// The compute activity of one customer's output: it generated
    /// `version` of the output (value hash `value_hash`, hex) of `subject`,
    /// derived from the feature versions `used`.
    pub(crate) fn output_activity(
        &self,
        subject: &Pseudonym,
        used: &[(String, u64)],
        version: u64,
        value_hash: String,
    ) -> pb::Activity {
        let t = &self.transformation;
        let mut act = self.agent.activity(pb::ActivityKind::Compute, &self.tenant);
        act.subject = subject.0.to_vec();
        act.job_id = self.job_id.clone();
        act.spec_sha256 = self.spec_sha256.to_hex();
        act.used = used
            .iter()
            .map(|(f, v)| pb::Usage {
                field: f.clone(),
                version: *v,
                transformation: Some(t.clone()),
                disclosure: String::new(),
            })
            .collect();
        act.generated = vec![pb::Generation {
            field: self.output.clone(),
            version,
            value_hash,
            derived_from: used
                .iter()
                .map(|(f, v)| pb::Derivation {
                    field: f.clone(),
                    version: *v,
                    transformation: Some(t.clone()),
                })
                .collect(),
            transformation: Some(t.clone()),
        }];
        act
    }
}
