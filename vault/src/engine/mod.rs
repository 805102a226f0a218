//! The vault engine: writes, reads, blind-index search and crypto-shredding
//! over the [`Store`], with the [`KeyRing`].
//!
//! Guarantees:
//! - Every value is sealed under its customer's data key with its place bound
//!   in (see `envelope.rs`); no plaintext value and no unwrapped key is ever
//!   written to storage.
//! - A put or an erasure of one customer is one write across the records,
//!   data-key and index trees (`Writer::transact`: applied only if it
//!   succeeds, logged as one frame, so durable whole or not at all), and
//!   writers of the same customer are serialised, so versions never go
//!   backwards and a customer never gets two data keys. A concurrent reader
//!   may see a write half applied, before it is acknowledged.
//! - Nothing is durable until [`Engine::commit`] returns; callers acknowledge
//!   only after it.
//!
//! The engine holds three components, each owning its state and its tree:
//! [`KeyRotation`] (the tenants' key versions, in `meta`), [`LineageStore`]
//! (the `lineage` tree) and the feature store (the `fhe_features` and
//! `fhe_blocks` trees and the tenants' TFHE keys). They share the store, the key ring and the
//! per-customer locks; the engine resolves customers to data keys and
//! pseudonyms, and runs the transactions that span several trees.
//!
//! Does not guarantee: authorisation. The engine trusts its caller; the
//! service layer checks roles before calling it.

pub mod contract_runtime;
pub mod contracts;
pub(crate) mod features;
mod locks;
mod recovery;
pub mod rotation;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use sled::transaction::ConflictableTransactionError;

use self::features::FeatureStore;
use self::locks::CustomerLocks;
use self::rotation::{KeyRotation, KeyState, KeyStatus, Retirement};
use crate::crypto::envelope::{self, FieldContext};
use crate::crypto::keys::{CustomerRef, DataKey, KeyPlace, KeyRing, RootKey, WrappedKey};
use crate::crypto::shred::Pad;
use crate::error::{Result, VaultError};
use crate::lineage::{self, Agent, Anchor, LineageStore, Page};
use crate::schema::{FieldDef, FieldValue, Schema};
use crate::store::{self, PadPlace, Store, StoredField};
use sovra_ledger::{Digest, Ledger, Pseudonym};
use sovra_proto::lineage::v1 as lpb;

pub use self::recovery::{ErasureFacts, Floor, Floors, NoLedger, Recovered};
pub use crate::schema::{validate_id, Revealed, Source, MAX_CUSTOMER_ID_LEN};
/// Most ids a search returns.
pub const MAX_SEARCH_LIMIT: u32 = 1000;

/// The lineage of a write: who wrote, which inputs the vault normalised, and
/// how to anchor the activity in the ledger.
pub struct WriteLineage<'a> {
    /// The writer and the policies that allowed the write.
    pub agent: &'a Agent,
    /// Field names whose input the vault changed while normalising it.
    pub transformed: &'a [&'a str],
    /// Appends the write's ledger entry carrying the activity hash.
    pub anchor: Box<Anchor<'a>>,
}

impl std::fmt::Debug for WriteLineage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLineage")
            .field("agent", self.agent)
            .finish_non_exhaustive()
    }
}

/// What a put did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// True if the customer was created by this put.
    pub created: bool,
    /// New version per field written, sorted by field name.
    pub versions: Vec<(String, u64)>,
    /// True if this was a retry of an earlier write with the same
    /// idempotency key: nothing was written, and the outcome is the first
    /// write's.
    pub replayed: bool,
}

/// An idempotent write: who writes, and the client's key for the write.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    /// The principal's name (keys are per principal).
    pub principal: &'a str,
    /// The client's key: 1 to 128 characters of [A-Za-z0-9._:-].
    pub key: &'a str,
}

/// Where an idempotent write's record lives, and its request's digest.
struct IdempotencyRef {
    key: [u8; 32],
    request_mac: [u8; 32],
}

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EraseOutcome {
    /// Field records removed.
    pub fields_erased: u32,
    /// Blind-index entries removed.
    pub index_entries_removed: u32,
    /// The KEK version the destroyed data key was wrapped under.
    pub wrap_version: u32,
    /// When the erasure was applied.
    pub erased_at_ms: i64,
}

/// A write under way, under the customer's lock: whose, with which data
/// key, from where, and when.
struct PutContext<'a> {
    tenant: &'a str,
    customer: &'a str,
    dek: &'a DataKey,
    dek_version: u32,
    source: &'a Source,
    now: i64,
}

/// A blind-index entry change of one field a put writes.
struct IndexChange {
    old_entry: Option<Vec<u8>>,
    new_entry: Option<Vec<u8>>,
}

/// The sealed records of a put, and what its lineage says of them.
struct SealedFields {
    /// The customer's record key and its new [`store::FieldSet`], encoded.
    record: (Vec<u8>, Vec<u8>),
    index: Vec<IndexChange>,
    /// The new version per field, sorted by field name.
    versions: Vec<(String, u64)>,
    generated: Vec<lpb::Generation>,
    /// Whether any field had a value before.
    updated: bool,
    /// The customer's reference, computed once per put.
    cref: CustomerRef,
    /// The put's quantised feature values (see `features::quantised`) and
    /// the customer's slot (kept in its record set: its own, or a new
    /// one), if it writes any.
    features: Option<(u32, Vec<(String, i64)>)>,
}

/// A put's feature values: the customer's slot (from its record set, or
/// `FeatureStore::new_slot`), the marks' stamp and the quantised values.
type FeatureWrite<'a> = (u32, features::Stamp, &'a [(String, i64)]);

/// What a put's transaction writes besides the sealed records.
struct PutTransaction<'a> {
    cref: &'a CustomerRef,
    new_wrapped: Option<&'a [u8]>,
    record: &'a (Vec<u8>, Vec<u8>),
    index: &'a [IndexChange],
    lineage: &'a lineage::Staged,
    /// The feature values the write marks pending, if it holds any.
    features: Option<FeatureWrite<'a>>,
    idempotency: Option<&'a ([u8; 32], Vec<u8>)>,
}

/// The lineage edge of a written value: normalised by the vault, or kept as
/// given.
fn write_transformation(normalised: bool) -> lpb::Transformation {
    if normalised {
        lineage::transformation(
            lpb::TransformationType::Direct,
            lpb::TransformationSubtype::Transformation,
            false,
            "normalised",
        )
    } else {
        lineage::transformation(
            lpb::TransformationType::Direct,
            lpb::TransformationSubtype::Identity,
            false,
            "",
        )
    }
}

