//! Storage layout on sled, a view of the write-ahead log.
//!
//! One sled database per data directory, one tree per concern:
//! - `records`: `tenant 0 ref` → [`FieldSet`]: every field the customer
//!   holds, each a sealed [`StoredField`] (one value per customer, so a
//!   write of many fields is one insert and a read is one lookup)
//! - `data_keys`: `tenant 0 ref` → [`WrappedKey`](crate::crypto::keys::WrappedKey)
//!   (which holds the customer id, sealed under a key derived from the pad)
//! - `blind_index`: `tenant 0 field 0 token ref` → empty
//!
//! `ref` is the customer's [`CustomerRef`], a 16-byte keyed pseudonym of
//! the customer id: no key and no value holds a customer id in the clear.
//! - `meta`: `keystate 0 tenant` → tenant key state
//! - `lineage`: field lineage (see `lineage.rs` for its key spaces)
//! - `fhe_features`: feature slot reservations and slots, each with its
//!   pending mark; `fhe_blocks`: the
//!   packed TFHE blocks and the tenants' wrapped TFHE keys (see
//!   `engine/features.rs`; the large values have a tree of their own, so
//!   updating a small key never makes sled rewrite a node holding a block)
//! - `idempotency`: keyed hash of (tenant, principal, idempotency key) →
//!   [`IdempotencyRecord`], kept for [`IDEMPOTENCY_RETENTION_MS`]
//! - `contracts`: `tenant 0 id 0 version` (u32, big-endian) →
//!   [`ContractRecord`]: a registered CRM contract version, its manifest,
//!   its compiled guest and the ledger entries that registered and disabled
//!   it (checked against the ledger at start, `contracts::check`)
//! - `contract_runtime`: the contracts' instances, outbox, timers, inbox
//!   and signal keys, each under a one-byte prefix (the layout is in
//!   `engine/contract_runtime.rs`); one tree, so one runtime step is one
//!   logged write
//!
//! Beside it, `shred.slots` holds each customer's pad (see `shred.rs`).
//!
//! Every write goes through the [`Writer`] (see `log.rs`), which logs it in
//! the data directory's write-ahead log (`wal/`); sled is flushed only by
//! [`Store::flush_view`].
//!
//! Guarantees: [`Store::commit`] returns only once every write made before
//! it was called is durable in the log (the shred slots are synced before
//! each group is written). Concurrent callers share one sync (group
//! commit), so durable writes cost one fsync per group, not per write.
//!
//! Does not guarantee: that removed bytes are overwritten on disk. sled and
//! the log are append-only, so a removed wrapped key may survive in an old
//! sled segment until it is reused, and in a log segment until it is
//! retired (SECURITY.md says what this means for erasure: the pads are
//! never logged).

pub(crate) mod log;

use std::sync::Arc;

use sovra_wal::Wal;

pub(crate) use self::log::{Tx, Writer};
use crate::crypto::keys::CustomerRef;
use crate::crypto::shred::ShredSlots;
use crate::error::{Result, VaultError};

// INVARIANT: tenants and field names are validated to contain no 0 byte
// (see `validate_id` and the schema's identifier rule), and a customer
// reference and a blind-index token have fixed lengths, so the 0 separators
// below make every key layout unambiguous and every prefix scan exact.
const SEP: u8 = 0;

/// One stored value version of a field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredField {
    /// The value version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// The AES-GCM nonce.
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// The sealed value.
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
    /// Collection channel.
    #[prost(string, tag = "4")]
    pub channel: String,
    /// Collector.
    #[prost(string, tag = "5")]
    pub collector: String,
    /// Consent reference.
    #[prost(string, tag = "6")]
    pub consent_ref: String,
    /// When this version was written.
    #[prost(int64, tag = "7")]
    pub collected_at_ms: i64,
    /// The blind-index token of this value, if the field is indexed; kept so
    /// that updates and erasure can remove the index entry without
    /// decrypting.
    #[prost(bytes = "vec", tag = "8")]
    pub index_token: Vec<u8>,
    /// The data-key generation that sealed this value.
    #[prost(uint32, tag = "9")]
    pub dek_version: u32,
    /// The record format: 0 (absent) for values written before format 2,
    /// whose provenance is outside the associated data; 2 binds channel,
    /// collector, consent reference, time and index token to the value.
    #[prost(uint32, tag = "10")]
    pub format: u32,
}

