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
//! Layout: one sled tree, `lineage`, in four key spaces (`S` is the
//! customer's 32-byte ledger pseudonym, never the id):
//! - `A tenant 0 id` → [`StoredActivity`] (the activity's exact encoding and
//!   the index of the ledger entry that carries its hash)
//! - per customer, under `I tenant 0 S`:
//!   `w id` → `field 0 version`… (each write activity and the versions it
//!   generated),
//!   `r time id` → `field 0`… (each read, by time, and the fields it used),
//!   `d field 0 id` → empty (what was computed from the field)
//!   (every activity of the customer's own has a `w` or `r` entry, which is
//!   how erasure finds them; one entry per activity, not per field, keeps
//!   recording to two sled inserts)
//! - `C tenant 0 customer` → S, so that an erasure interrupted by a crash can
//!   still find the customer's lineage once the pseudonym can no longer be
//!   computed
//! - `G tenant 0 job` → [`pb::JobLineage`]: the aggregated, customer-free
//!   lineage of erased customers' activities
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
pub mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use sha2::{Digest as _, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sovra_ledger::entry::WrittenField;
use sovra_ledger::{Digest, Ledger, Pseudonym};
use sovra_proto::lineage::v1 as pb;

use crate::engine::{now_ms, validate_id, Engine, MAX_CUSTOMER_ID_LEN};
use crate::error::{Result, VaultError};

/// Domain separation of activity hashes.
const ACTIVITY_DOMAIN: &[u8] = b"sovra/v1/lineage-activity\0";
/// Most accesses one page returns.
pub const MAX_PAGE: u32 = 1000;
/// How far in the future a range may end.
const FUTURE_SLACK_MS: i64 = 24 * 3600 * 1000;

const SEP: u8 = 0;
const WRITES: u8 = b'w';
const READS: u8 = b'r';
const DERIVED: u8 = b'd';

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
    /// The agent for principal `p` acting for `purpose` (or an erasure
    /// reason) under `policies`.
    pub fn of(p: &crate::access::auth::Principal, purpose: String, policies: Vec<String>) -> Agent {
        Agent {
            name: p.name.clone(),
            role: p.role.as_str().to_owned(),
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

// --- key layouts -----------------------------------------------------------

// One sled tree, four key spaces, so that recording is one atomic batch (or
// one tree in the operation's transaction) rather than a multi-tree
// transaction, which costs several times as much.
const ACTS: u8 = b'A';
const INDEX: u8 = b'I';
const SUBJECTS: u8 = b'C';
const STATS: u8 = b'G';

fn space_prefix(space: u8, tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 2);
    k.push(space);
    k.extend_from_slice(tenant.as_bytes());
    k.push(SEP);
    k
}

fn activity_key(tenant: &str, id: u64) -> Vec<u8> {
    let mut k = space_prefix(ACTS, tenant);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

// INVARIANT: a pseudonym is exactly 32 bytes, so `I tenant 0 S` prefixes of
// different customers never overlap and field names (no 0 byte) end at SEP.
fn subject_prefix(tenant: &str, subject: &Pseudonym) -> Vec<u8> {
    let mut k = space_prefix(INDEX, tenant);
    k.extend_from_slice(&subject.0);
    k
}

fn field_prefix(tenant: &str, subject: &Pseudonym, tag: u8, field: &str) -> Vec<u8> {
    let mut k = subject_prefix(tenant, subject);
    k.push(tag);
    k.extend_from_slice(field.as_bytes());
    k.push(SEP);
    k
}

fn tagged_prefix(tenant: &str, subject: &Pseudonym, tag: u8) -> Vec<u8> {
    let mut k = subject_prefix(tenant, subject);
    k.push(tag);
    k
}

fn write_key(tenant: &str, subject: &Pseudonym, id: u64) -> Vec<u8> {
    let mut k = tagged_prefix(tenant, subject, WRITES);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn read_key(tenant: &str, subject: &Pseudonym, time_ms: i64, id: u64) -> Vec<u8> {
    let mut k = tagged_prefix(tenant, subject, READS);
    k.extend_from_slice(&time_key(time_ms));
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// `field 0 version` for each field version a write generated.
fn encode_versions<'a>(versions: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (f, v) in versions {
        out.extend_from_slice(f.as_bytes());
        out.push(SEP);
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

fn decode_versions(mut b: &[u8]) -> Option<Vec<(&str, u64)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b.iter().position(|&c| c == SEP)?;
        let field = std::str::from_utf8(&b[..end]).ok()?;
        let version = be_u64(b.get(end + 1..end + 9)?)?;
        out.push((field, version));
        b = &b[end + 9..];
    }
    Some(out)
}

/// `field 0` for each field a read used.
fn encode_fields<'a>(fields: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(f.as_bytes());
        out.push(SEP);
    }
    out
}

fn has_field(encoded: &[u8], field: &str) -> bool {
    encoded
        .split(|&c| c == SEP)
        .any(|f| !f.is_empty() && f == field.as_bytes())
}

fn id_at_end(k: &[u8]) -> Option<u64> {
    k.len().checked_sub(8).and_then(|i| be_u64(&k[i..]))
}

fn derived_key(tenant: &str, subject: &Pseudonym, field: &str, id: u64) -> Vec<u8> {
    let mut k = field_prefix(tenant, subject, DERIVED, field);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn customer_key(tenant: &str, customer: &str) -> Vec<u8> {
    let mut k = space_prefix(SUBJECTS, tenant);
    k.extend_from_slice(customer.as_bytes());
    k
}

fn stats_key(tenant: &str, job: &str) -> Vec<u8> {
    let mut k = space_prefix(STATS, tenant);
    k.extend_from_slice(job.as_bytes());
    k
}

fn time_key(time_ms: i64) -> [u8; 8] {
    // Times before the epoch do not occur (the clock is read by the vault);
    // clamping keeps the big-endian order monotone.
    (time_ms.max(0) as u64).to_be_bytes()
}

fn be_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes)
}