/// The write's lineage activity: a collect, or an update if any field had
/// a value (`updated`), generating the sealed versions.
fn write_activity(
    cx: &PutContext<'_>,
    agent: &Agent,
    subject: &Pseudonym,
    updated: bool,
    generated: Vec<lpb::Generation>,
) -> lpb::Activity {
    let kind = if updated {
        lpb::ActivityKind::Update
    } else {
        lpb::ActivityKind::Collect
    };
    let mut activity = agent.activity(kind, cx.tenant);
    activity.time_ms = cx.now;
    activity.subject = subject.0.to_vec();
    activity.origin = Some(lpb::Origin {
        channel: cx.source.channel.clone(),
        collector: cx.source.collector.clone(),
        consent_ref: cx.source.consent_ref.clone(),
    });
    activity.generated = generated;
    activity
}

/// A data key created but not stored yet: its shred slot and wrapped form.
type NewKey = (u64, Vec<u8>);

/// The vault engine.
pub struct Engine {
    store: Arc<Store>,
    keyring: Arc<KeyRing>,
    schema: Arc<Schema>,
    locks: Arc<CustomerLocks>,
    rotation: Arc<KeyRotation>,
    lineage: LineageStore,
    features: FeatureStore,
    // Shred slots zeroed by erasures, reusable once the erasure is durable.
    pending_release: Mutex<Vec<u64>>,
    // What the contract runtime listens to, and its wake-up.
    hooks: contract_runtime::Hooks,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

pub use crate::clock::now_ms;

/// Where the root key's check value is kept in `meta`.
const ROOT_CHECK_KEY: &[u8] = b"root_key_check";

/// Refuses a root key other than the one the vault was initialised with,
/// before anything is read or written with it; stores the check value on
/// a vault that has none yet (made before check values existed: the first
/// start after an upgrade trusts the key it is given, and says so).
/// `on_new` runs before the check value is stored on a database with no
/// data keys (see [`Engine::open_with`]).
fn check_root_key(
    store: &Store,
    keyring: &KeyRing,
    dir: &Path,
    on_new: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let check = keyring.check_value();
    match store.meta.get(ROOT_CHECK_KEY)? {
        // The check value is not secret (it is on disk), so comparing it in
        // variable time reveals nothing.
        Some(v) if v.as_ref() == check.as_slice() => Ok(()),
        Some(_) => Err(VaultError::config(
            "root key",
            format!(
                "it is not the key the vault in {} was initialised with (its key check value differs); \
                 nothing was read or changed: start with the right root.key or SOVRA_ROOT_KEY",
                dir.display()
            ),
        )),
        None => {
            if store.data_keys.is_empty() {
                on_new()?;
            } else {
                tracing::warn!(
                    data_dir = %dir.display(),
                    "this vault has no root key check value (made by an older version): storing the current key's; a wrong key would have shown as DATA_LOSS on reads"
                );
            }
            // Through the log, so that a view built again from it (a log
            // kept in PostgreSQL) has the check value too.
            store
                .writer
                .insert(&store.meta, ROOT_CHECK_KEY, check.as_slice())?;
            store.flush()?;
            Ok(())
        }
    }
}

/// A pending feature of a slot: (feature, stamp, the value its write
/// noted, if known).
type Noted = (String, features::Stamp, Option<i64>);

/// The `meta` key of the storage key format.
const KEY_FORMAT_KEY: &[u8] = b"key-format";
/// The storage key format this build writes and reads: 4, every key built
/// from customer references, ids sealed with the pads (format 2), one
/// `records` value per customer holding all of its fields (format 3), and
/// a feature slot's pending mark kept in the slot's value (see
/// `features`).
const KEY_FORMAT: u8 = 4;

/// Refuses a database of another storage key format (format 1 held
/// customer ids in the clear; format 2 kept one `records` key per field);
/// upgrades format 3 in place (its feature slots); stores the format on a
/// new one. Runs after the log's replay.
fn check_key_format(store: &Store, dir: &Path) -> Result<()> {
    match store.meta.get(KEY_FORMAT_KEY)? {
        Some(v) if v.as_ref() == [KEY_FORMAT] => Ok(()),
        None if store.data_keys.is_empty() => {
            // Through the log, as the root key check value.
            store
                .writer
                .insert(&store.meta, KEY_FORMAT_KEY, [KEY_FORMAT])?;
            store.flush()?;
            Ok(())
        }
        Some(v) if v.as_ref() == [3] => {
            // Through the log, marker last: replay puts the upgrade where
            // it happened among the writes (a view restored from before it
            // is upgraded by the replay, not again over later writes); a
            // crash before the marker is durable runs it again (it is
            // idempotent).
            let slots =
                features::upgrade_from_format_3(&store.features, &store.records, &store.writer)?;
            store
                .writer
                .insert(&store.meta, KEY_FORMAT_KEY, [KEY_FORMAT])?;
            store.flush()?;
            tracing::info!(
                slots,
                dir = %dir.display(),
                "upgraded the vault database from storage key format 3 to 4 (feature slots hold their pending marks)"
            );
            Ok(())
        }
        found => Err(VaultError::config(
            dir.display().to_string(),
            format!(
                "the vault database uses storage key format {} and this build reads only format {KEY_FORMAT} \
                 (customer references instead of ids, one record per customer) and upgrades format 3; \
                 nothing was read or changed: open it with the build that made it",
                found.map_or_else(|| "1".to_owned(), |v| format!("{v:?}"))
            ),
        )),
    }
}

/// The customer's stored fields (none if it holds no record); damage is an
/// integrity error naming the customer.
fn field_set<'a>(held: Option<&'a [u8]>, customer: &str) -> Result<store::FieldSet<'a>> {
    decode_set(held, || {
        format!("the stored record of customer `{customer}` (its fields cannot be decoded)")
    })
}

/// A stored field set (empty if none is held); damage is an integrity
/// error saying `what`.
fn decode_set<'a>(
    held: Option<&'a [u8]>,
    what: impl FnOnce() -> String,
) -> Result<store::FieldSet<'a>> {
    match held {
        None => Ok(store::FieldSet::default()),
        Some(b) => store::FieldSet::decode(b).ok_or_else(|| VaultError::integrity(what())),
    }
}

fn decode_field(bytes: &[u8], what: impl FnOnce() -> String) -> Result<StoredField> {
    StoredField::decode(bytes).map_err(|_| VaultError::integrity(what()))
}

impl Engine {
    /// Opens the engine on `dir` with `root` and `schema`.
    /// Without a ledger no erasure is known, so a zero pad beside a data key
    /// refuses the open (see [`Engine::recover`]).
    pub fn open(dir: &Path, root: RootKey, schema: Schema) -> Result<Engine> {
        let wal =
            Arc::new(sovra_wal::Wal::open(&dir.join("wal"), sovra_wal::WalOptions::default())?.wal);
        Engine::open_over(
            dir,
            root,
            schema,
            wal,
            &PadPlace::File(dir.join("shred.slots")),
        )
    }