/// What a write with an idempotency key stored, so that a retry gets the
/// same answer and writes nothing (`idempotency` tree; the key is a keyed
/// hash of the principal and the client's key, never the key itself).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdempotencyRecord {
    /// Keyed hash of the request (customer, fields and values, source): a
    /// retry must be the same request.
    #[prost(bytes = "vec", tag = "1")]
    pub request_mac: Vec<u8>,
    /// Whether the write created the customer.
    #[prost(bool, tag = "2")]
    pub created: bool,
    /// The versions it wrote, by field.
    #[prost(string, repeated, tag = "3")]
    pub fields: Vec<String>,
    /// The versions, in the order of `fields`.
    #[prost(uint64, repeated, tag = "4")]
    pub versions: Vec<u64>,
    /// When it was written (ms since the epoch).
    #[prost(int64, tag = "5")]
    pub written_at_ms: i64,
}

/// How long a write's idempotency record answers retries: one day.
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 3600 * 1000;

impl IdempotencyRecord {
    /// The stored record, if it still answers retries at `now`. A record
    /// that does not decode is damage, refused: dropping it would let a
    /// retry write twice.
    pub(crate) fn live(bytes: &[u8], now: i64) -> Result<Option<IdempotencyRecord>> {
        let r = <IdempotencyRecord as prost::Message>::decode(bytes)
            .map_err(|_| VaultError::integrity("an idempotency record"))?;
        Ok((r.written_at_ms.saturating_add(IDEMPOTENCY_RETENTION_MS) > now).then_some(r))
    }
}

/// The record format this build writes.
pub const RECORD_FORMAT: u32 = 2;

impl StoredField {
    /// The provenance bound into the value's associated data, or `None`
    /// for a format-0 record. Another format is refused (a newer build's
    /// record, or damage), naming `what`.
    pub(crate) fn provenance(
        &self,
        what: impl FnOnce() -> String,
    ) -> Result<Option<crate::crypto::envelope::Provenance<'_>>> {
        match self.format {
            0 => Ok(None),
            RECORD_FORMAT => Ok(Some(crate::crypto::envelope::Provenance {
                channel: &self.channel,
                collector: &self.collector,
                consent_ref: &self.consent_ref,
                collected_at_ms: self.collected_at_ms,
                index_token: &self.index_token,
            })),
            f => Err(VaultError::integrity(format!(
                "{} (record format {f}; this build reads 0 and {RECORD_FORMAT})",
                what()
            ))),
        }
    }
}

/// A registered contract version (tree `contracts`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContractRecord {
    /// The manifest, as registered.
    #[prost(string, tag = "1")]
    pub manifest: String,
    /// The guest's WebAssembly binary (empty without a guest).
    #[prost(bytes = "vec", tag = "2")]
    pub wasm: Vec<u8>,
    /// The pin: SHA-256 of the manifest and the binary.
    #[prost(bytes = "vec", tag = "3")]
    pub sha256: Vec<u8>,
    /// When it was registered.
    #[prost(int64, tag = "4")]
    pub registered_at_ms: i64,
    /// Who registered it.
    #[prost(string, tag = "5")]
    pub registered_by: String,
    /// The ledger entry that registered it.
    #[prost(uint64, tag = "6")]
    pub registered_entry: u64,
    /// The ledger entry that disabled it (0: not disabled).
    #[prost(uint64, tag = "7")]
    pub disabled_entry: u64,
    /// The manifest's file name at registration (for error messages).
    #[prost(string, tag = "8")]
    pub file_name: String,
    /// The manifest's purpose (a summary of the checked manifest).
    #[prost(string, tag = "9")]
    pub purpose: String,
    /// Its department.
    #[prost(string, tag = "10")]
    pub department: String,
    /// Its triggers, as `kind` or `kind:name`.
    #[prost(string, repeated, tag = "11")]
    pub triggers: Vec<String>,
    /// Its capabilities.
    #[prost(string, repeated, tag = "12")]
    pub capabilities: Vec<String>,
    /// Its declared actions' ids.
    #[prost(string, repeated, tag = "13")]
    pub actions: Vec<String>,
}