// --- staging ---------------------------------------------------------------

/// Lineage writes staged for one atomic update of the `lineage` tree.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    // Per-job aggregates to merge into what is stored, inside the
    // transaction (so that concurrent erasures cannot lose each other's).
    stats: Vec<(Vec<u8>, pb::JobLineage)>,
}

impl Staged {
    /// Applies the staged writes inside a transaction over `lineage`.
    pub(crate) fn apply(
        &self,
        t: &TransactionalTree,
    ) -> sled::transaction::ConflictableTransactionResult<(), VaultError> {
        for (k, v) in &self.ops {
            match v {
                Some(v) => {
                    t.insert(k.as_slice(), v.as_slice())?;
                }
                None => {
                    t.remove(k.as_slice())?;
                }
            }
        }
        for (k, job) in &self.stats {
            let merged = match t.get(k.as_slice())? {
                Some(v) => {
                    let mut old = pb::JobLineage::decode(&v[..]).map_err(|_| {
                        ConflictableTransactionError::Abort(VaultError::integrity(
                            "a lineage aggregate",
                        ))
                    })?;
                    merge(&mut old, job);
                    old
                }
                None => job.clone(),
            };
            t.insert(k.as_slice(), merged.encode_to_vec())?;
        }
        Ok(())
    }

    /// Stores `pending` (anchored at `ledger_index`) under a new `id`.
    // INVARIANT: a customer's own activity is always staged with a write
    // (`w`) or read (`r`) index entry of that customer: erasure finds the
    // activities to delete through them.
    fn activity(&mut self, tenant: &str, id: u64, pending: &Pending, ledger_index: u64) {
        self.ops
            .push((activity_key(tenant, id), Some(pending.stored(ledger_index))));
    }

    fn link(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }
}

/// What a write records: the activity and its anchor.
#[derive(Debug)]
pub(crate) struct WriteRecord {
    pub(crate) staged: Staged,
    /// The ledger entry that anchors it (already appended).
    pub(crate) ledger_index: u64,
}

/// The anchor callback of a recorded operation: appends the operation's
/// ledger entry carrying the activity hash, and returns its index.
pub type Anchor<'a> = dyn FnOnce(&Pseudonym, &Digest, Vec<WrittenField>) -> Result<u64> + 'a;