    /// [`Engine::open`] over a log the caller opened (in the data
    /// directory or in PostgreSQL), without a ledger.
    pub fn open_over(
        dir: &Path,
        root: RootKey,
        schema: Schema,
        wal: Arc<sovra_wal::Wal>,
        pads: &PadPlace,
    ) -> Result<Engine> {
        let engine = Engine::open_with(dir, root, schema, wal, pads, || Ok(()))?;
        engine.recover(&NoLedger::default())?;
        Ok(engine)
    }

    /// [`Engine::open`], calling `on_new` first if the database holds
    /// neither a root key check value nor data keys: a vault made just now,
    /// or a database that lost its contents (the server tells them apart by
    /// the ledger). If `on_new` fails, nothing is written. The caller runs
    /// [`Engine::recover`] before anything else.
    pub fn open_with(
        dir: &Path,
        root: RootKey,
        schema: Schema,
        wal: Arc<sovra_wal::Wal>,
        pads: &PadPlace,
        on_new: impl FnOnce() -> Result<()>,
    ) -> Result<Engine> {
        let store = Arc::new(Store::open_at(dir, wal, pads)?);
        let keyring = Arc::new(KeyRing::new(root));
        check_root_key(&store, &keyring, dir, on_new)?;
        check_key_format(&store, dir)?;
        let locks = Arc::new(CustomerLocks::new());
        let rotation = Arc::new(KeyRotation::load(
            store.clone(),
            keyring.clone(),
            locks.clone(),
        )?);
        // The components get handles on the trees the store opened, so the
        // on-disk layout stays the store's.
        let lineage = LineageStore::new(
            &store.db,
            store.meta.clone(),
            store.lineage.clone(),
            store.writer.clone(),
            keyring.clone(),
        )?;
        let features = FeatureStore::new(
            store.features.clone(),
            store.feature_blocks.clone(),
            store.writer.clone(),
            keyring.clone(),
        )?;
        let engine = Engine {
            store,
            keyring,
            schema: Arc::new(schema),
            locks,
            rotation,
            lineage,
            features,
            pending_release: Mutex::new(Vec::new()),
            hooks: contract_runtime::Hooks::default(),
        };
        Ok(engine)
    }

    /// The schema in force.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lineage store (the `lineage` tree). Its queries take pseudonyms;
    /// [`Engine::field_lineage`] and the others take customer ids.
    pub fn lineage(&self) -> &LineageStore {
        &self.lineage
    }

    /// The feature store (the `fhe_features` and `fhe_blocks` trees and
    /// the tenants' TFHE keys).
    pub(crate) fn features(&self) -> &FeatureStore {
        &self.features
    }

    /// Announces a request that will write and then wait for
    /// [`Engine::commit`]: the log may hold its next group back a little
    /// while such requests are still working, so they share one sync. Drop
    /// it after the request's last write, before it waits
    /// ([`sovra_wal::Wal::intent`]).
    pub fn intent(&self) -> sovra_wal::Intent {
        self.store.wal().intent()
    }

    /// Waits until every write made so far is durable.
    pub async fn commit(&self) -> Result<()> {
        let releasable = std::mem::take(
            &mut *self
                .pending_release
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        // INVARIANT: every slot taken above was queued after its erasure was
        // applied, so this commit makes the erasure durable before the slot
        // can carry another customer's pad.
        let r = self.store.commit().await;
        match r {
            Ok(()) => self.store.slots.release(releasable),
            Err(_) => self
                .pending_release
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(releasable),
        }
        r
    }

    /// Holds the customer's lock (the one key rotation takes too) until the
    /// guard is dropped.
    pub(crate) fn lock(&self, tenant: &str, customer: &str) -> MutexGuard<'_, ()> {
        self.locks.lock(tenant, customer)
    }

    /// The customer's pad; NOT_FOUND once it was shredded.
    fn pad(&self, customer: &str, w: &WrappedKey) -> Result<Pad> {
        self.store
            .slots
            .read(w.slot)?
            .ok_or_else(|| VaultError::not_found(format!("customer `{customer}`")))
    }

    /// Unwraps the data key of a stored wrapped key, refusing retired KEKs.
    pub(crate) fn unwrap_dek(
        &self,
        tenant: &str,
        customer: &str,
        w: &WrappedKey,
    ) -> Result<DataKey> {
        let min = self.rotation.state(tenant).min_version;
        if w.kek_version < min {
            return Err(VaultError::precondition(format!(
                "the data key of customer `{customer}` is wrapped under tenant key version {}, \
                 which was retired (minimum decryption version is {min}); its data cannot be read",
                w.kek_version
            )));
        }
        let pad = self.pad(customer, w)?;
        self.keyring.unwrap(tenant, customer, w, &pad)
    }

    /// The customer's reference at rest (every storage key is built from it).
    pub(crate) fn cref(&self, tenant: &str, customer: &str) -> CustomerRef {
        self.keyring.customer_ref(tenant, customer)
    }

    /// The id of the customer stored under `r`: NOT_FOUND if the vault holds
    /// no data key under it or its pad is gone (erased).
    pub(crate) fn customer_id(&self, tenant: &str, r: &CustomerRef) -> Result<String> {
        let gone = || VaultError::not_found(format!("customer reference {}", hex::encode(r.0)));
        let b = self
            .store
            .data_keys
            .get(store::data_key_key(tenant, r))?
            .ok_or_else(gone)?;
        let w = WrappedKey::decode(&b[..]).map_err(|_| {
            VaultError::integrity(format!(
                "the data key of customer reference {}",
                hex::encode(r.0)
            ))
        })?;
        let pad = self.store.slots.read(w.slot)?.ok_or_else(gone)?;
        self.keyring.open_id(tenant, r, &w, &pad)
    }

    fn load_wrapped(&self, tenant: &str, customer: &str) -> Result<Option<WrappedKey>> {
        match self
            .store
            .data_keys
            .get(store::data_key_key(tenant, &self.cref(tenant, customer)))?
        {
            None => Ok(None),
            Some(b) => WrappedKey::decode(&b[..]).map(Some).map_err(|_| {
                VaultError::integrity(format!("the data key of customer `{customer}`"))
            }),
        }
    }