/// The key of a contract version.
pub(crate) fn contract_key(tenant: &str, id: &str, version: u32) -> Vec<u8> {
    let mut k = contract_prefix(tenant, Some(id));
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// The prefix of a tenant's contracts, or of one id's versions.
pub(crate) fn contract_prefix(tenant: &str, id: Option<&str>) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    if let Some(id) = id {
        k.extend_from_slice(id.as_bytes());
        k.push(SEP);
    }
    k
}

/// The sled database and its trees.
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) records: sled::Tree,
    pub(crate) data_keys: sled::Tree,
    pub(crate) index: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) lineage: sled::Tree,
    pub(crate) features: sled::Tree,
    pub(crate) feature_blocks: sled::Tree,
    pub(crate) idempotency: sled::Tree,
    pub(crate) contracts: sled::Tree,
    pub(crate) contract_runtime: sled::Tree,
    pub(crate) slots: Arc<ShredSlots>,
    pub(crate) dir: std::path::PathBuf,
    /// Every write to the trees above goes through it.
    pub(crate) writer: Writer,
}

/// `meta` key: the log position the view holds (see `log.rs`). View
/// bookkeeping, written outside the log.
const WAL_APPLIED_KEY: &[u8] = b"wal-applied";

/// The `meta` keys written outside the log: what this view (this server's
/// data directory) recorded, never copied into another vault's log by
/// `sovra migrate`. `access/policy.rs` and `app/recovery.rs` test that
/// their keys are listed.
pub(crate) const VIEW_ONLY_META_KEYS: &[&[u8]] =
    &[WAL_APPLIED_KEY, b"policy_sha256", b"ledger-anchor"];

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Where the shred pads are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PadPlace {
    /// A slot file overwritten in place (`shred.slots`): the default, on
    /// either backend; an erasure leaves no copy of the pad anywhere Sovra
    /// wrote.
    File(std::path::PathBuf),
    /// Rows of the PostgreSQL log's `pads` table, written with its groups:
    /// every server that takes the sequencer lease has them, but a deleted
    /// row survives in PostgreSQL's history (SECURITY.md).
    Database,
}

impl Store {
    /// Opens (or creates) the database under `dir`, a view of `wal`, with
    /// the pads in `dir/shred.slots`: the writes the log holds beyond the
    /// view's position are applied again.
    pub fn open(dir: &std::path::Path, wal: Arc<Wal>) -> Result<Store> {
        Store::open_at(dir, wal, &PadPlace::File(dir.join("shred.slots")))
    }