impl Engine {
    /// The tenant's keyed hash of a value, as lineage records it.
    pub(crate) fn value_hash(&self, tenant: &str, field: &str, value: &[u8]) -> Vec<u8> {
        self.keyring
            .lineage_key(tenant)
            .token(field, value)
            .to_vec()
    }

    fn new_id(&self) -> Result<u64> {
        Ok(self.store.db.generate_id()?)
    }

    /// Stages the lineage of a write: `activity` (kind collect or update,
    /// with its generated versions filled in) anchored by `anchor`, the
    /// version index entries and the subject link. Called with the
    /// customer's lock held, before the write's transaction.
    pub(crate) fn stage_write(
        &self,
        tenant: &str,
        customer: &str,
        subject: &Pseudonym,
        activity: pb::Activity,
        anchor: Box<Anchor<'_>>,
    ) -> Result<WriteRecord> {
        let fields: Vec<WrittenField> = activity
            .generated
            .iter()
            .map(|g| WrittenField {
                field: g.field.clone(),
                version: g.version,
            })
            .collect();
        let pending = Pending::new(activity);
        let ledger_index = anchor(subject, &pending.hash, fields)?;
        let id = self.new_id()?;
        let mut staged = Staged::default();
        staged.activity(tenant, id, &pending, ledger_index);
        staged.link(
            write_key(tenant, subject, id),
            encode_versions(
                pending
                    .activity
                    .generated
                    .iter()
                    .map(|g| (g.field.as_str(), g.version)),
            ),
        );
        for g in &pending.activity.generated {
            for d in &g.derived_from {
                staged.link(derived_key(tenant, subject, &d.field, id), Vec::new());
            }
        }
        self.link_subject(&mut staged, tenant, customer, subject)?;
        Ok(WriteRecord {
            staged,
            ledger_index,
        })
    }

    /// Records a read (reveal, masked read, refusal or export) of `customer`:
    /// `activity` lists the fields used. The ledger entry is appended by
    /// `anchor` (not durable until the ledger commits); the record is
    /// written before this returns and durable after [`Engine::commit`].
    /// NOT_FOUND if the customer was erased meanwhile.
    pub fn record_access(
        &self,
        tenant: &str,
        customer: &str,
        activity: pb::Activity,
        anchor: impl FnOnce(&Pseudonym, &Digest) -> Result<u64>,
    ) -> Result<u64> {
        let _guard = self.lock(tenant, customer);
        // INVARIANT: under the customer's lock, a customer whose data key is
        // present is not being erased, so the records below cannot outlive
        // the erasure that would remove them.
        let subject = self.pseudonym(tenant, customer, false)?;
        let mut activity = activity;
        activity.subject = subject.0.to_vec();
        let pending = Pending::new(activity);
        let ledger_index = anchor(&subject, &pending.hash)?;
        let id = self.new_id()?;
        let mut staged = Staged::default();
        staged.activity(tenant, id, &pending, ledger_index);
        self.link_subject(&mut staged, tenant, customer, &subject)?;
        // One entry per read, naming its fields (a read that found none of
        // the fields asked for names none, and is still found by erasure).
        staged.link(
            read_key(tenant, &subject, pending.activity.time_ms, id),
            encode_fields(pending.activity.used.iter().map(|u| u.field.as_str())),
        );
        self.apply_staged(&staged)?;
        Ok(ledger_index)
    }

    /// Stages the customer's subject link unless it exists. Every path that
    /// stages per-customer records calls this, with the customer's lock held.
    fn link_subject(
        &self,
        staged: &mut Staged,
        tenant: &str,
        customer: &str,
        subject: &Pseudonym,
    ) -> Result<()> {
        let ck = customer_key(tenant, customer);
        if !self.store.lineage.contains_key(&ck)? {
            staged.link(ck, subject.0.to_vec());
        }
        Ok(())
    }

