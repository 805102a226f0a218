//! The lineage store: the `lineage` tree, its key layouts, and the
//! [`LineageStore`] component that records and queries activities in it.
//! The engine holds the store; callers resolve customers to pseudonyms (and
//! hold the customer's lock) before calling it, so nothing here reads a data
//! key or knows a customer's id beyond the subject link.
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
//! - `C tenant 0 ref` → S (ref: the customer's [`CustomerRef`], never its id), so that an erasure interrupted by a crash can
//!   still find the customer's lineage once the pseudonym can no longer be
//!   computed
//! - `G tenant 0 job` → [`pb::JobLineage`]: the aggregated, customer-free
//!   lineage of erased customers' activities
//!
//! Guarantees: writes that belong to an operation of several trees are
//! staged ([`Staged`]) and applied inside that operation's transaction;
//! everything else is applied as one atomic batch of this tree. Every
//! activity a query returns is checked against its ledger anchor.
//!
//! Does not guarantee: that a caller holds the customer's lock; the engine
//! does (see `Engine::record_access`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use prost::Message;
use sled::transaction::ConflictableTransactionError;

use crate::store::{Tx, Writer};
use sovra_ledger::entry::WrittenField;
use sovra_ledger::{Digest, Ledger, Pseudonym};
use sovra_proto::lineage::v1 as pb;

use super::{activity_hash, fold, merge, Anchor, Pending, StoredActivity, MAX_PAGE};
use crate::clock::now_ms;
use crate::crypto::keys::{CustomerRef, KeyRing};
use crate::error::{Result, VaultError};

/// How far in the future a range may end.
const FUTURE_SLACK_MS: i64 = 24 * 3600 * 1000;

const SEP: u8 = 0;
const WRITES: u8 = b'w';
const READS: u8 = b'r';
const DERIVED: u8 = b'd';

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

fn customer_key(tenant: &str, customer: &CustomerRef) -> Vec<u8> {
    let mut k = space_prefix(SUBJECTS, tenant);
    k.extend_from_slice(&customer.0);
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
        t: &Tx<'_>,
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

// --- queries ---------------------------------------------------------------

/// A checked page of an access query: `from_ms <= time < to_ms`, at most
/// `limit` accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    from_ms: i64,
    to_ms: i64,
    limit: usize,
}

impl Page {
    /// Checks a range (`to_ms` 0 means now) and a limit (0 means 100, at
    /// most [`MAX_PAGE`]). Checked before the customer is looked up, so a
    /// malformed query is INVALID_ARGUMENT whoever it names.
    pub fn new(range: (i64, i64), limit: u32) -> Result<Page> {
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
        Ok(Page {
            from_ms,
            to_ms,
            limit,
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

// --- the component ---------------------------------------------------------

/// The `meta` key of the end (exclusive) of the reserved id block.
const IDS_KEY: &[u8] = b"lineage-ids";

/// Ids reserved per logged reservation.
const ID_BLOCK: u64 = 4096;

/// The id block being handed out: `next..end`.
#[derive(Debug)]
struct Ids {
    next: u64,
    end: u64,
}

/// The `lineage` tree, and the tenant lineage keys that value hashes are
/// made with.
pub struct LineageStore {
    // Activity ids come from blocks reserved through the write-ahead log
    // (see `Ids`): unique in the database, across crashes and restores of
    // the view too, so an id is never reused for another activity.
    ids: Mutex<Ids>,
    meta: sled::Tree,
    tree: sled::Tree,
    writer: Writer,
    // Only its lineage keys (value hashes) and customer references are
    // used; the store never sees a
    // data key.
    keyring: Arc<KeyRing>,
}

impl std::fmt::Debug for LineageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineageStore")
    }
}

impl LineageStore {
    /// The store over `tree` (the `lineage` tree of `db`).
    ///
    /// `meta` holds the end of the reserved id block; a database from
    /// before blocks were logged starts above sled's own id generator
    /// (`db`), which is above every id it handed out.
    pub(crate) fn new(
        db: &sled::Db,
        meta: sled::Tree,
        tree: sled::Tree,
        writer: Writer,
        keyring: Arc<KeyRing>,
    ) -> Result<Self> {
        let reserved = match meta.get(IDS_KEY)? {
            None => 0,
            Some(v) => <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    VaultError::integrity("the reserved lineage ids (meta `lineage-ids`)")
                })?,
        };
        let next = reserved.max(db.generate_id()?);
        Ok(Self {
            ids: Mutex::new(Ids { next, end: next }),
            meta,
            tree,
            writer,
            keyring,
        })
    }