    /// [`Store::open`] with the pads where `pads` says.
    pub fn open_at(dir: &std::path::Path, wal: Arc<Wal>, pads: &PadPlace) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| {
            VaultError::config(
                dir.display().to_string(),
                format!("cannot create the data directory: {e}"),
            )
        })?;
        // sled writes on its own only when a buffer fills: the log, not
        // sled's flusher, is what makes a write durable.
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .cache_capacity(256 * 1024 * 1024);
        let db = sovra_ledger::open_sled(&config).map_err(|e| {
            VaultError::config(
                dir.display().to_string(),
                match e {
                    sovra_ledger::SledOpenError::Damaged => {
                        "the vault database is damaged (a file is truncated or altered) and cannot be opened; restore it from a backup".to_owned()
                    }
                    e => format!("cannot open the database: {e}"),
                },
            )
        })?;
        let records = db.open_tree("records")?;
        let data_keys = db.open_tree("data_keys")?;
        let index = db.open_tree("blind_index")?;
        let meta = db.open_tree("meta")?;
        let lineage = db.open_tree("lineage")?;
        let features = db.open_tree("fhe_features")?;
        let feature_blocks = db.open_tree("fhe_blocks")?;
        let idempotency = db.open_tree("idempotency")?;
        let contracts = db.open_tree("contracts")?;
        let contract_runtime = db.open_tree("contract_runtime")?;
        // Opened after sled, whose lock keeps a second server out.
        let slots = match pads {
            // INVARIANT: a pad's row is staged before the frame that
            // references it is appended, so it is written in that frame's
            // group's transaction or an earlier one.
            PadPlace::Database if wal.is_postgres() => {
                Arc::new(ShredSlots::in_postgres(wal.clone())?)
            }
            PadPlace::Database => {
                return Err(VaultError::config(
                    "[storage] pads",
                    "pads can be kept in the database only with `postgres` set",
                ))
            }
            PadPlace::File(path) => Arc::new(ShredSlots::open(path)?),
        };
        if !slots.in_database() {
            // INVARIANT: pads are written before the frame that references
            // them is appended, and synced before any group is written, so
            // a durable data key never references a pad that is not.
            let s = slots.clone();
            wal.set_before_write(move || s.sync().map_err(|e| e.to_string()));
        }
        let writer = Writer::new(db.clone(), wal.clone());
        let store = Store {
            db,
            records,
            data_keys,
            index,
            meta,
            lineage,
            features,
            feature_blocks,
            idempotency,
            contracts,
            contract_runtime,
            slots,
            dir: dir.to_path_buf(),
            writer,
        };
        store.catch_up(&wal)?;
        Ok(store)
    }

    /// Applies the log's writes from the view's position on, then flushes
    /// the view.
    fn catch_up(&self, wal: &Wal) -> Result<()> {
        let durable = wal.durable_lsn()?;
        let from = match self.meta.get(WAL_APPLIED_KEY)? {
            Some(v) => <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .map_err(|_| VaultError::integrity("the vault's recorded log position"))?,
            // A vault from before the log (flushed at every commit) starts
            // it here; only an empty log may meet it.
            None if durable == wal.first_lsn() => durable,
            // A log kept in PostgreSQL holds every write from LSN 0: an
            // empty view beside it (a new server, or a cache that was
            // cleared) is built again from it.
            None if wal.is_postgres() && self.view_is_empty() => 0,
            None => {
                return Err(VaultError::config(
                    self.dir.display().to_string(),
                    format!(
                        "the vault database was lost, truncated or replaced: it records no position in the write-ahead log, \
                         which holds records up to LSN {durable}; nothing was changed: restore it from a backup"
                    ),
                ))
            }
        };
        if from > durable {
            return Err(VaultError::config(
                wal.place().to_owned(),
                format!(
                    "the vault database in {} holds the log up to LSN {from} but the log ends at LSN {durable}: \
                     the log was deleted or restored from an older copy; nothing was changed",
                    self.dir.display()
                ),
            ));
        }
        let (_, applied) = self.writer.replay(from)?;
        if applied > 0 {
            tracing::info!(
                writes = applied,
                from,
                "vault writes applied again from the write-ahead log"
            );
        }
        self.flush_view()?;
        Ok(())
    }

    /// Whether no tree holds anything (a view never written).
    fn view_is_empty(&self) -> bool {
        self.db
            .tree_names()
            .iter()
            .all(|n| self.db.open_tree(n).is_ok_and(|t| t.is_empty()))
    }

    /// The ledger entries recorded as anchoring no write (their write
    /// failed after they were appended).
    pub fn void_anchors(&self) -> Result<std::collections::HashSet<u64>> {
        let mut out = std::collections::HashSet::new();
        for item in self.meta.scan_prefix(VOID_ANCHOR) {
            let (k, _) = item?;
            let i = <[u8; 8]>::try_from(&k[VOID_ANCHOR.len()..]).map_err(|_| {
                VaultError::integrity("a void-anchor mark in the vault's meta tree")
            })?;
            out.insert(u64::from_be_bytes(i));
        }
        Ok(out)
    }

    /// Waits until everything written before the call is durable.
    pub async fn commit(&self) -> Result<()> {
        self.writer.commit().await
    }

    /// Makes every write durable and flushes the view (for callers without
    /// an async runtime, and at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.flush_view().map(|_| ())
    }

    /// Flushes the view and records the log position it holds; returns
    /// that position (the log's records below it are no longer needed by
    /// the vault).
    pub fn flush_view(&self) -> Result<u64> {
        let at = self.writer.position();
        self.writer.wal().wait_durable_blocking(at)?;
        self.slots.sync()?;
        // INVARIANT: the view is on disk before the position that lets
        // start-up skip the writes it holds.
        self.db.flush()?;
        self.meta.insert(WAL_APPLIED_KEY, &at.to_be_bytes())?;
        self.db.flush()?;
        Ok(at)
    }

    /// Copies every tree's keys and values, and every pad, into `dst` (a
    /// new, empty store: `sovra migrate`), through `dst`'s writer, so that
    /// they are in its log; the view bookkeeping (`wal-applied`) stays.
    /// Returns (writes, pads). Not durable until `dst` is flushed.
    pub(crate) fn copy_into(&self, dst: &Store) -> Result<(u64, u64)> {
        let mut pads = 0;
        for slot in 0..self.slots.len() {
            if let Some(p) = self.slots.read(slot)? {
                dst.slots.put(slot, &p)?;
                pads += 1;
            }
        }
        let mut writes = 0;
        // Every tree the database has, not a list: a tree added later is
        // copied too.
        for name in self.db.tree_names() {
            let from = self.db.open_tree(&name)?;
            if from.is_empty() {
                continue;
            }
            let meta = name.as_ref() == b"meta";
            let to = dst.db.open_tree(&name)?;
            for item in from.iter() {
                let (k, v) = item?;
                if meta && VIEW_ONLY_META_KEYS.contains(&k.as_ref()) {
                    continue;
                }
                dst.writer.insert(&to, &k, &v)?;
                writes += 1;
            }
        }
        Ok((writes, pads))
    }

    /// The write-ahead log.
    pub(crate) fn wal(&self) -> &Arc<Wal> {
        self.writer.wal()
    }
}