    /// Applies staged records (no aggregates) as one atomic batch.
    pub(crate) fn apply_staged(&self, staged: &Staged) -> Result<()> {
        // INVARIANT: only erasures stage aggregates, and they go through
        // the erasure's transaction (`Staged::apply`).
        debug_assert!(staged.stats.is_empty());
        let mut batch = sled::Batch::default();
        for (k, v) in &staged.ops {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        Ok(self.store.lineage.apply_batch(batch)?)
    }

    /// Stages the removal of a customer's lineage at erasure: every
    /// per-customer record and index entry, folded first into the
    /// customer-free per-job aggregates. Also stages `erase` (the erasure's
    /// own tenant-level activity and its ledger index), if given.
    ///
    /// `subject` is the customer's pseudonym when the caller could still
    /// compute it; otherwise (crash recovery, after the pad was destroyed)
    /// the subject link written with the customer's first lineage record is
    /// used.
    pub(crate) fn stage_lineage_removal(
        &self,
        tenant: &str,
        customer: &str,
        subject: Option<Pseudonym>,
        erase: Option<(&Pending, u64)>,
    ) -> Result<Staged> {
        let mut staged = Staged::default();
        let ck = customer_key(tenant, customer);
        if let Some((p, index)) = erase {
            let id = self.new_id()?;
            staged.activity(tenant, id, p, index);
        }
        let linked = match self.store.lineage.get(&ck)? {
            Some(s) => {
                staged.ops.push((ck, None));
                Some(
                    Digest::from_slice("subject", &s)
                        .map_err(|_| VaultError::integrity("a lineage subject link"))?,
                )
            }
            None => None,
        };
        let Some(subject) = subject.or(linked) else {
            return Ok(staged);
        };
        let prefix = subject_prefix(tenant, &subject);
        let mut folded: BTreeMap<String, pb::JobLineage> = BTreeMap::new();
        // The customer's own activities: those their write and read entries
        // name (`d` entries may point at tenant-level aggregates, which
        // stay).
        let mut own = std::collections::BTreeSet::new();
        for item in self.store.lineage.scan_prefix(&prefix) {
            let (k, _) = item?;
            let id = match k.get(prefix.len()) {
                Some(&WRITES) | Some(&READS) => id_at_end(&k),
                _ => None,
            };
            own.extend(id);
            staged.ops.push((k.to_vec(), None));
        }
        for id in own {
            let key = activity_key(tenant, id);
            // An undecodable record cannot be folded, but must still go: it
            // may hold the customer's pseudonym.
            if let Some(v) = self.store.lineage.get(&key)? {
                if let Some(a) = StoredActivity::decode(&v[..])
                    .ok()
                    .and_then(|s| pb::Activity::decode(&s.body[..]).ok())
                {
                    fold(&mut folded, &a);
                }
            }
            staged.ops.push((key, None));
        }
        for (name, job) in folded {
            staged.stats.push((stats_key(tenant, &name), job));
        }
        Ok(staged)
    }

    /// Loads activity `id` of `tenant`, checked against its ledger anchor.
    fn load_activity(
        &self,
        ledger: &Ledger,
        tenant: &str,
        subject: Option<&Pseudonym>,
        id: u64,
    ) -> Result<pb::AnchoredActivity> {
        let v = self
            .store
            .lineage
            .get(activity_key(tenant, id))?
            .ok_or_else(|| {
                VaultError::integrity(format!(
                    "lineage activity {id} is indexed but missing: the lineage store was altered"
                ))
            })?;
        let stored = StoredActivity::decode(&v[..])
            .map_err(|_| VaultError::integrity(format!("lineage activity {id} does not decode")))?;
        let hash = activity_hash(&stored.body);
        let altered = || {
            VaultError::integrity(format!(
                "lineage activity {id} does not match the hash carried by ledger entry {}: \
                 the lineage record was altered",
                stored.ledger_index
            ))
        };
        let anchor = match ledger.entry(stored.ledger_index) {
            Ok((_, e)) => e,
            // An index beyond the log: the record points at nothing.
            Err(sovra_ledger::LedgerError::OutOfRange(_)) => return Err(altered()),
            Err(e) => return Err(e.into()),
        };
        if anchor.body.lineage() != Some(&hash) {
            return Err(altered());
        }
        let activity = pb::Activity::decode(&stored.body[..])
            .map_err(|_| VaultError::integrity(format!("lineage activity {id} does not decode")))?;
        // A genuine activity of another customer or tenant, copied under
        // this customer's index, verifies against its own entry: it must
        // also be this customer's.
        let belongs = activity.tenant == tenant
            && match subject {
                Some(s) => {
                    (activity.subject.is_empty() && anchor.body.subject().is_none())
                        || (activity.subject == s.0 && anchor.body.subject() == Some(s))
                }
                None => true,
            };
        if !belongs {
            return Err(VaultError::integrity(format!(
                "lineage activity {id} (ledger entry {}) belongs to another customer: \
                 the lineage index was altered",
                stored.ledger_index
            )));
        }
        Ok(pb::AnchoredActivity {
            activity: Some(activity),
            ledger_index: stored.ledger_index,
            activity_sha256: hash.to_hex(),
        })
    }

    fn lineage_subject(&self, tenant: &str, customer: &str) -> Result<Pseudonym> {
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN)?;
        self.pseudonym(tenant, customer, false)
    }