    /// Writes `values` for `customer` and records the write's lineage
    /// (anchored by `lineage.anchor` before anything is stored). Not durable
    /// until [`Engine::commit`].
    ///
    /// With `idem`, a retry of the same request with the same key (within
    /// [`store::IDEMPOTENCY_RETENTION_MS`]) returns the first write's outcome
    /// and writes nothing; the same key with another request is refused.
    pub fn put(
        &self,
        tenant: &str,
        customer: &str,
        values: &[(&FieldDef, FieldValue)],
        source: &Source,
        lineage: WriteLineage<'_>,
        idem: Option<Idempotency<'_>>,
    ) -> Result<PutOutcome> {
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN)?;
        if values.is_empty() {
            return Err(VaultError::invalid(
                "fields",
                "at least one field is required",
            ));
        }
        let idem_ref = match idem {
            Some(i) => {
                validate_id("idempotency_key", i.key, MAX_CUSTOMER_ID_LEN)?;
                Some(self.idempotency_ref(tenant, i, customer, values, source))
            }
            None => None,
        };
        let _guard = self.lock(tenant, customer);
        let now = now_ms();
        if let Some(r) = &idem_ref {
            if let Some(out) = self.replay(r, now)? {
                return Ok(out);
            }
        }
        let (dek, new_wrapped, dek_version) = self.load_or_new_key(tenant, customer, now)?;
        let cx = PutContext {
            tenant,
            customer,
            dek: &dek,
            dek_version,
            source,
            now,
        };
        let result = self.apply_put(
            &cx,
            new_wrapped.as_ref().map(|(_, w)| w.as_slice()),
            values,
            lineage,
            idem_ref.as_ref(),
        );
        if result.is_err() {
            if let Some((slot, _)) = new_wrapped {
                // Nothing references the new pad: destroy and reuse it.
                self.store.slots.shred(slot)?;
                self.store.slots.release([slot]);
            }
        }
        result
    }

    /// The customer's data key, or a new one (with its pad slot and wrapped
    /// form, not yet stored). Callers hold the customer's lock.
    fn load_or_new_key(
        &self,
        tenant: &str,
        customer: &str,
        now: i64,
    ) -> Result<(DataKey, Option<NewKey>, u32)> {
        match self.load_wrapped(tenant, customer)? {
            Some(w) => Ok((self.unwrap_dek(tenant, customer, &w)?, None, w.dek_version)),
            None => {
                let active = self.rotation.state(tenant).active_version;
                let kek = self.keyring.kek(tenant, active);
                let dek = DataKey::generate();
                let (slot, pad) = self.store.slots.allocate()?;
                let place = KeyPlace {
                    tenant,
                    customer,
                    slot,
                    dek_version: 1,
                };
                let w = self.keyring.wrap(&kek, &place, &dek, &pad, now)?;
                Ok((dek, Some((slot, w.encode_to_vec())), 1))
            }
        }
    }

    /// The customer's ledger pseudonym. With `create`, a customer the vault
    /// has not seen gets a data key (and so a pseudonym) now, so that consent
    /// can be recorded before any field is; not durable until
    /// [`Engine::commit`]. Without it, NOT_FOUND for an unknown or erased
    /// customer: an erased customer's pseudonym cannot be recomputed.
    pub fn pseudonym(&self, tenant: &str, customer: &str, create: bool) -> Result<Pseudonym> {
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN)?;
        if !create {
            let w = self
                .load_wrapped(tenant, customer)?
                .ok_or_else(|| VaultError::not_found(format!("customer `{customer}`")))?;
            let dek = self.unwrap_dek(tenant, customer, &w)?;
            return Ok(Digest(dek.pseudonym(tenant, customer)));
        }
        self.ensure_pseudonym(tenant, customer).map(|(p, _)| p)
    }

    /// Like [`Engine::pseudonym`] with `create`; also says whether the
    /// customer's data key was created now (and so needs a commit).
    pub fn ensure_pseudonym(&self, tenant: &str, customer: &str) -> Result<(Pseudonym, bool)> {
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN)?;
        let _guard = self.lock(tenant, customer);
        let (dek, new_wrapped, _) = self.load_or_new_key(tenant, customer, now_ms())?;
        let created = new_wrapped.is_some();
        if let Some((slot, w)) = new_wrapped {
            if let Err(e) = self.store.writer.insert(
                &self.store.data_keys,
                store::data_key_key(tenant, &self.cref(tenant, customer)),
                w,
            ) {
                self.store.slots.shred(slot)?;
                self.store.slots.release([slot]);
                return Err(e);
            }
        }
        Ok((Digest(dek.pseudonym(tenant, customer)), created))
    }

    /// Seals `values`, records the write's lineage (the anchor is appended
    /// here) and applies it all in one transaction. Called with the
    /// customer's lock held.
    fn apply_put(
        &self,
        cx: &PutContext<'_>,
        new_wrapped: Option<&[u8]>,
        values: &[(&FieldDef, FieldValue)],
        lineage: WriteLineage<'_>,
        idem_ref: Option<&IdempotencyRef>,
    ) -> Result<PutOutcome> {
        let (tenant, customer) = (cx.tenant, cx.customer);
        let subject = Digest(cx.dek.pseudonym(tenant, customer));
        let SealedFields {
            record: stored,
            index,
            versions,
            generated,
            updated,
            cref,
            features: feature_write,
        } = self.seal_fields(cx, values, lineage.transformed)?;
        let activity = write_activity(cx, lineage.agent, &subject, updated, generated);
        let record =
            self.lineage
                .stage_write(tenant, customer, &subject, activity, lineage.anchor)?;
        if feature_write.is_some() {
            // No TFHE work here (the packer does it), but a write the packer
            // could never fold in is refused now, naming the damaged key,
            // rather than acknowledged (the key is cached once read).
            self.features.secret(tenant)?;
        }
        let stamp = features::next_stamp();
        let idempotency = idem_ref.map(|sl| {
            let r = store::IdempotencyRecord {
                request_mac: sl.request_mac.to_vec(),
                created: new_wrapped.is_some(),
                fields: versions.iter().map(|(f, _)| f.clone()).collect(),
                versions: versions.iter().map(|(_, v)| *v).collect(),
                written_at_ms: cx.now,
            };
            (sl.key, r.encode_to_vec())
        });
        let tx = PutTransaction {
            cref: &cref,
            new_wrapped,
            record: &stored,
            index: &index,
            lineage: &record.staged,
            features: feature_write
                .as_ref()
                .map(|(slot, values)| (*slot, stamp, values.as_slice())),
            idempotency: idempotency.as_ref(),
        };
        self.write_put(cx, &tx).map_err(|e| {
            // The anchor is in the ledger already: say which entry now
            // anchors nothing, so an audit can tell it from tampering, and
            // record it, so start-up does not take its versions for a floor.
            tracing::error!(error = %e, ledger_index = record.ledger_index, "a write failed after its lineage anchor was appended; that ledger entry anchors no activity");
            if let Err(e) = self.store.writer.insert(
                &self.store.meta,
                store::void_anchor_key(record.ledger_index),
                [],
            ) {
                tracing::error!(error = %e, ledger_index = record.ledger_index, "could not record that the ledger entry anchors no write");
            }
            e
        })?;
        if let Some((slot, values)) = &feature_write {
            // INVARIANT: before the write is answered, so a job that starts
            // after the answer packs it.
            self.features
                .note_pending(tenant, *slot, &cref, stamp, values);
        }
        Ok(PutOutcome {
            created: new_wrapped.is_some(),
            versions,
            replayed: false,
        })
    }

    /// Seals each value under the customer's data key with its place and
    /// provenance bound in, at the version after the stored one.
    fn seal_fields(
        &self,
        cx: &PutContext<'_>,
        values: &[(&FieldDef, FieldValue)],
        transformed: &[&str],
    ) -> Result<SealedFields> {
        let (tenant, customer, source) = (cx.tenant, cx.customer, cx.source);
        let cipher = cx.dek.cipher();
        let index_key = self.keyring.index_key(tenant);
        let cref = self.cref(tenant, customer);
        let key = store::record_key(tenant, &cref);
        // INVARIANT: the caller holds the customer's lock, so the set read
        // here is the one the put replaces.
        let held = self.store.records.get(&key)?;
        let set = field_set(held.as_deref(), customer)?;
        let mut sealed_values: Vec<(&str, Vec<u8>)> = Vec::with_capacity(values.len());
        let mut out = SealedFields {
            record: (Vec::new(), Vec::new()),
            index: Vec::with_capacity(values.len()),
            versions: Vec::with_capacity(values.len()),
            generated: Vec::with_capacity(values.len()),
            updated: false,
            cref,
            features: None,
        };
        let mut set = set;
        let feature_values = features::quantised(values);
        if !feature_values.is_empty() {
            let slot = match set.slot() {
                Some(s) => {
                    self.features.check_reserved(tenant, s)?;
                    s
                }
                None => self.features.new_slot(tenant)?,
            };
            set = set.with_slot(slot);
            out.features = Some((slot, feature_values));
        }
        for (def, value) in values {
            let prev = match set.get(&def.name) {
                Some(b) => Some(decode_field(b, || {
                    format!("field `{}` of customer `{customer}`", def.name)
                })?),
                None => None,
            };
            let version = prev.as_ref().map_or(0, |p| p.version) + 1;
            out.updated |= prev.is_some();
            let token = if def.indexed {
                index_key.token(&def.name, &value.index_bytes()).to_vec()
            } else {
                Vec::new()
            };
            let ctx = FieldContext {
                tenant,
                customer,
                field: &def.name,
                version,
                dek_version: cx.dek_version,
                provenance: Some(envelope::Provenance {
                    channel: &source.channel,
                    collector: &source.collector,
                    consent_ref: &source.consent_ref,
                    collected_at_ms: cx.now,
                    index_token: &token,
                }),
            };
            let sealed = envelope::seal(&cipher, &ctx, &value.to_bytes())?;
            let old_entry = prev
                .filter(|p| !p.index_token.is_empty())
                .map(|p| store::index_entry(tenant, &def.name, &p.index_token, &cref));
            let new_entry =
                (!token.is_empty()).then(|| store::index_entry(tenant, &def.name, &token, &cref));
            let rec = StoredField {
                version,
                nonce: sealed.nonce.to_vec(),
                ciphertext: sealed.ciphertext,
                channel: source.channel.clone(),
                collector: source.collector.clone(),
                consent_ref: source.consent_ref.clone(),
                collected_at_ms: cx.now,
                index_token: token,
                dek_version: cx.dek_version,
                format: store::RECORD_FORMAT,
            };
            sealed_values.push((&def.name, rec.encode_to_vec()));
            out.index.push(IndexChange {
                old_entry,
                new_entry,
            });
            out.versions.push((def.name.clone(), version));
            out.generated.push(lpb::Generation {
                field: def.name.clone(),
                version,
                value_hash: hex::encode(self.lineage.value_hash(
                    tenant,
                    &def.name,
                    &value.to_bytes(),
                )),
                derived_from: Vec::new(),
                transformation: Some(write_transformation(
                    transformed.contains(&def.name.as_str()),
                )),
            });
        }
        out.versions.sort();
        let updates: Vec<(&str, &[u8])> = sealed_values
            .iter()
            .map(|(n, v)| (*n, v.as_slice()))
            .collect();
        out.record = (key, set.encode_with(&updates)?);
        Ok(out)
    }

    /// The put's one transaction over the records, data-key, index, lineage,
    /// feature and idempotency trees.
    fn write_put(&self, cx: &PutContext<'_>, tx: &PutTransaction<'_>) -> Result<()> {
        let (tenant, now) = (cx.tenant, cx.now);
        let cref = *tx.cref;
        let dek_k = store::data_key_key(tenant, &cref);
        let s = &self.store;
        s.writer.transact(
            [
                &s.records,
                &s.data_keys,
                &s.index,
                self.lineage.tree(),
                self.features.tree(),
                &s.idempotency,
            ],
            |[r, k, i, l, f, d]| {
                if let Some((key, bytes)) = tx.idempotency {
                    // INVARIANT: checked again inside the transaction, so two
                    // concurrent writes with one key cannot both apply.
                    if let Some(prior) = d.get(key)? {
                        let live = store::IdempotencyRecord::live(&prior, now)
                            .map_err(ConflictableTransactionError::Abort)?;
                        if live.is_some() {
                            return Err(ConflictableTransactionError::Abort(VaultError::already_exists(
                                "idempotency_key",
                                "a concurrent write with this key was applied first; retry to get its result",
                            )));
                        }
                    }
                    d.insert(&key[..], bytes.as_slice())?;
                }
                tx.lineage.apply(l)?;
                if let Some((slot, stamp, values)) = tx.features {
                    features::put(f, tenant, &cref, slot, stamp, values)?;
                }
                if let Some(w) = tx.new_wrapped {
                    k.insert(dek_k.as_slice(), w)?;
                }
                r.insert(tx.record.0.as_slice(), tx.record.1.as_slice())?;
                for w in tx.index {
                    if let Some(old) = &w.old_entry {
                        i.remove(old.as_slice())?;
                    }
                    if let Some(new) = &w.new_entry {
                        i.insert(new.as_slice(), &[][..])?;
                    }
                }
                Ok::<_, ConflictableTransactionError<VaultError>>(())
            },
        )
    }

    /// The record key and request digest of an idempotent write.
    fn idempotency_ref(
        &self,
        tenant: &str,
        idem: Idempotency<'_>,
        customer: &str,
        values: &[(&FieldDef, FieldValue)],
        source: &Source,
    ) -> IdempotencyRef {
        let mac_key = self.keyring.idempotency_key(tenant);
        let mac = |label: &[u8], parts: &[&[u8]]| -> [u8; 32] {
            let tag = ring::hmac::sign(&mac_key, &crate::crypto::keys::encode_aad(label, parts));
            let mut out = [0u8; 32];
            out.copy_from_slice(tag.as_ref());
            out
        };
        let key = mac(
            b"sovra/v1/idempotency-slot",
            &[idem.principal.as_bytes(), idem.key.as_bytes()],
        );
        // Fields in name order: the request's map has no order of its own.
        let mut sorted: Vec<(&str, zeroize::Zeroizing<Vec<u8>>)> = values
            .iter()
            .map(|(d, v)| (d.name.as_str(), v.to_bytes()))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut parts: Vec<&[u8]> = vec![
            customer.as_bytes(),
            source.channel.as_bytes(),
            source.collector.as_bytes(),
            source.consent_ref.as_bytes(),
        ];
        for (name, bytes) in &sorted {
            parts.push(name.as_bytes());
            parts.push(bytes);
        }
        IdempotencyRef {
            key,
            request_mac: mac(b"sovra/v1/idempotent-put", &parts),
        }
    }

    /// The first write's outcome if `idem_ref` already answers (a retry),
    /// or `None`; the same key with another request is ALREADY_EXISTS.
    fn replay(&self, idem_ref: &IdempotencyRef, now: i64) -> Result<Option<PutOutcome>> {
        let Some(bytes) = self.store.idempotency.get(idem_ref.key)? else {
            return Ok(None);
        };
        let Some(prior) = store::IdempotencyRecord::live(&bytes, now)? else {
            return Ok(None);
        };
        if prior.request_mac != idem_ref.request_mac {
            return Err(VaultError::already_exists(
                "idempotency_key",
                "was used for a different request (another customer, fields, values or source); \
                 use a new key for a new write",
            ));
        }
        Ok(Some(PutOutcome {
            created: prior.created,
            versions: prior.fields.into_iter().zip(prior.versions).collect(),
            replayed: true,
        }))
    }

    /// Removes idempotency records older than their retention; returns how
    /// many. The server runs it at start and hourly.
    pub fn sweep_idempotency(&self) -> Result<usize> {
        let now = now_ms();
        let mut removed = 0;
        for item in self.store.idempotency.iter() {
            let (k, v) = item?;
            // Damaged records stay: their retries are refused as DATA_LOSS.
            if let Ok(None) = store::IdempotencyRecord::live(&v, now) {
                self.store.writer.remove(&self.store.idempotency, k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Decrypts `fields` of `customer` (all of the schema's fields if empty),
    /// with the customer's ledger pseudonym. Fields never written are left
    /// out. NOT_FOUND if the customer does not exist.
    pub fn get<'s>(
        &'s self,
        tenant: &str,
        customer: &str,
        fields: &[&'s FieldDef],
    ) -> Result<(Pseudonym, Vec<Revealed<'s>>)> {
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN)?;
        let wrapped = self
            .load_wrapped(tenant, customer)?
            .ok_or_else(|| VaultError::not_found(format!("customer `{customer}`")))?;
        let dek = self.unwrap_dek(tenant, customer, &wrapped)?;
        let subject = Digest(dek.pseudonym(tenant, customer));
        let cipher = dek.cipher();
        let all: Vec<&FieldDef>;
        let fields = if fields.is_empty() {
            all = self.schema.fields().iter().collect();
            &all[..]
        } else {
            fields
        };
        let mut out = Vec::with_capacity(fields.len());
        let cref = self.cref(tenant, customer);
        let held = self.store.records.get(store::record_key(tenant, &cref))?;
        let set = field_set(held.as_deref(), customer)?;
        for def in fields {
            let Some(bytes) = set.get(&def.name) else {
                continue;
            };
            let what = || format!("field `{}` of customer `{customer}`", def.name);
            let rec = decode_field(bytes, what)?;
            let ctx = FieldContext {
                tenant,
                customer,
                field: &def.name,
                version: rec.version,
                dek_version: rec.dek_version,
                provenance: rec.provenance(what)?,
            };
            let plain = envelope::open(&cipher, &ctx, &rec.nonce, &rec.ciphertext)?;
            let value = FieldValue::from_bytes(&plain).ok_or_else(|| {
                VaultError::integrity(format!("{} (undecodable plaintext)", what()))
            })?;
            out.push(Revealed {
                def,
                value,
                version: rec.version,
                source: Source {
                    channel: rec.channel,
                    collector: rec.collector,
                    consent_ref: rec.consent_ref,
                },
                collected_at_ms: rec.collected_at_ms,
            });
        }
        Ok((subject, out))
    }

    /// Customers whose `field` equals `value`, by blind index. Returns at
    /// most `limit` ids and whether more matched.
    pub fn search(
        &self,
        tenant: &str,
        field: &FieldDef,
        value: &FieldValue,
        limit: u32,
    ) -> Result<(Vec<String>, bool)> {
        if !field.indexed {
            return Err(VaultError::invalid(
                "field",
                format!(
                    "field `{}` has no blind index; only indexed fields can be searched",
                    field.name
                ),
            ));
        }
        let limit = match limit {
            0 => 100,
            n if n > MAX_SEARCH_LIMIT => {
                return Err(VaultError::invalid(
                    "limit",
                    format!("at most {MAX_SEARCH_LIMIT}"),
                ));
            }
            n => n,
        } as usize;
        let token = self
            .keyring
            .index_key(tenant)
            .token(&field.name, &value.index_bytes());
        let prefix = store::index_prefix(tenant, &field.name, &token);
        let mut ids = Vec::new();
        let mut truncated = false;
        for item in self.store.index.scan_prefix(&prefix) {
            let (k, _) = item?;
            if ids.len() == limit {
                truncated = true;
                break;
            }
            let r = CustomerRef::from_slice(&k[prefix.len()..])
                .ok_or_else(|| VaultError::integrity("a blind-index entry"))?;
            // Storage holds references; the id is sealed with the pad. An
            // entry whose customer is gone (an erasure under way) is no hit.
            match self.customer_id(tenant, &r) {
                Ok(id) => ids.push(id),
                Err(VaultError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((ids, truncated))
    }

    /// Crypto-shreds `customer`: removes the wrapped data key, every record,
    /// every index entry and the customer's lineage in one transaction, and
    /// stores `activity`, the erasure's own customer-free lineage activity
    /// anchored at ledger entry `ledger_index`. Not durable until
    /// [`Engine::commit`].
    pub fn erase(
        &self,
        tenant: &str,
        customer: &str,
        activity: &lineage::Pending,
        ledger_index: u64,
    ) -> Result<EraseOutcome> {
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN)?;
        let _guard = self.lock(tenant, customer);
        let wrapped = self
            .load_wrapped(tenant, customer)?
            .ok_or_else(|| VaultError::not_found(format!("customer `{customer}`")))?;
        // Taken while it can still be computed: the customer's lineage is
        // filed under it.
        let subject = self
            .unwrap_dek(tenant, customer, &wrapped)
            .ok()
            .map(|dek| Digest(dek.pseudonym(tenant, customer)));
        // The shred comes first: from here on the customer's data is gone,
        // whatever happens to the rest of this erasure.
        self.store.slots.shred(wrapped.slot)?;
        let (fields_erased, index_entries_removed) = self.remove_customer(
            tenant,
            &self.cref(tenant, customer),
            subject,
            Some((activity, ledger_index)),
        )?;
        self.pending_release
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wrapped.slot);
        Ok(EraseOutcome {
            fields_erased,
            index_entries_removed,
            wrap_version: wrapped.kek_version,
            erased_at_ms: now_ms(),
        })
    }

    /// The tenant's TFHE secret key, created on first use.
    pub(crate) fn fhe_secret(&self, tenant: &str) -> Result<Arc<crate::crypto::fhe::FheSecret>> {
        self.features.secret(tenant)
    }

    /// The tenant's bootstrap key (public evaluation material for trees and
    /// histograms), made on first use in this process.
    pub(crate) fn fhe_bootstrap_key(
        &self,
        tenant: &str,
    ) -> Result<Arc<sovra_sandbox::BootstrapKey>> {
        self.features.bootstrap_key(tenant)
    }

    /// Creates the tenant's TFHE keys if it has none yet (`sovra init`).
    pub fn ensure_fhe_keys(&self, tenant: &str) -> Result<()> {
        self.features.secret(tenant).map(|_| ())
    }

    /// Folds pending feature values into their encrypted blocks: of
    /// `tenant` (or every tenant), of `only` the named features (or all).
    /// Returns how many pending marks it cleared. The server calls it in
    /// the background and at a clean stop; a job calls
    /// [`Engine::pack_features_for_job`]. A block that fails (damaged)
    /// stops only its own feature: the first error is returned after the
    /// other blocks are packed.
    pub(crate) fn pack_features(
        &self,
        tenant: Option<&str>,
        only: Option<&[String]>,
    ) -> Result<usize> {
        self.pack_round(tenant, only).map(|(cleared, _)| cleared)
    }

    /// [`Engine::pack_features`] for a job's `features`, before it reads
    /// their blocks, so its input holds every acknowledged write: a value
    /// is folded in only with the stamp the tree still holds, so while a
    /// write that committed after the packing looked is not yet noted
    /// (microseconds; it is noted before it is answered), the packing
    /// leaves that slot and is run again. Refused if writes to the same
    /// customers keep racing it for 100 rounds.
    pub(crate) fn pack_features_for_job(&self, tenant: &str, features: &[String]) -> Result<usize> {
        let mut cleared = 0;
        for _ in 0..100 {
            let (c, raced) = self.pack_round(Some(tenant), Some(features))?;
            cleared += c;
            if raced == 0 {
                return Ok(cleared);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(VaultError::exhausted(
            "the job's features are being written faster than they can be packed into their encrypted blocks; submit the job again",
        ))
    }

    /// One packing of every pending value of `tenant` and `only`: (marks
    /// cleared, values left because a write raced the packing).
    fn pack_round(&self, tenant: Option<&str>, only: Option<&[String]>) -> Result<(usize, usize)> {
        // (tenant, block) → slot → (customer, [(feature, stamp, value)])
        type Marked = BTreeMap<u32, (CustomerRef, Vec<Noted>)>;
        let mut blocks: BTreeMap<(String, u32), Marked> = BTreeMap::new();
        for p in self.features.pending(tenant) {
            if only.is_some_and(|o| !o.contains(&p.feature)) {
                continue;
            }
            let block = p.slot / sovra_sandbox::params::SLOTS as u32;
            blocks
                .entry((p.tenant, block))
                .or_default()
                .entry(p.slot)
                .or_insert_with(|| (p.customer, Vec::new()))
                .1
                .push((p.feature, p.stamp, p.value));
        }
        let (mut cleared, mut raced, mut first_err) = (0, 0, None);
        for ((t, _), slots) in blocks {
            match self.pack_block(&t, slots) {
                Ok(p) => {
                    cleared += p.cleared;
                    raced += p.raced;
                    if let Some(e) = p.failed.into_iter().next() {
                        first_err.get_or_insert(e);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok((cleared, raced)), Err)
    }

    /// Packs one block's pending (slot → (customer, [(feature, stamp,
    /// noted value)])): the values a write noted are used as they are, the
    /// others (marks found at open) are read back, each slot's once; then
    /// every feature is folded in, in one transaction.
    fn pack_block(
        &self,
        tenant: &str,
        slots: BTreeMap<u32, (CustomerRef, Vec<Noted>)>,
    ) -> Result<features::Packed> {
        let secret = self.features.secret(tenant)?;
        let mut by_feature: BTreeMap<String, Vec<(u32, CustomerRef, features::Stamp, i64)>> =
            BTreeMap::new();
        let mut failed = Vec::new();
        for (slot, (customer, marked)) in slots {
            let mut defs = Vec::new();
            for (feature, _, value) in &marked {
                if value.is_some() {
                    continue;
                }
                match self
                    .schema
                    .field(feature)
                    .ok()
                    .filter(|d| d.feature.is_some())
                {
                    Some(d) => defs.push(d),
                    None => failed.push(VaultError::integrity(format!(
                        "a pending mark names `{feature}`, which is not a feature of the schema"
                    ))),
                }
            }
            // INVARIANT: the stamps were read before the values, so a write
            // after them changes the stamps and keeps the slot pending.
            let read = self.feature_values(tenant, &customer, &defs)?;
            for (feature, stamp, value) in marked {
                let v = value.or_else(|| read.iter().find(|(f, _)| *f == feature).map(|v| v.1));
                if let Some(v) = v {
                    by_feature
                        .entry(feature)
                        .or_default()
                        .push((slot, customer, stamp, v));
                }
            }
        }
        let work: Vec<features::PackFeature> = by_feature
            .into_iter()
            .map(|(feature, slots)| features::PackFeature { feature, slots })
            .collect();
        let mut packed = self.features.pack(&secret, tenant, &work)?;
        failed.append(&mut packed.failed);
        packed.failed = failed;
        Ok(packed)
    }

    /// The quantised values of `defs` now stored for the customer `r`
    /// (0 for each if it is gone), by feature name.
    fn feature_values(
        &self,
        tenant: &str,
        r: &CustomerRef,
        defs: &[&FieldDef],
    ) -> Result<Vec<(String, i64)>> {
        let zeros = || defs.iter().map(|d| (d.name.clone(), 0)).collect();
        if defs.is_empty() {
            return Ok(Vec::new());
        }
        let customer = match self.customer_id(tenant, r) {
            Ok(c) => c,
            Err(VaultError::NotFound(_)) => return Ok(zeros()),
            Err(e) => return Err(e),
        };
        let revealed = match self.get(tenant, &customer, defs) {
            Ok((_, r)) => r,
            Err(VaultError::NotFound(_)) => return Ok(zeros()),
            Err(e) => return Err(e),
        };
        let pairs: Vec<(&FieldDef, FieldValue)> =
            revealed.into_iter().map(|f| (f.def, f.value)).collect();
        let q = features::quantised(&pairs);
        Ok(defs
            .iter()
            .map(|d| {
                let v = q.iter().find(|(n, _)| *n == d.name).map_or(0, |(_, v)| *v);
                (d.name.clone(), v)
            })
            .collect())
    }

    /// The names of the fields `customer` holds a value for.
    pub fn fields_held(&self, tenant: &str, customer: &str) -> Result<Vec<String>> {
        let held = self
            .store
            .records
            .get(store::record_key(tenant, &self.cref(tenant, customer)))?;
        let set = field_set(held.as_deref(), customer)?;
        Ok(set.iter().map(|(n, _)| n.to_owned()).collect())
    }

    /// Removes a customer's data key, records, index entries and lineage in
    /// one transaction, storing the erasure's activity if given. Returns
    /// (records, index entries) removed.
    fn remove_customer(
        &self,
        tenant: &str,
        customer: &CustomerRef,
        subject: Option<Pseudonym>,
        erase: Option<(&lineage::Pending, u64)>,
    ) -> Result<(u32, u32)> {
        let mut entries = Vec::new();
        let record_key = store::record_key(tenant, customer);
        let held = self.store.records.get(&record_key)?;
        // A corrupted record must not block erasure: its key is enough.
        let decoded = held.as_deref().and_then(store::FieldSet::decode);
        // The feature slot is in the set; with the set damaged, the
        // tenant's slots are searched for the customer. (A customer with no
        // set never wrote a feature: a feature write writes the set.)
        let slot = match (&decoded, &held) {
            (Some(set), _) => self.features.slot_of(tenant, customer, set.slot())?,
            (None, Some(_)) => self.features.find_slot(tenant, customer)?,
            (None, None) => None,
        };
        let set = decoded.unwrap_or_default();
        let fields = if held.is_some() {
            set.iter().count().max(1)
        } else {
            0
        };
        for (field, v) in set.iter() {
            if let Ok(rec) = StoredField::decode(v) {
                if !rec.index_token.is_empty() {
                    entries.push(store::index_entry(
                        tenant,
                        field,
                        &rec.index_token,
                        customer,
                    ));
                }
            }
        }
        let dek_k = store::data_key_key(tenant, customer);
        let staged = self
            .lineage
            .stage_removal(tenant, customer, subject, erase)?;
        let feature_names: Vec<String> = self
            .schema
            .fields()
            .iter()
            .filter(|f| f.feature.is_some())
            .map(|f| f.name.clone())
            .collect();
        let secret = match slot {
            Some(slot) => Some((slot, self.fhe_secret(tenant)?)),
            None => None,
        };
        let s = &self.store;
        s.writer.transact(
            [
                &s.records,
                &s.data_keys,
                &s.index,
                self.lineage.tree(),
                self.features.tree(),
                self.features.blocks(),
            ],
            |[r, k, i, l, f, fb]| {
                staged.apply(l)?;
                if let Some((slot, secret)) = &secret {
                    features::erase(f, fb, secret, tenant, customer, *slot, &feature_names)?;
                }
                k.remove(dek_k.as_slice())?;
                r.remove(record_key.as_slice())?;
                for e in &entries {
                    i.remove(e.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<VaultError>>(())
            },
        )?;
        Ok((
            u32::try_from(fields).unwrap_or(u32::MAX),
            u32::try_from(entries.len()).unwrap_or(u32::MAX),
        ))
    }
}

// Tenant keys: the rotation component does the work; these keep the
// engine's API for its callers.
impl Engine {
    /// Starts a rotation of the tenant's key (see [`KeyRotation::rotate`]:
    /// `audit` makes the ledger entry durable first).
    pub async fn rotate<F, Fut>(&self, tenant: &str, audit: F) -> Result<KeyState>
    where
        F: FnOnce(u32, u32) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        self.rotation.rotate(tenant, audit).await
    }

    /// Retires the tenant's key versions below `min_version` (see
    /// [`KeyRotation::retire`]).
    pub async fn retire<F, Fut>(
        &self,
        tenant: &str,
        min_version: u32,
        force: bool,
        audit: F,
    ) -> Result<KeyStatus>
    where
        F: FnOnce(Retirement) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        self.rotation
            .retire(tenant, min_version, force, audit)
            .await
    }

    /// The tenant's key state and data keys per wrapping version.
    pub fn key_status(&self, tenant: &str) -> Result<KeyStatus> {
        self.rotation.key_status(tenant)
    }

    /// Runs the tenant's rotation job on a background task.
    pub fn spawn_rotation(&self, tenant: String) {
        self.rotation.spawn(tenant);
    }

    /// Resumes every unfinished rotation job in the background.
    pub fn resume_rotations(&self) {
        self.rotation.resume();
    }
}

// Lineage by customer id: the engine resolves the customer to its pseudonym
// (under the customer's lock where the lineage store writes), then asks the
// lineage store.
impl Engine {
    /// Records a read (reveal, masked read, refusal or export) of `customer`:
    /// `activity` lists the fields used. The ledger entry is appended by
    /// `anchor` (not durable until the ledger commits); the record is
    /// written before this returns and durable after [`Engine::commit`].
    /// NOT_FOUND if the customer was erased meanwhile.
    pub fn record_access(
        &self,
        tenant: &str,
        customer: &str,
        activity: lpb::Activity,
        anchor: impl FnOnce(&Pseudonym, &Digest) -> Result<u64>,
    ) -> Result<u64> {
        let _guard = self.lock(tenant, customer);
        // INVARIANT: under the customer's lock, a customer whose data key is
        // present is not being erased, so the records the lineage store
        // writes cannot outlive the erasure that would remove them.
        let subject = self.pseudonym(tenant, customer, false)?;
        self.lineage
            .record_access(tenant, customer, &subject, activity, anchor)
    }

    /// The lineage of `field` of `customer`: every version, oldest first.
    /// NOT_FOUND for an unknown or erased customer or a field it never had.
    pub fn field_lineage(
        &self,
        ledger: &Ledger,
        tenant: &str,
        customer: &str,
        field: &str,
    ) -> Result<lpb::FieldLineage> {
        let subject = self.pseudonym(tenant, customer, false)?;
        self.lineage
            .field_lineage(ledger, tenant, customer, &subject, field)
    }

    /// Accesses to `field` of `customer` with `from_ms <= time < to_ms`,
    /// oldest first, at most `limit`, starting after `after` (a page token).
    /// The range and limit are checked before the customer is looked up.
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
    ) -> Result<lpb::ListAccessesResponse> {
        let page = Page::new(range, limit)?;
        let subject = self.pseudonym(tenant, customer, false)?;
        self.lineage
            .accesses(ledger, tenant, &subject, field, &page, after)
    }

    /// The activities that computed on `field` of `customer`, oldest first.
    pub fn derived(
        &self,
        ledger: &Ledger,
        tenant: &str,
        customer: &str,
        field: &str,
    ) -> Result<lpb::GetDerivedResponse> {
        let subject = self.pseudonym(tenant, customer, false)?;
        self.lineage.derived(ledger, tenant, &subject, field)
    }

    /// The tenant's lineage aggregated per job, with no customer id,
    /// pseudonym or value (see [`LineageStore::export`]).
    pub fn export_lineage(&self, tenant: &str) -> Result<lpb::ExportLineageResponse> {
        self.lineage.export(tenant)
    }
}