/// `meta` prefix of the ledger entries whose write failed after they were
/// appended (they anchor nothing; see `app::recovery`).
const VOID_ANCHOR: &[u8] = b"void-anchor/";

/// The `meta` key that marks ledger entry `index` as anchoring no write.
pub(crate) fn void_anchor_key(index: u64) -> Vec<u8> {
    let mut k = VOID_ANCHOR.to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// `tenant 0 ref`: the customer's [`FieldSet`] in `records`.
pub fn record_key(tenant: &str, c: &CustomerRef) -> Vec<u8> {
    data_key_key(tenant, c)
}

/// The version byte of an encoded [`FieldSet`] without a feature slot.
const FIELD_SET_VERSION: u8 = 1;
/// The version byte of an encoded [`FieldSet`] with a feature slot.
const FIELD_SET_WITH_SLOT: u8 = 2;

/// One customer's `records` value: its fields by name, each the bytes of an
/// encoded [`StoredField`]. Each value is sealed on its own, with its
/// tenant, customer, field and version in its associated data, so moving a
/// value to another field or customer fails authentication; the set only
/// groups them.
///
/// The set also holds the customer's slot in the tenant's encrypted
/// feature blocks, once it has one (see `engine/features.rs`): the put
/// reads the set anyway, so finding the slot costs no lookup.
///
/// Encoding: the version byte (1, or 2 with a slot, then the slot as u32
/// big-endian), the number of fields (u16, big-endian),
/// then per field, in strictly increasing name order: the name's length
/// (u8), the name (UTF-8), the value's length (u32, big-endian) and the
/// value. Nothing may follow the last field, so a set cut short anywhere,
/// even between fields, is refused.
#[derive(Debug, Default)]
pub struct FieldSet<'a> {
    fields: Vec<(&'a str, &'a [u8])>,
    slot: Option<u32>,
}