    /// The lineage of `field` of `customer`: every version, oldest first.
    /// NOT_FOUND for an unknown or erased customer or a field it never had.
    pub fn field_lineage(
        &self,
        ledger: &Ledger,
        tenant: &str,
        customer: &str,
        field: &str,
    ) -> Result<pb::FieldLineage> {
        let subject = self.lineage_subject(tenant, customer)?;
        let prefix = tagged_prefix(tenant, &subject, WRITES);
        let mut versions = Vec::new();
        for item in self.store.lineage.scan_prefix(&prefix) {
            let (k, v) = item?;
            let (Some(id), Some(written)) = (id_at_end(&k), decode_versions(&v)) else {
                return Err(VaultError::integrity("a lineage write index entry"));
            };
            let Some(&(_, version)) = written.iter().find(|(f, _)| *f == field) else {
                continue;
            };
            let a = self.load_activity(ledger, tenant, Some(&subject), id)?;
            let g = a
                .activity
                .as_ref()
                .and_then(|act| {
                    act.generated
                        .iter()
                        .find(|g| g.field == field && g.version == version)
                })
                .cloned()
                .ok_or_else(|| {
                    VaultError::integrity(format!(
                        "lineage activity {id} does not generate version {version} of `{field}`"
                    ))
                })?;
            versions.push(pb::VersionLineage {
                version,
                value_hash: g.value_hash,
                generated_by: a.activity,
                derived_from: g.derived_from,
            });
        }
        versions.sort_by_key(|v| v.version);
        if versions.is_empty() {
            return Err(VaultError::not_found(format!(
                "lineage of field `{field}` of customer `{customer}` (the customer has no value for it)"
            )));
        }
        Ok(pb::FieldLineage {
            field: field.to_owned(),
            versions,
        })
    }