    /// The tree, for the transactions that apply [`Staged`] writes.
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The tenant's keyed hash of a value, as lineage records it.
    pub(crate) fn value_hash(&self, tenant: &str, field: &str, value: &[u8]) -> Vec<u8> {
        self.keyring
            .lineage_key(tenant)
            .token(field, value)
            .to_vec()
    }

    /// A new activity id, unique in the database.
    fn new_id(&self) -> Result<u64> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.next == ids.end {
            let end = ids
                .next
                .checked_add(ID_BLOCK)
                .ok_or_else(|| VaultError::integrity("the lineage id space is exhausted"))?;
            // INVARIANT: the block's end is logged before any of its ids is
            // used, so every logged record that holds an id lies after the
            // reservation that covers it: replaying the log (after a crash,
            // or into a restored older view) restores a reservation at
            // least as high as any id in the view.
            self.writer.insert(&self.meta, IDS_KEY, end.to_be_bytes())?;
            ids.end = end;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
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

    /// Records a read (reveal, masked read, refusal or export) of
    /// `customer`, whose pseudonym is `subject`: `activity` lists the fields
    /// used. The ledger entry is appended by `anchor` (not durable until the
    /// ledger commits); the record is written before this returns and
    /// durable after the store's next commit. Called with the customer's
    /// lock held and `subject` computed under it (see `Engine::record_access`).
    pub(crate) fn record_access(
        &self,
        tenant: &str,
        customer: &str,
        subject: &Pseudonym,
        activity: pb::Activity,
        anchor: impl FnOnce(&Pseudonym, &Digest) -> Result<u64>,
    ) -> Result<u64> {
        let mut activity = activity;
        activity.subject = subject.0.to_vec();
        let pending = Pending::new(activity);
        let ledger_index = anchor(subject, &pending.hash)?;
        let id = self.new_id()?;
        let mut staged = Staged::default();
        staged.activity(tenant, id, &pending, ledger_index);
        self.link_subject(&mut staged, tenant, customer, subject)?;
        // One entry per read, naming its fields (a read that found none of
        // the fields asked for names none, and is still found by erasure).
        staged.link(
            read_key(tenant, subject, pending.activity.time_ms, id),
            encode_fields(pending.activity.used.iter().map(|u| u.field.as_str())),
        );
        self.apply_staged(&staged)?;
        Ok(ledger_index)
    }

    /// Stages the customer's subject link unless it exists. Every path that
    /// stages per-customer records calls this, with the customer's lock held.
    pub(crate) fn link_subject(
        &self,
        staged: &mut Staged,
        tenant: &str,
        customer: &str,
        subject: &Pseudonym,
    ) -> Result<()> {
        let ck = customer_key(tenant, &self.keyring.customer_ref(tenant, customer));
        if !self.tree.contains_key(&ck)? {
            staged.link(ck, subject.0.to_vec());
        }
        Ok(())
    }

    /// Applies staged records (no aggregates) as one atomic batch.
    pub(crate) fn apply_staged(&self, staged: &Staged) -> Result<()> {
        // INVARIANT: only erasures stage aggregates, and they go through
        // the erasure's transaction (`Staged::apply`).
        debug_assert!(staged.stats.is_empty());
        let writes: Vec<(&[u8], Option<&[u8]>)> = staged
            .ops
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect();
        self.writer.write(&self.tree, &writes)?;
        Ok(())
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
    pub(crate) fn stage_removal(
        &self,
        tenant: &str,
        customer: &CustomerRef,
        subject: Option<Pseudonym>,
        erase: Option<(&Pending, u64)>,
    ) -> Result<Staged> {
        let mut staged = Staged::default();
        let ck = customer_key(tenant, customer);
        if let Some((p, index)) = erase {
            let id = self.new_id()?;
            staged.activity(tenant, id, p, index);
        }
        let linked = match self.tree.get(&ck)? {
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
        for item in self.tree.scan_prefix(&prefix) {
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
            if let Some(v) = self.tree.get(&key)? {
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
        let v = self.tree.get(activity_key(tenant, id))?.ok_or_else(|| {
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

    /// The lineage of `field` of `customer` (pseudonym `subject`): every
    /// version, oldest first. NOT_FOUND for a field it never had.
    pub fn field_lineage(
        &self,
        ledger: &Ledger,
        tenant: &str,
        customer: &str,
        subject: &Pseudonym,
        field: &str,
    ) -> Result<pb::FieldLineage> {
        let prefix = tagged_prefix(tenant, subject, WRITES);
        let mut versions = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            let (Some(id), Some(written)) = (id_at_end(&k), decode_versions(&v)) else {
                return Err(VaultError::integrity("a lineage write index entry"));
            };
            let Some(&(_, version)) = written.iter().find(|(f, _)| *f == field) else {
                continue;
            };
            let a = self.load_activity(ledger, tenant, Some(subject), id)?;
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

    /// Accesses to `field` of the customer whose pseudonym is `subject`, in
    /// `page` (checked by [`Page::new`]), oldest first, starting after
    /// `after` (a page token).
    pub fn accesses(
        &self,
        ledger: &Ledger,
        tenant: &str,
        subject: &Pseudonym,
        field: &str,
        page: &Page,
        after: &str,
    ) -> Result<pb::ListAccessesResponse> {
        let Page {
            from_ms,
            to_ms,
            limit,
        } = *page;
        let prefix = tagged_prefix(tenant, subject, READS);
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
        for item in self.tree.range(start..end) {
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
            out.push(self.load_activity(ledger, tenant, Some(subject), id)?);
            last_tail = tail.to_vec();
        }
        Ok(pb::ListAccessesResponse {
            accesses: out,
            next_page_token: next,
        })
    }

    /// The activities that computed on `field` of the customer whose
    /// pseudonym is `subject`, oldest first.
    pub fn derived(
        &self,
        ledger: &Ledger,
        tenant: &str,
        subject: &Pseudonym,
        field: &str,
    ) -> Result<pb::GetDerivedResponse> {
        let prefix = field_prefix(tenant, subject, DERIVED, field);
        let mut derived = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, _) = item?;
            let id = be_u64(&k[prefix.len()..])
                .ok_or_else(|| VaultError::integrity("a lineage derivation index entry"))?;
            derived.push(self.load_activity(ledger, tenant, Some(subject), id)?);
        }
        Ok(pb::GetDerivedResponse { derived })
    }

    /// The tenant's lineage aggregated per job, with no customer id,
    /// pseudonym or value: erased customers' aggregates plus every live
    /// activity folded in. A tenant-wide scan, for batch export.
    pub fn export(&self, tenant: &str) -> Result<pb::ExportLineageResponse> {
        let prefix = space_prefix(STATS, tenant);
        let mut jobs: BTreeMap<String, pb::JobLineage> = BTreeMap::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            let job = pb::JobLineage::decode(&v[..])
                .map_err(|_| VaultError::integrity("a lineage aggregate"))?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            jobs.insert(name, job);
        }
        for item in self.tree.scan_prefix(space_prefix(ACTS, tenant)) {
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

    /// The latest version of every field in the customer's lineage.
    pub(crate) fn latest_versions(
        &self,
        tenant: &str,
        subject: &Pseudonym,
    ) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for item in self
            .tree
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

    /// Stores `pending`, a tenant-level activity (no customer's own, so no
    /// index entry) anchored at ledger entry `ledger_index`; returns its id.
    pub(crate) fn store_activity(
        &self,
        tenant: &str,
        pending: &Pending,
        ledger_index: u64,
    ) -> Result<u64> {
        let id = self.new_id()?;
        let mut staged = Staged::default();
        staged.activity(tenant, id, pending, ledger_index);
        self.apply_staged(&staged)?;
        Ok(id)
    }

    /// Records that activity `id` computed on `fields` of `customer`
    /// (pseudonym `subject`). Called with the customer's lock held.
    pub(crate) fn link_derived(
        &self,
        tenant: &str,
        customer: &str,
        subject: &Pseudonym,
        fields: &[String],
        id: u64,
    ) -> Result<()> {
        let mut staged = Staged::default();
        self.link_subject(&mut staged, tenant, customer, subject)?;
        for f in fields {
            staged.link(derived_key(tenant, subject, f, id), Vec::new());
        }
        self.apply_staged(&staged)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::Path;

    use super::*;
    use crate::crypto::keys::RootKey;
    use crate::store::Store;

    fn open(dir: &Path) -> (Store, LineageStore) {
        let wal = sovra_wal::Wal::open(&dir.join("wal"), sovra_wal::WalOptions::default())
            .unwrap()
            .wal;
        let wal = Arc::new(wal);
        // A store just dropped may still hold sled's lock for a moment
        // (its background threads end on their own).
        let mut tries = 0;
        let store = loop {
            match Store::open(dir, wal.clone()) {
                Ok(s) => break s,
                Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let ring = Arc::new(KeyRing::new(RootKey::from_hex(&"11".repeat(32)).unwrap()));
        let ids = LineageStore::new(
            &store.db,
            store.meta.clone(),
            store.lineage.clone(),
            store.writer.clone(),
            ring,
        )
        .unwrap();
        (store, ids)
    }

    /// Copies `from` into `to`, the write-ahead log left out.
    fn copy_view(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_name() == "wal" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                copy_view(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }

    /// A damaged reservation is refused, naming it, rather than taken
    /// for "no ids handed out yet".
    #[test]
    fn a_damaged_id_reservation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = open(dir.path());
        drop(ids);
        store
            .writer
            .insert(&store.meta, IDS_KEY, [1u8, 2, 3])
            .unwrap();
        let ring = Arc::new(KeyRing::new(RootKey::from_hex(&"11".repeat(32)).unwrap()));
        let e = LineageStore::new(
            &store.db,
            store.meta.clone(),
            store.lineage.clone(),
            store.writer.clone(),
            ring,
        )
        .unwrap_err();
        assert!(e.to_string().contains("lineage-ids"), "{e}");
    }

    /// An older copy of the view, restored under a newer log, hands out no
    /// id the log's records already hold, even after more ids than sled's
    /// own generator skips at a restart (1,000,000).
    #[test]
    fn ids_never_repeat_after_an_older_view_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let (data, snap) = (dir.path().join("data"), dir.path().join("snap"));
        let (store, ids) = open(&data);
        let first: HashSet<u64> = (0..10).map(|_| ids.new_id().unwrap()).collect();
        store.flush().unwrap();
        drop((ids, store));
        copy_view(&data, &snap);
        let (store, ids) = open(&data);
        let mut last = 0;
        for _ in 0..1_100_000 {
            let id = ids.new_id().unwrap();
            assert!(id > last && !first.contains(&id));
            last = id;
        }
        store.flush().unwrap();
        drop((ids, store));
        for e in std::fs::read_dir(&data).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n == "wal") {
                continue;
            }
            if p.is_dir() {
                std::fs::remove_dir_all(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
        copy_view(&snap, &data);
        let (_store, ids) = open(&data);
        let next = ids.new_id().unwrap();
        assert!(
            next > last,
            "id {next} was handed out again (the last was {last})"
        );
    }
}