impl<'a> FieldSet<'a> {
    /// Decodes `b`; `None` if it is not a well-formed set (damage).
    pub fn decode(b: &'a [u8]) -> Option<FieldSet<'a>> {
        let (&version, rest) = b.split_first()?;
        let (slot, rest) = match version {
            FIELD_SET_VERSION => (None, rest),
            FIELD_SET_WITH_SLOT => (
                Some(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
                &rest[4..],
            ),
            _ => return None,
        };
        let count = u16::from_be_bytes(<[u8; 2]>::try_from(rest.get(..2)?).ok()?);
        let mut rest = &rest[2..];
        let mut fields: Vec<(&'a str, &'a [u8])> = Vec::with_capacity(usize::from(count).min(64));
        while let Some((&n, r)) = rest.split_first() {
            let n = usize::from(n);
            let name = std::str::from_utf8(r.get(..n)?).ok()?;
            let len = r.get(n..n + 4)?;
            let len = u32::from_be_bytes(<[u8; 4]>::try_from(len).ok()?) as usize;
            let value = r.get(n + 4..(n + 4).checked_add(len)?)?;
            // INVARIANT: names strictly increase, so `get` can bisect and
            // no field appears twice.
            if name.is_empty() || fields.last().is_some_and(|(last, _)| *last >= name) {
                return None;
            }
            fields.push((name, value));
            rest = &r[n + 4 + len..];
        }
        (fields.len() == usize::from(count)).then_some(FieldSet { fields, slot })
    }

    /// The customer's feature slot, if it has one.
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }

    /// The set with `slot` as the customer's feature slot.
    pub fn with_slot(mut self, slot: u32) -> Self {
        self.slot = Some(slot);
        self
    }

    /// The value of `name`, if held.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.fields
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .map(|i| self.fields[i].1)
    }

    /// Every (name, value), in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.fields.iter().copied()
    }

    /// The set with `updates` (name, value) set: encoded.
    pub fn encode_with(&self, updates: &[(&str, &[u8])]) -> Result<Vec<u8>> {
        let mut all: std::collections::BTreeMap<&str, &[u8]> = self.iter().collect();
        for (n, v) in updates {
            all.insert(n, v);
        }
        let size: usize = all.iter().map(|(n, v)| 5 + n.len() + v.len()).sum();
        let Ok(count) = u16::try_from(all.len()) else {
            return Err(VaultError::internal("more fields than a record can hold"));
        };
        let mut out = Vec::with_capacity(7 + size);
        match self.slot {
            None => out.push(FIELD_SET_VERSION),
            Some(slot) => {
                out.push(FIELD_SET_WITH_SLOT);
                out.extend_from_slice(&slot.to_be_bytes());
            }
        }
        out.extend_from_slice(&count.to_be_bytes());
        for (n, v) in all {
            let (Ok(nl), Ok(vl)) = (u8::try_from(n.len()), u32::try_from(v.len())) else {
                return Err(VaultError::internal(
                    "a field name or value too long to store",
                ));
            };
            if nl == 0 {
                return Err(VaultError::internal("an empty field name"));
            }
            out.push(nl);
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&vl.to_be_bytes());
            out.extend_from_slice(v);
        }
        Ok(out)
    }
}

/// `tenant 0 ref`.
pub(crate) fn data_key_key(tenant: &str, c: &CustomerRef) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(&c.0);
    k
}