    /// Accesses to `field` of `customer` with `from_ms <= time < to_ms`,
    /// oldest first, at most `limit`, starting after `after` (a page token).
    #[allow(clippy::too_many_arguments)]
    pub fn accesses(
        &self,
        ledger: &Ledger,
        tenant: &str,
        customer: &str,
        field: &str,
        range: (i64, i64),
        limit: u32,
        after: &str,
    ) -> Result<pb::ListAccessesResponse> {
        let (from_ms, to_ms) = check_range(range)?;
        let limit = match limit {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(VaultError::invalid(
                    "limit",
                    format!("{n}; at most {MAX_PAGE}"),
                ))
            }
            n => n,
        } as usize;
        let subject = self.lineage_subject(tenant, customer)?;
        let prefix = tagged_prefix(tenant, &subject, READS);
        let mut start = prefix.clone();
        start.extend_from_slice(&time_key(from_ms));
        if !after.is_empty() {
            let mut b = [0u8; 16];
            hex::decode_to_slice(after, &mut b)
                .map_err(|_| VaultError::invalid("page_token", "not a token this server issued"))?;
            let mut resume = prefix.clone();
            resume.extend_from_slice(&b);
            // Strictly after the last key returned, and never before the
            // range: a token cannot widen it.
            resume.push(0);
            start = start.max(resume);
        }
        let mut end = prefix.clone();
        end.extend_from_slice(&time_key(to_ms));
        if start >= end {
            // A token past the range: nothing left (and sled must not be
            // given a reversed range).
            return Ok(pb::ListAccessesResponse::default());
        }
        let mut out = Vec::new();
        let mut last_tail = Vec::new();
        let mut next = String::new();
        // The customer's reads in the range, oldest first, those of the
        // field kept.
        for item in self.store.lineage.range(start..end) {
            let (k, v) = item?;
            if !has_field(&v, field) {
                continue;
            }
            let tail = &k[prefix.len()..];
            if out.len() == limit {
                // More remain: the next page starts after the last key sent.
                next = hex::encode(&last_tail);
                break;
            }
            let id = be_u64(tail.get(8..16).unwrap_or_default())
                .ok_or_else(|| VaultError::integrity("a lineage read index entry"))?;
            out.push(self.load_activity(ledger, tenant, Some(&subject), id)?);
            last_tail = tail.to_vec();
        }
        Ok(pb::ListAccessesResponse {
            accesses: out,
            next_page_token: next,
        })
    }

    /// The activities that computed on `field` of `customer`, oldest first.
    pub fn derived(
        &self,
        ledger: &Ledger,
        tenant: &str,
        customer: &str,
        field: &str,
    ) -> Result<pb::GetDerivedResponse> {
        let subject = self.lineage_subject(tenant, customer)?;
        let prefix = field_prefix(tenant, &subject, DERIVED, field);
        let mut derived = Vec::new();
        for item in self.store.lineage.scan_prefix(&prefix) {
            let (k, _) = item?;
            let id = be_u64(&k[prefix.len()..])
                .ok_or_else(|| VaultError::integrity("a lineage derivation index entry"))?;
            derived.push(self.load_activity(ledger, tenant, Some(&subject), id)?);
        }
        Ok(pb::GetDerivedResponse { derived })
    }

    /// The tenant's lineage aggregated per job, with no customer id,
    /// pseudonym or value: erased customers' aggregates plus every live
    /// activity folded in. A tenant-wide scan, for batch export.
    pub fn export_lineage(&self, tenant: &str) -> Result<pb::ExportLineageResponse> {
        let prefix = space_prefix(STATS, tenant);
        let mut jobs: BTreeMap<String, pb::JobLineage> = BTreeMap::new();
        for item in self.store.lineage.scan_prefix(&prefix) {
            let (k, v) = item?;
            let job = pb::JobLineage::decode(&v[..])
                .map_err(|_| VaultError::integrity("a lineage aggregate"))?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            jobs.insert(name, job);
        }
        for item in self.store.lineage.scan_prefix(space_prefix(ACTS, tenant)) {
            let (_, v) = item?;
            let a = StoredActivity::decode(&v[..])
                .ok()
                .and_then(|s| pb::Activity::decode(&s.body[..]).ok())
                .ok_or_else(|| VaultError::integrity("a lineage activity does not decode"))?;
            fold(&mut jobs, &a);
        }
        Ok(pb::ExportLineageResponse {
            tenant: tenant.to_owned(),
            jobs: jobs.into_values().collect(),
        })
    }
}

fn check_range((from_ms, to_ms): (i64, i64)) -> Result<(i64, i64)> {
    let now = now_ms();
    if from_ms < 0 {
        return Err(VaultError::invalid(
            "from_ms",
            format!("{from_ms} is before the Unix epoch"),
        ));
    }
    if to_ms < 0 {
        return Err(VaultError::invalid(
            "to_ms",
            format!("{to_ms} is before the Unix epoch"),
        ));
    }
    let to = if to_ms == 0 {
        now.saturating_add(1)
    } else {
        to_ms
    };
    if to > now.saturating_add(FUTURE_SLACK_MS) {
        return Err(VaultError::invalid(
            "to_ms",
            format!("{to_ms} is more than a day in the future; nothing can have happened then"),
        ));
    }
    if from_ms >= to {
        return Err(VaultError::invalid(
            "time range",
            format!(
                "from_ms ({from_ms}) must be before to_ms ({to}); the range is reversed or empty"
            ),
        ));
    }
    Ok((from_ms, to))
}

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