/// The tenant and reference of a `data_keys` key.
pub(crate) fn split_data_key(k: &[u8]) -> Option<(String, CustomerRef)> {
    let pos = k.iter().position(|&b| b == SEP)?;
    let tenant = std::str::from_utf8(&k[..pos]).ok()?.to_owned();
    Some((tenant, CustomerRef::from_slice(&k[pos + 1..])?))
}

/// `tenant 0`.
pub(crate) fn tenant_prefix(tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1);
    k.extend_from_slice(tenant.as_bytes());
    k.push(SEP);
    k
}

/// `tenant 0 field 0 token`: prefix of the index entries of one value.
pub(crate) fn index_prefix(tenant: &str, field: &str, token: &[u8]) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(field.as_bytes());
    k.push(SEP);
    k.extend_from_slice(token);
    k
}

/// `tenant 0 field 0 token ref`.
pub(crate) fn index_entry(tenant: &str, field: &str, token: &[u8], c: &CustomerRef) -> Vec<u8> {
    let mut k = index_prefix(tenant, field, token);
    k.extend_from_slice(&c.0);
    k
}

/// `keystate 0 tenant`.
pub(crate) fn keystate_key(tenant: &str) -> Vec<u8> {
    let mut k = b"keystate\0".to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_do_not_collide() {
        // References have a fixed length, whatever bytes they hold.
        let (c1, c2) = (
            CustomerRef([0; 16]),
            CustomerRef([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        );
        assert_ne!(record_key("t", &c1), record_key("t", &c2));
        assert_ne!(record_key("t", &c1), record_key("t2", &c1));
        assert!(index_entry("t", "phone", &[1; 32], &c1)
            .starts_with(&index_prefix("t", "phone", &[1; 32])));
        assert_eq!(
            split_data_key(&data_key_key("t", &c2)),
            Some(("t".to_owned(), c2))
        );
    }

    #[test]
    fn a_field_set_keeps_each_field_and_refuses_damage() {
        let empty = FieldSet::default();
        let one = empty
            .encode_with(&[("phone", b"p1"), ("email", b"e1")])
            .unwrap();
        let set = FieldSet::decode(&one).unwrap();
        assert_eq!(set.get("phone"), Some(&b"p1"[..]));
        assert_eq!(set.get("email"), Some(&b"e1"[..]));
        assert_eq!(set.get("name"), None);
        let two = set.encode_with(&[("phone", b"p2"), ("name", b"")]).unwrap();
        let set = FieldSet::decode(&two).unwrap();
        let names: Vec<&str> = set.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["email", "name", "phone"]);
        assert_eq!(set.get("phone"), Some(&b"p2"[..]));
        assert_eq!(set.get("name"), Some(&b""[..]));
        // Truncated anywhere, a trailing byte, another version, or a field
        // out of order: damage, refused.
        for cut in 0..two.len() {
            assert!(FieldSet::decode(&two[..cut]).is_none(), "cut at {cut}");
        }
        assert!(FieldSet::decode(&[&two[..], &[9]].concat()).is_none());
        assert!(FieldSet::decode(&[&[3], &two[1..]].concat()).is_none());
        assert_eq!(set.slot(), None);
        // A slot is kept by later writes, and refused cut short too.
        let slotted = set.with_slot(7).encode_with(&[("phone", b"p3")]).unwrap();
        assert_eq!(slotted[..5], [FIELD_SET_WITH_SLOT, 0, 0, 0, 7]);
        let set = FieldSet::decode(&slotted).unwrap();
        assert_eq!((set.slot(), set.get("phone")), (Some(7), Some(&b"p3"[..])));
        let again = set.encode_with(&[("email", b"e2")]).unwrap();
        assert_eq!(FieldSet::decode(&again).unwrap().slot(), Some(7));
        for cut in 0..slotted.len() {
            assert!(FieldSet::decode(&slotted[..cut]).is_none(), "cut at {cut}");
        }
        let swapped = [
            &[FIELD_SET_VERSION, 0, 2][..],
            &[1, b'b', 0, 0, 0, 0],
            &[1, b'a', 0, 0, 0, 0],
        ]
        .concat();
        assert!(FieldSet::decode(&swapped).is_none());
        let twice = [
            &[FIELD_SET_VERSION, 0, 2][..],
            &[1, b'a', 0, 0, 0, 0],
            &[1, b'a', 0, 0, 0, 0],
        ]
        .concat();
        assert!(FieldSet::decode(&twice).is_none());
    }

    proptest::proptest! {
        #[test]
        fn field_sets_round_trip_and_hostile_bytes_never_panic(
            fields in proptest::collection::btree_map("[a-z][a-z0-9_]{0,63}", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..12),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let updates: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            let b = FieldSet::default().encode_with(&updates).unwrap();
            let set = FieldSet::decode(&b).unwrap();
            let back: Vec<(&str, &[u8])> = set.iter().collect();
            proptest::prop_assert_eq!(back, updates.clone());
            let slot = u32::try_from(junk.len()).unwrap();
            let b = FieldSet::default().with_slot(slot).encode_with(&updates).unwrap();
            let set = FieldSet::decode(&b).unwrap();
            proptest::prop_assert_eq!(set.slot(), Some(slot));
            let back: Vec<(&str, &[u8])> = set.iter().collect();
            proptest::prop_assert_eq!(back, updates);
            let _ = FieldSet::decode(&junk);
        }
    }

    fn wal(dir: &std::path::Path) -> Arc<Wal> {
        Arc::new(
            Wal::open(&dir.join("wal"), sovra_wal::WalOptions::default())
                .unwrap()
                .wal,
        )
    }

    fn copy_files(from: &std::path::Path, to: &std::path::Path, skip: &str) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_name() == skip {
                continue;
            }
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_files(&e.path(), &dest, skip);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }

    /// Writes committed by concurrent callers are in the log: a view
    /// restored from a copy taken before them gets them back at open.
    #[tokio::test]
    async fn committed_writes_replay_into_an_older_view() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let snap = dir.path().join("snap");
        let store = Arc::new(Store::open(&data, wal(&data)).unwrap());
        store.flush_view().unwrap();
        copy_files(&data, &snap, "wal");
        let mut tasks = Vec::new();
        for i in 0..32u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.writer.insert(&s.records, i.to_be_bytes(), [1u8]).unwrap();
                s.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        store
            .writer
            .remove(&store.records, 7u32.to_be_bytes())
            .unwrap();
        store.commit().await.unwrap();
        drop(store);
        for e in std::fs::read_dir(&data).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "wal" {
                let p = e.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(p).unwrap();
                } else {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        copy_files(&snap, &data, "wal");
        let store = Store::open(&data, wal(&data)).unwrap();
        assert_eq!(store.records.len(), 31);
        assert!(store.records.get(7u32.to_be_bytes()).unwrap().is_none());
    }

    /// Void-anchor marks read back as ledger indexes; a damaged one is
    /// refused, never skipped.
    #[test]
    fn void_anchor_marks_round_trip_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), wal(dir.path())).unwrap();
        for i in [7u64, 1 << 40] {
            store
                .writer
                .insert(&store.meta, void_anchor_key(i), [])
                .unwrap();
        }
        let got = store.void_anchors().unwrap();
        assert_eq!(got, [7u64, 1 << 40].into_iter().collect());
        store
            .writer
            .insert(&store.meta, b"void-anchor/xyz", [])
            .unwrap();
        let e = store.void_anchors().unwrap_err();
        assert!(e.to_string().contains("void-anchor"), "{e}");
    }

    /// A deleted log under a view that recorded a position is refused.
    #[tokio::test]
    async fn a_deleted_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), wal(dir.path())).unwrap();
        store.writer.insert(&store.records, b"k", b"v").unwrap();
        store.flush_view().unwrap();
        drop(store);
        std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
        let e = Store::open(dir.path(), wal(dir.path())).unwrap_err();
        assert!(
            e.to_string()
                .contains("the log was deleted or restored from an older copy"),
            "{e}"
        );
    }
}