/// What a sandbox job computed, for [`Recorder::record_job`].
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

/// Records what the sandbox computes. The sandbox calls this from its
/// release gate; each call appends the job's ledger entry (kind 7) carrying
/// the hash of the job's tenant-level activity, and one write entry per
/// per-customer output, and is durable when it returns.
#[derive(Debug, Clone)]
pub struct Recorder {
    engine: Arc<Engine>,
    ledger: Arc<Ledger>,
}

impl Recorder {
    /// A recorder over the vault's engine and ledger.
    pub fn new(engine: Arc<Engine>, ledger: Arc<Ledger>) -> Self {
        Self { engine, ledger }
    }

    /// Records `job`: a tenant-level compute activity that used the features
    /// (no customer listed) and generated the output, derived INDIRECT from
    /// the cohort's features for aggregates; per customer, a `derived` link
    /// from each feature to it, and for per-customer outputs a compute
    /// activity generating the customer's output version, derived from the
    /// feature versions it was computed from. Durable when it returns; the
    /// job entry's ledger index.
    ///
    /// Refuses malformed ids, features or outputs, an output named like a
    /// schema field (its versions belong to the record store), and
    /// per-customer outputs for customers outside the cohort. A customer of
    /// the cohort erased since the job ran is skipped. If recording fails
    /// part-way, what was recorded stays anchored and the error is returned:
    /// the release gate must then not release the output.
    pub async fn record_job(&self, job: &JobRecord) -> Result<u64> {
        self.check(job)?;
        let this = self.clone();
        let job = job.clone();
        let index = tokio::task::spawn_blocking(move || this.record_job_now(&job))
            .await
            .map_err(|_| VaultError::storage("the lineage recording task failed"))??;
        let (l, e) = tokio::join!(self.ledger.commit(), self.engine.commit());
        l?;
        e?;
        Ok(index)
    }

    fn check(&self, job: &JobRecord) -> Result<()> {
        validate_id("tenant", &job.tenant, 64)?;
        validate_id("job_id", &job.job_id, 128)?;
        validate_id("output", &job.output, 64)?;
        if self.engine.schema().field(&job.output).is_ok() {
            return Err(VaultError::invalid(
                "output",
                format!(
                    "`{}` is a schema field; job outputs need names of their own",
                    job.output
                ),
            ));
        }
        if job.features.is_empty() {
            return Err(VaultError::invalid("features", "at least one is required"));
        }
        for f in &job.features {
            validate_id("features", f, 64)?;
        }
        for c in &job.cohort {
            validate_id("cohort", c, MAX_CUSTOMER_ID_LEN)?;
        }
        let cohort: std::collections::BTreeSet<&str> =
            job.cohort.iter().map(String::as_str).collect();
        if let Some((c, _)) = job
            .per_customer
            .iter()
            .find(|(c, _)| !cohort.contains(c.as_str()))
        {
            return Err(VaultError::invalid(
                "per_customer",
                format!("customer `{c}` has an output but is not in the cohort"),
            ));
        }
        Ok(())
    }

    fn record_job_now(&self, job: &JobRecord) -> Result<u64> {
        let engine = &self.engine;
        let tenant = job.tenant.as_str();
        let cohort: std::collections::BTreeSet<&str> =
            job.cohort.iter().map(String::as_str).collect();
        let aggregate = job.per_customer.is_empty();
        let mut act = job.agent.activity(pb::ActivityKind::Compute, tenant);
        act.job_id = job.job_id.clone();
        act.spec_sha256 = job.spec_sha256.to_hex();
        act.cohort_size = cohort.len() as u64;
        let sub = if aggregate {
            transformation(
                pb::TransformationType::Indirect,
                pb::TransformationSubtype::Aggregation,
                false,
                &job.transformation.description,
            )
        } else {
            job.transformation.clone()
        };
        act.used = job
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
            field: job.output.clone(),
            version: 0,
            value_hash: String::new(),
            derived_from: job
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
        let pending = Pending::new(act);
        let index = appended_index(self.ledger.append(&[sovra_ledger::Body::JobRun(
            sovra_ledger::entry::JobRun {
                tenant: tenant.to_owned(),
                actor: job.agent.name.clone(),
                job_id: job.job_id.clone(),
                spec_sha256: job.spec_sha256,
                purpose: job.agent.purpose.clone(),
                cohort_size: cohort.len() as u64,
                output_sha256: job.output_sha256,
                lineage: pending.hash,
            },
        )])?)?;
        let job_act = engine.new_id()?;
        let mut staged = Staged::default();
        staged.activity(tenant, job_act, &pending, index);
        engine.apply_staged(&staged)?;
        let outputs: BTreeMap<&str, &Vec<u8>> = job
            .per_customer
            .iter()
            .map(|(c, v)| (c.as_str(), v))
            .collect();
        for customer in cohort {
            let _guard = engine.lock(tenant, customer);
            let subject = match engine.pseudonym(tenant, customer, false) {
                Ok(s) => s,
                // Erased since the job ran: nothing of theirs to link.
                Err(VaultError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let Some(value) = outputs.get(customer) else {
                // An aggregate (or no output for this customer): the
                // customer's features fed the job-level activity.
                let mut staged = Staged::default();
                engine.link_subject(&mut staged, tenant, customer, &subject)?;
                for f in &job.features {
                    staged.link(derived_key(tenant, &subject, f, job_act), Vec::new());
                }
                engine.apply_staged(&staged)?;
                continue;
            };
            let latest = engine.latest_versions(tenant, &subject)?;
            let version = match latest.get(&job.output) {
                Some(v) => v
                    .checked_add(1)
                    .ok_or_else(|| VaultError::integrity("a lineage version"))?,
                None => 1,
            };
            let used: Vec<(String, u64)> = job
                .features
                .iter()
                .filter_map(|f| latest.get(f).map(|v| (f.clone(), *v)))
                .collect();
            let mut act = job.agent.activity(pb::ActivityKind::Compute, tenant);
            act.subject = subject.0.to_vec();
            act.job_id = job.job_id.clone();
            act.spec_sha256 = job.spec_sha256.to_hex();
            act.used = used
                .iter()
                .map(|(f, v)| pb::Usage {
                    field: f.clone(),
                    version: *v,
                    transformation: Some(job.transformation.clone()),
                    disclosure: String::new(),
                })
                .collect();
            act.generated = vec![pb::Generation {
                field: job.output.clone(),
                version,
                value_hash: hex::encode(engine.value_hash(tenant, &job.output, value)),
                derived_from: used
                    .iter()
                    .map(|(f, v)| pb::Derivation {
                        field: f.clone(),
                        version: *v,
                        transformation: Some(job.transformation.clone()),
                    })
                    .collect(),
                transformation: Some(job.transformation.clone()),
            }];
            // The customer's output is a write of a derived value: the same
            // record and anchor as any write, from the sandbox channel.
            let ledger = &self.ledger;
            let record = engine.stage_write(
                tenant,
                customer,
                &subject,
                act,
                Box::new(|subject, hash, fields| {
                    appended_index(ledger.append(&[sovra_ledger::Body::FieldsWritten(
                        sovra_ledger::entry::Write {
                            tenant: tenant.to_owned(),
                            subject: *subject,
                            actor: job.agent.name.clone(),
                            channel: format!("sandbox:{}", job.job_id),
                            fields,
                            lineage: *hash,
                        },
                    )])?)
                }),
            )?;
            engine.apply_staged(&record.staged)?;
        }
        Ok(index)
    }
}

impl Engine {
    /// The latest version of every field in the customer's lineage.
    fn latest_versions(&self, tenant: &str, subject: &Pseudonym) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for item in self
            .store
            .lineage
            .scan_prefix(tagged_prefix(tenant, subject, WRITES))
        {
            let (_, v) = item?;
            for (f, version) in decode_versions(&v)
                .ok_or_else(|| VaultError::integrity("a lineage write index entry"))?
            {
                let e = out.entry(f.to_owned()).or_insert(0);
                *e = (*e).max(version);
            }
        }
        Ok(out)
    }
}
