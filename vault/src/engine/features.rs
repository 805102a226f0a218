//! Encrypted model features: each feature field of each customer, quantised
//! as the schema says, also kept packed in TFHE blocks for the sandbox.
//!
//! [`FeatureStore`] owns the `fhe_features` and `fhe_blocks` trees and the
//! tenants' TFHE keys
//! (wrapped in that tree, cached in memory with their bootstrap keys); the
//! engine holds it. The writes that must agree with a field ([`put`],
//! [`erase`]) run inside the engine's transaction over that tree.
//!
//! Guarantees: a customer gets one slot per tenant (block = slot / 2048,
//! coefficient = slot % 2048) the first time one of its feature fields is
//! written. Slots come from blocks of [`SLOT_BLOCK`] reserved through the
//! write-ahead log (as lineage ids are), so a new customer costs one insert,
//! and a slot is never handed out twice, across crashes and restores of the
//! view too; a restart leaves the rest of a reserved block unused. The write
//! itself does no TFHE work: in its transaction it marks each written
//! feature of the slot *pending* (a stamp per feature, kept in the slot's one
//! value beside the slot number; no value), and the packer ([`pack`], run in
//! the background and by every job before it reads a block) folds the
//! current sealed values of pending slots into their blocks, one
//! transaction per block holding one fresh encryption per feature whatever
//! the number of writes; a damaged block stops only its own feature. A
//! feature's stamp is removed from a mark only by a packing that saw it, so a
//! write racing a packing is packed again, and a job never misses an
//! acknowledged write. A mark is durable with the field, so a crash loses no
//! packing work. The marks are also kept in memory with the values their
//! writes noted (loaded from the tree at open, after the log's replay,
//! without values; noted by every write after its transaction and before
//! its answer), so the packer neither scans the tree for marks nor reads a
//! noted value back; it reads back only the values of marks found at open.
//! The stored marks stay the authority: a packing checks each stamp in its
//! transaction.
//! Erasure zeroes the customer's slot in every block, re-encrypting each
//! block freshly, and removes the slot's key (and so its mark) in the
//! erasure's transaction. At rest a block is
//! the whole GLWE ciphertext, 2 × 2048 × 8 bytes plus framing (about 16
//! bytes per value). Blocks read back are checked by tfhe's conformant
//! deserialisation before any use.
//!
//! Does not: reuse an erased customer's slot (it stays 0 and out of every
//! cohort), or remove copies of old blocks that sled keeps in log segments
//! it has not compacted yet (the TFHE key is tenant-wide, so these are not
//! crypto-shredded; see SECURITY.md).
//!
//! Key layout (`0` is a zero byte), storage key format 4. The customer's
//! slot is in its record set (`records`, see `store::FieldSet`), which
//! every put reads anyway. The `fhe_features` tree holds the small keys
//! every feature write updates: `N tenant` the end (exclusive) of the
//! reserved slots; `M tenant 0 slot` (slot big-endian, so new customers'
//! slots are appended at the end of the tree, which costs sled far less
//! than a random key) the slot's customer (its 16-byte [`CustomerRef`])
//! followed by its pending mark (per feature, in name order: the name, a
//! zero byte and an 8-byte stamp; empty when nothing is pending). A
//! record set naming a slot another customer holds is refused. The
//! `fhe_blocks` tree holds the large values:
//! `K tenant` wrapped secret key; `B tenant 0 feature 0 block` block. They
//! are apart because sled rewrites a whole node when it consolidates one:
//! with a block or a key in the same node, every slot or mark update wrote
//! tens of kilobytes (a sled blob file each time). Format 3 kept
//! `S tenant 0 ref` (customer to slot), `R tenant 0 slot` (slot to
//! customer) and `P tenant 0 slot` (the mark); [`upgrade_from_format_3`]
//! turns them into the record sets' slots and `M` keys.

use crate::crypto::fhe::FheSecret;
use crate::crypto::keys::{CustomerRef, KeyRing};
use crate::error::{Result, VaultError};
use sled::transaction::ConflictableTransactionError;

use crate::store::{Tx, Writer};
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::{BootstrapKey, FeatureBlock};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<VaultError>>;

fn key(tag: u8, tenant: &str, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(tenant.as_bytes());
    for r in rest {
        k.push(0);
        k.extend_from_slice(r);
    }
    k
}

/// Where the tenant's wrapped TFHE secret key is stored.
fn secret_key(tenant: &str) -> Vec<u8> {
    key(b'K', tenant, &[])
}
fn next_key(tenant: &str) -> Vec<u8> {
    key(b'N', tenant, &[])
}
fn mark_key(tenant: &str, slot: u32) -> Vec<u8> {
    key(b'M', tenant, &[&slot.to_be_bytes()])
}
/// The `S` key of format 3 (see [`upgrade_from_format_3`]).
#[cfg(test)]
fn legacy_slot_key(tenant: &str, customer: &CustomerRef) -> Vec<u8> {
    key(b'S', tenant, &[&customer.0])
}
/// The `R` and `P` keys of format 3 (see [`upgrade_from_format_3`]).
#[cfg(test)]
fn legacy_key(tag: u8, tenant: &str, slot: u32) -> Vec<u8> {
    key(tag, tenant, &[&slot.to_be_bytes()])
}

/// Length of a pending stamp.
const STAMP_LEN: usize = 8;

/// A pending stamp: unique per write (see [`next_stamp`]).
pub(crate) type Stamp = [u8; STAMP_LEN];

/// Slots reserved per logged reservation.
const SLOT_BLOCK: u32 = 256;

/// A slot's pending mark: (feature, stamp) in strictly increasing feature
/// order (empty if nothing is pending). `None` if `b` is not a well-formed
/// mark.
fn decode_mark(mut b: &[u8]) -> Option<Vec<(String, [u8; STAMP_LEN])>> {
    let mut out: Vec<(String, [u8; STAMP_LEN])> = Vec::new();
    while !b.is_empty() {
        let end = b.iter().position(|&c| c == 0)?;
        let name = std::str::from_utf8(&b[..end]).ok()?;
        let stamp = <[u8; STAMP_LEN]>::try_from(b.get(end + 1..end + 1 + STAMP_LEN)?).ok()?;
        if name.is_empty() || out.last().is_some_and(|(last, _)| last.as_str() >= name) {
            return None;
        }
        out.push((name.to_owned(), stamp));
        b = &b[end + 1 + STAMP_LEN..];
    }
    Some(out)
}

fn encode_mark(entries: &BTreeMap<String, [u8; STAMP_LEN]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 24);
    for (name, stamp) in entries {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(stamp);
    }
    out
}

/// A stored slot value: the slot's customer and its pending mark.
type SlotValue = (CustomerRef, BTreeMap<String, Stamp>);

/// The customer and mark in a stored `M` value; `None` if damaged.
fn decode_slot(b: &[u8]) -> Option<SlotValue> {
    use crate::crypto::keys::CUSTOMER_REF_LEN;
    let customer = CustomerRef::from_slice(b.get(..CUSTOMER_REF_LEN)?)?;
    let mark = decode_mark(&b[CUSTOMER_REF_LEN..])?;
    Some((customer, mark.into_iter().collect()))
}

fn encode_slot(customer: &CustomerRef, mark: &BTreeMap<String, Stamp>) -> Vec<u8> {
    let mut out = customer.0.to_vec();
    out.extend_from_slice(&encode_mark(mark));
    out
}

fn bad_slot() -> VaultError {
    VaultError::integrity("an encrypted-feature slot (its customer or pending mark)")
}

/// The slot value stored at `k` in a transaction; damage aborts.
fn read_slot(f: &Tx<'_>, k: &[u8]) -> TxResult<Option<SlotValue>> {
    match f.get(k)? {
        None => Ok(None),
        Some(b) => match decode_slot(&b) {
            Some(v) => Ok(Some(v)),
            None => abort(bad_slot()),
        },
    }
}

/// Stamps of pending marks: unique within the process (seeded with the
/// time, so marks left by an earlier process differ too).
static STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh stamp for one write's marks.
pub(crate) fn next_stamp() -> Stamp {
    use std::sync::atomic::Ordering;
    let seed = u64::try_from(crate::clock::now_ms()).unwrap_or(0) << 20;
    let _ = STAMP.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    STAMP.fetch_add(1, Ordering::Relaxed).to_be_bytes()
}
fn block_prefix(tenant: &str, feature: &str) -> Vec<u8> {
    let mut k = key(b'B', tenant, &[feature.as_bytes()]);
    k.push(0);
    k
}
fn block_key(tenant: &str, feature: &str, block: u32) -> Vec<u8> {
    let mut k = block_prefix(tenant, feature);
    k.extend_from_slice(&block.to_be_bytes());
    k
}

fn u32_of(bytes: &[u8], what: &str) -> Result<u32> {
    <[u8; 4]>::try_from(bytes)
        .map(u32::from_be_bytes)
        .map_err(|_| VaultError::integrity(format!("encrypted-feature {what}")))
}

fn abort<T>(e: VaultError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The slots being handed out for one tenant: `next..end`.
#[derive(Debug)]
struct SlotIds {
    next: u32,
    end: u32,
}

/// A pending slot known in memory: its customer and, per feature, the
/// stamp of the latest write and the value it wrote (`None` when loaded
/// from the tree at open: the packer reads it back then).
#[derive(Debug)]
struct MarkedSlot {
    customer: CustomerRef,
    features: BTreeMap<String, (Stamp, Option<zeroize::Zeroizing<i64>>)>,
}

/// The pending slots known in memory: tenant → slot → what is pending.
type Marked = HashMap<String, BTreeMap<u32, MarkedSlot>>;

/// The `fhe_features` and `fhe_blocks` trees and the tenants' TFHE keys.
pub(crate) struct FeatureStore {
    tree: sled::Tree,
    blocks: sled::Tree,
    writer: Writer,
    keyring: Arc<KeyRing>,
    // Unwrapped once per tenant and kept for the process's life: every
    // write of a feature and every release needs the key.
    secrets: RwLock<HashMap<String, Arc<FheSecret>>>,
    bootstrap: Mutex<HashMap<String, Arc<BootstrapKey>>>,
    // Per tenant, the reserved block of slots being handed out (see
    // `new_slot`).
    next_slots: Mutex<HashMap<String, SlotIds>>,
    // INVARIANT: every (slot, feature, stamp) of a stored mark is here,
    // or a later stamp of that feature (loaded at open; a write notes its
    // own after its transaction, before it is answered). The tree is the
    // authority: a packing clears a stamp only if the stored mark still
    // holds it, then forgets it here if it is still the one noted.
    marked: Mutex<Marked>,
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FeatureStore")
    }
}

impl FeatureStore {
    /// The store over `tree` (the `fhe_features` tree), wrapping keys with
    /// `keyring`. Reads every slot once, to know the pending ones: call it
    /// after the log's replay.
    pub(crate) fn new(
        tree: sled::Tree,
        blocks: sled::Tree,
        writer: Writer,
        keyring: Arc<KeyRing>,
    ) -> Result<Self> {
        let mut marked: Marked = HashMap::new();
        for item in tree.scan_prefix(b"M") {
            let (k, v) = item?;
            let (tenant, slot) = split_mark_key(&k).ok_or_else(|| {
                VaultError::integrity("a key of the vault's `fhe_features` tree (an `M` key)")
            })?;
            let (customer, mark) = decode_slot(&v).ok_or_else(|| {
                VaultError::integrity(format!(
                    "encrypted-feature slot {slot} of tenant `{tenant}` (its customer or pending mark, in the vault's `fhe_features` tree)"
                ))
            })?;
            if !mark.is_empty() {
                let features = mark.into_iter().map(|(f, st)| (f, (st, None))).collect();
                marked
                    .entry(tenant.to_owned())
                    .or_default()
                    .insert(slot, MarkedSlot { customer, features });
            }
        }
        Ok(Self {
            tree,
            blocks,
            writer,
            keyring,
            secrets: RwLock::new(HashMap::new()),
            bootstrap: Mutex::new(HashMap::new()),
            next_slots: Mutex::new(HashMap::new()),
            marked: Mutex::new(marked),
        })
    }

    /// A new slot for a customer's first feature write (its record set
    /// then holds it). Called with the customer's lock held, before the
    /// write's transaction. A slot is unused if that transaction fails.
    pub(crate) fn new_slot(&self, tenant: &str) -> Result<u32> {
        let mut all = self
            .next_slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ids = match all.get_mut(tenant) {
            Some(ids) => ids,
            None => {
                let end = match self.tree.get(next_key(tenant))? {
                    Some(b) => u32_of(&b, "slot reservation")?,
                    None => 0,
                };
                all.entry(tenant.to_owned())
                    .or_insert(SlotIds { next: end, end })
            }
        };
        if ids.next == ids.end {
            let end = ids
                .end
                .checked_add(SLOT_BLOCK)
                .ok_or_else(|| VaultError::storage("the tenant has used every feature slot"))?;
            // INVARIANT: the reservation is logged before any of its slots
            // is used, so every logged slot lies after the reservation that
            // covers it: replaying the log (after a crash, or into a
            // restored older view) restores a reservation at least as high
            // as any slot in the view.
            self.writer
                .insert(&self.tree, next_key(tenant), end.to_be_bytes())?;
            ids.end = end;
        }
        let slot = ids.next;
        ids.next += 1;
        Ok(slot)
    }

    /// After a write's transaction marked `slot` pending with `stamp`
    /// for each of `values` (quantised): the packer folds them in without
    /// reading them back.
    pub(crate) fn note_pending(
        &self,
        tenant: &str,
        slot: u32,
        customer: &CustomerRef,
        stamp: Stamp,
        values: &[(String, i64)],
    ) {
        let mut m = self.lock_marked();
        let entry = m
            .entry(tenant.to_owned())
            .or_default()
            .entry(slot)
            .or_insert_with(|| MarkedSlot {
                customer: *customer,
                features: BTreeMap::new(),
            });
        for (feature, v) in values {
            entry
                .features
                .insert(feature.clone(), (stamp, Some(zeroize::Zeroizing::new(*v))));
        }
    }

    fn lock_marked(&self) -> std::sync::MutexGuard<'_, Marked> {
        self.marked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The tree, for the engine's transactions.
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The blocks' tree, for the erasure's transaction.
    pub(crate) fn blocks(&self) -> &sled::Tree {
        &self.blocks
    }

    /// The tenant's key, created (and stored wrapped under `K tenant`) on
    /// first use. Not durable until the store's next commit.
    pub(crate) fn secret(&self, tenant: &str) -> Result<Arc<FheSecret>> {
        if let Some(k) = self
            .secrets
            .read()
            .ok()
            .and_then(|m| m.get(tenant).cloned())
        {
            return Ok(k);
        }
        let key = secret_key(tenant);
        let keyring = &*self.keyring;
        let secret = match self.blocks.get(&key)? {
            Some(w) => FheSecret::unwrap(keyring, tenant, &w)?,
            None => {
                let fresh = FheSecret::generate();
                let wrapped = fresh.wrap(keyring, tenant)?;
                // Two first writers race: the first stored key wins, the
                // other is dropped (and zeroed) unused.
                match self.writer.insert_if_absent(&self.blocks, &key, &wrapped)? {
                    None => fresh,
                    Some(w) => FheSecret::unwrap(keyring, tenant, &w)?,
                }
            }
        };
        let secret = Arc::new(secret);
        if let Ok(mut m) = self.secrets.write() {
            m.insert(tenant.to_owned(), secret.clone());
        }
        Ok(secret)
    }

    /// The tenant's bootstrap key (public evaluation material for trees and
    /// histograms), made on first use in this process. The lock is held
    /// while it is made, so concurrent first jobs make it once.
    pub(crate) fn bootstrap_key(&self, tenant: &str) -> Result<Arc<BootstrapKey>> {
        let secret = self.secret(tenant)?;
        let mut m = self
            .bootstrap
            .lock()
            .map_err(|_| VaultError::storage("the bootstrap key cache is poisoned"))?;
        if let Some(k) = m.get(tenant) {
            return Ok(k.clone());
        }
        let k = Arc::new(secret.bootstrap_key()?);
        m.insert(tenant.to_owned(), k.clone());
        Ok(k)
    }

    /// The slot `customer` holds, for its erasure: `named` (from its
    /// record set) unless that slot's value names another customer (a
    /// missing or damaged value claims nothing), else found by scanning the tenant's slots
    /// (a record set damaged or naming another customer's slot). A damaged
    /// value met in the scan is skipped: it must not block an erasure.
    pub(crate) fn slot_of(
        &self,
        tenant: &str,
        customer: &CustomerRef,
        named: Option<u32>,
    ) -> Result<Option<u32>> {
        if let Some(slot) = named {
            let ours = match self.tree.get(mark_key(tenant, slot))? {
                None => true,
                Some(b) => decode_slot(&b).is_none_or(|(c, _)| c == *customer),
            };
            if ours {
                return Ok(Some(slot));
            }
        }
        self.find_slot(tenant, customer)
    }

    /// The slot held by `customer`, found by scanning the tenant's slots
    /// (damaged values skipped).
    pub(crate) fn find_slot(&self, tenant: &str, customer: &CustomerRef) -> Result<Option<u32>> {
        let mut prefix = key(b'M', tenant, &[]);
        prefix.push(0);
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            if let (Some((_, slot)), Some((c, _))) = (split_mark_key(&k), decode_slot(&v)) {
                if c == *customer {
                    return Ok(Some(slot));
                }
            }
        }
        Ok(None)
    }

    /// Refuses a slot named by a record set that no reservation covers (a
    /// damaged or altered set): it would take a slot a later customer gets.
    pub(crate) fn check_reserved(&self, tenant: &str, slot: u32) -> Result<()> {
        let known = self
            .next_slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .map(|ids| ids.end);
        let end = match known {
            Some(end) => end,
            None => match self.tree.get(next_key(tenant))? {
                Some(b) => u32_of(&b, "slot reservation")?,
                None => 0,
            },
        };
        if slot >= end {
            return Err(VaultError::integrity(format!(
                "the record set names encrypted-feature slot {slot}, and only slots below {end} are reserved"
            )));
        }
        Ok(())
    }

    /// Every pending (feature, slot) of `tenant` or of every tenant, by
    /// tenant, slot and feature, as known in memory (see
    /// [`FeatureStore::pack`] for why that is enough).
    pub(crate) fn pending(&self, tenant: Option<&str>) -> Vec<Pending> {
        let m = self.lock_marked();
        let mut out = Vec::new();
        let mut tenants: Vec<&String> = m
            .keys()
            .filter(|t| tenant.is_none_or(|want| want == t.as_str()))
            .collect();
        tenants.sort();
        for t in tenants {
            for (slot, marked) in &m[t] {
                for (feature, (stamp, value)) in &marked.features {
                    out.push(Pending {
                        tenant: t.clone(),
                        feature: feature.clone(),
                        slot: *slot,
                        customer: marked.customer,
                        stamp: *stamp,
                        value: value.as_deref().copied(),
                    });
                }
            }
        }
        out
    }

    /// Folds `features` of one block into it, in one transaction: per
    /// feature, (slot, customer, the stamp seen before its value was read,
    /// its quantised value). A slot whose stored mark no longer holds the
    /// feature (erased, or packed by a concurrent packing) is left as its
    /// block holds it; a stamp is removed from a stored mark only if the
    /// mark still holds it, and then from memory only if no later write
    /// noted another. What the stored marks no longer hold is forgotten
    /// in memory too, so memory never keeps a slot pending for ever.
    pub(crate) fn pack(
        &self,
        secret: &FheSecret,
        tenant: &str,
        features: &[PackFeature],
    ) -> Result<Packed> {
        let packed = self
            .writer
            .transact([&self.tree, &self.blocks], |[f, fb]| {
                pack_block(f, fb, secret, tenant, features)
            })?;
        let mut m = self.lock_marked();
        if let Some(slots) = m.get_mut(tenant) {
            for (slot, feature, stamp) in &packed.settled {
                if let Some(marked) = slots.get_mut(slot) {
                    if marked
                        .features
                        .get(feature)
                        .is_some_and(|(s, _)| s == stamp)
                    {
                        marked.features.remove(feature);
                    }
                    if marked.features.is_empty() {
                        slots.remove(slot);
                    }
                }
            }
            if slots.is_empty() {
                m.remove(tenant);
            }
        }
        Ok(packed)
    }

    /// Every customer of the tenant with a slot: (reference, slot), by slot.
    pub(crate) fn slots(&self, tenant: &str) -> Result<Vec<(CustomerRef, u32)>> {
        slots(&self.tree, tenant)
    }

    /// The stored blocks of `feature`, by block number (None where no
    /// customer of that block holds it), up to `blocks` blocks, each checked
    /// (conformant deserialisation) before it is returned.
    pub(crate) fn column(
        &self,
        tenant: &str,
        feature: &str,
        blocks: usize,
    ) -> Result<Vec<Option<FeatureBlock>>> {
        column(&self.blocks, tenant, feature, blocks)
    }
}

/// Re-encrypts one block of `feature` with `slot` set to `value` (a fresh
/// encryption of every slot).
fn rewrite(
    f: &Tx<'_>,
    secret: &FheSecret,
    tenant: &str,
    feature: &str,
    slot: u32,
    value: i64,
) -> TxResult<()> {
    set_slots(
        f,
        secret,
        tenant,
        feature,
        slot / SLOTS as u32,
        &[(slot, value)],
    )
}

/// Re-encrypts `block` of `feature` freshly with each (slot, value) of
/// `sets` (all in that block) set.
fn set_slots(
    f: &Tx<'_>,
    secret: &FheSecret,
    tenant: &str,
    feature: &str,
    block: u32,
    sets: &[(u32, i64)],
) -> TxResult<()> {
    let k = block_key(tenant, feature, block);
    let mut values = match f.get(&k)? {
        Some(bytes) => {
            let what = format!("block {block} of feature `{feature}`");
            match FeatureBlock::from_bytes(&bytes, &what) {
                Ok(b) => secret.decrypt_block(&b),
                Err(e) => return abort(VaultError::integrity(e.to_string())),
            }
        }
        None => zeroize::Zeroizing::new(vec![0i64; SLOTS]),
    };
    for (slot, v) in sets {
        values[*slot as usize % SLOTS] = *v;
    }
    let fresh = match secret
        .encrypt_block(&values)
        .and_then(|b| b.to_bytes().map_err(|e| VaultError::storage(e.to_string())))
    {
        Ok(b) => b,
        Err(e) => return abort(e),
    };
    f.insert(k, fresh)?;
    Ok(())
}

/// A pending mark: the slot's `feature` was written and is not yet in its
/// block.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) tenant: String,
    pub(crate) feature: String,
    pub(crate) slot: u32,
    pub(crate) customer: CustomerRef,
    pub(crate) stamp: Stamp,
    /// The value the write noted; `None` for a mark found at open.
    pub(crate) value: Option<i64>,
}

/// What a packing folds in for one feature of one block: (slot, its
/// customer, stamp read before the value, value).
#[derive(Debug)]
pub(crate) struct PackFeature {
    pub(crate) feature: String,
    pub(crate) slots: Vec<(u32, CustomerRef, Stamp, i64)>,
}

/// What one packing did: the (feature, slot) stamps it cleared, and the
/// features whose block failed (damaged), which it left pending.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    pub(crate) cleared: usize,
    pub(crate) failed: Vec<VaultError>,
    /// (slot, feature, stamp) no longer pending in the tree: cleared now,
    /// or found cleared or erased.
    settled: Vec<(u32, String, Stamp)>,
    /// How many (slot, feature) the tree marked with another stamp than
    /// the one seen: a write committed since, whose own value a later
    /// packing folds in (see `Engine::pack_features_for_job`).
    pub(crate) raced: usize,
}

/// One packing transaction (see [`FeatureStore::pack`]): every slot of
/// every feature is in the same block. Each feature's block is encrypted
/// afresh with the values of the slots still marked for it; a feature whose
/// block fails is skipped, and its stamps stay. Each slot's mark is then
/// written once, without the stamps the packing saw.
fn pack_block(
    f: &Tx<'_>,
    fb: &Tx<'_>,
    secret: &FheSecret,
    tenant: &str,
    features: &[PackFeature],
) -> TxResult<Packed> {
    // slot → (customer, mark), for the slots still held by their customer.
    let mut marks: BTreeMap<u32, (CustomerRef, BTreeMap<String, [u8; STAMP_LEN]>)> =
        BTreeMap::new();
    for pf in features {
        for (slot, customer, _, _) in &pf.slots {
            if marks.contains_key(slot) {
                continue;
            }
            if let Some((c, mark)) = read_slot(f, &mark_key(tenant, *slot))? {
                if c == *customer {
                    marks.insert(*slot, (c, mark));
                }
            }
        }
    }
    let mut out = Packed::default();
    let mut changed: std::collections::BTreeSet<u32> = Default::default();
    for pf in features {
        let Some(block) = pf.slots.first().map(|s| s.0 / SLOTS as u32) else {
            continue;
        };
        // INVARIANT: a value is folded in only if the stored mark still
        // holds the very stamp it was read (or noted) with. A slot no
        // longer marked for the feature (erased, or packed by another
        // packing) is left as its block holds it; one marked with another
        // stamp was written since, and that write's own value is folded in
        // by a later packing (every job packs first), so an older value
        // never overwrites a newer one that another packing put in.
        let live: Vec<(u32, i64)> = pf
            .slots
            .iter()
            .filter(|(slot, _, stamp, _)| {
                marks
                    .get(slot)
                    .is_some_and(|(_, m)| m.get(&pf.feature) == Some(stamp))
            })
            .map(|(slot, _, _, v)| (*slot, *v))
            .collect();
        for (slot, _, stamp, _) in &pf.slots {
            match marks.get(slot).and_then(|(_, m)| m.get(&pf.feature)) {
                None => out.settled.push((*slot, pf.feature.clone(), *stamp)),
                Some(held) if held != stamp => out.raced += 1,
                Some(_) => {}
            }
        }
        if live.is_empty() {
            continue;
        }
        match set_slots(fb, secret, tenant, &pf.feature, block, &live) {
            Ok(()) => {}
            Err(ConflictableTransactionError::Abort(e)) => {
                out.failed.push(e);
                continue;
            }
            Err(e) => return Err(e),
        }
        for (slot, _, stamp, _) in &pf.slots {
            let Some((_, m)) = marks.get_mut(slot) else {
                continue;
            };
            if m.get(&pf.feature).is_some_and(|s| s == stamp) {
                m.remove(&pf.feature);
                changed.insert(*slot);
                out.cleared += 1;
                out.settled.push((*slot, pf.feature.clone(), *stamp));
            }
        }
    }
    for slot in changed {
        if let Some((customer, m)) = marks.get(&slot) {
            f.insert(mark_key(tenant, slot), encode_slot(customer, m))?;
        }
    }
    Ok(out)
}

/// In the write's transaction: marks the written features of `customer`'s
/// `slot` pending (its record set holds the slot, from
/// [`FeatureStore::new_slot`] for a first feature write); the packer folds
/// the values in, see the module docs. The caller then tells
/// [`FeatureStore::note_pending`].
pub(crate) fn put(
    f: &Tx<'_>,
    tenant: &str,
    customer: &CustomerRef,
    slot: u32,
    stamp: Stamp,
    values: &[(String, i64)],
) -> TxResult<()> {
    if values.is_empty() {
        return Ok(());
    }
    let k = mark_key(tenant, slot);
    let mut mark = match read_slot(f, &k)? {
        Some((c, _)) if c != *customer => {
            return abort(VaultError::integrity(format!(
                "encrypted-feature slot {slot} (its record set names a slot another customer holds)"
            )));
        }
        Some((_, mark)) => mark,
        None => BTreeMap::new(),
    };
    // One value per slot, so a write of many features is one insert.
    for (feature, _) in values {
        mark.insert(feature.clone(), stamp);
    }
    f.insert(k, encode_slot(customer, &mark))?;
    Ok(())
}

/// In the erasure's transaction: zeroes `customer`'s `slot` in every
/// feature block that exists and removes the slot (and its mark). A slot
/// that holds another customer is left as it is (the engine picks the slot
/// with [`FeatureStore::slot_of`], so only a change since makes it so); a
/// damaged slot value does not block the erasure.
pub(crate) fn erase(
    f: &Tx<'_>,
    fb: &Tx<'_>,
    secret: &FheSecret,
    tenant: &str,
    customer: &CustomerRef,
    slot: u32,
    features: &[String],
) -> TxResult<()> {
    let k = mark_key(tenant, slot);
    if let Some(b) = f.get(&k)? {
        if decode_slot(&b).is_some_and(|(c, _)| c != *customer) {
            return Ok(());
        }
    }
    for feature in features {
        if fb
            .get(block_key(tenant, feature, slot / SLOTS as u32))?
            .is_some()
        {
            rewrite(fb, secret, tenant, feature, slot, 0)?;
        }
    }
    f.remove(k)?;
    Ok(())
}

/// The tenant and slot of an `M tenant 0 slot` key.
fn split_mark_key(k: &[u8]) -> Option<(&str, u32)> {
    // INVARIANT: tenants hold no 0 byte; the slot has 4 bytes.
    let at = k.len().checked_sub(5)?;
    if k.first() != Some(&b'M') || k.get(at) != Some(&0) || at < 1 {
        return None;
    }
    let tenant = std::str::from_utf8(&k[1..at]).ok()?;
    let slot = u32::from_be_bytes(k[at + 1..].try_into().ok()?);
    (!tenant.contains('\0')).then_some((tenant, slot))
}

/// The tenant and customer of a format-3 `S tenant 0 ref` key.
fn split_legacy_slot_key(k: &[u8]) -> Option<(&str, CustomerRef)> {
    use crate::crypto::keys::CUSTOMER_REF_LEN;
    let at = k.len().checked_sub(CUSTOMER_REF_LEN + 1)?;
    if k.first() != Some(&b'S') || k.get(at) != Some(&0) || at < 1 {
        return None;
    }
    let tenant = std::str::from_utf8(&k[1..at]).ok()?;
    Some((tenant, CustomerRef::from_slice(&k[at + 1..])?))
}

/// Storage key format 3 to 4, in place. Format 3 kept `S tenant 0 ref` →
/// slot, `R tenant 0 slot` → ref and `P tenant 0 slot` → mark; format 4
/// keeps `M tenant 0 slot` → ref and mark, and the slot in the customer's
/// record set (`records`). Run at open, after the log's replay, before
/// anything reads the trees; the caller then records format 4 through the
/// same writer. Every change goes through the write-ahead log, so a view
/// restored from before the upgrade replays it in its place among the
/// writes before and after it. Idempotent, and the old keys go last,
/// slots before marks, so a crash half-way runs it again with nothing
/// lost. A slot whose customer has no record set (nothing left to pack) is
/// dropped, so no key names a customer the vault holds nothing of; one
/// whose set is damaged keeps its `M` (an erasure then finds it by scan).
/// Returns how many slots it kept.
pub(crate) fn upgrade_from_format_3(
    tree: &sled::Tree,
    records: &sled::Tree,
    writer: &Writer,
) -> Result<usize> {
    let mut marks: HashMap<(String, u32), Vec<u8>> = HashMap::new();
    for item in tree.scan_prefix(b"P") {
        let (k, v) = item?;
        let what = "a format-3 pending mark (`P` key)";
        let at = k.len().checked_sub(5).filter(|&at| at >= 1 && k[at] == 0);
        let at = at.ok_or_else(|| VaultError::integrity(what))?;
        let tenant = std::str::from_utf8(&k[1..at])
            .map_err(|_| VaultError::integrity(what))?
            .to_owned();
        let slot = u32_of(&k[at + 1..], "format-3 pending slot")?;
        if decode_mark(&v).is_none_or(|m| m.is_empty()) {
            return Err(VaultError::integrity(what));
        }
        marks.insert((tenant, slot), v.to_vec());
    }
    let mut kept = 0;
    let mut old = Vec::new();
    for item in tree.scan_prefix(b"S") {
        let (k, v) = item?;
        let what = "a format-3 feature slot (`S` key)";
        let (tenant, customer) =
            split_legacy_slot_key(&k).ok_or_else(|| VaultError::integrity(what))?;
        let slot = u32_of(&v, "format-3 slot")?;
        let rk = crate::store::record_key(tenant, &customer);
        old.push(k.clone());
        let Some(held) = records.get(&rk)? else {
            tracing::warn!(
                tenant,
                slot,
                "format-3 feature slot of a customer with no record set: dropped"
            );
            continue;
        };
        match crate::store::FieldSet::decode(&held) {
            None => tracing::warn!(
                tenant,
                slot,
                "the record set of the customer in a format-3 feature slot is damaged: the slot is kept, not recorded in the set"
            ),
            Some(set) => match set.slot() {
                None => {
                    writer.insert(records, &rk, set.with_slot(slot).encode_with(&[])?)?;
                }
                Some(s) if s == slot => {}
                Some(s) => {
                    return Err(VaultError::integrity(format!(
                        "format-3 feature slot {slot} of tenant `{tenant}`: its customer's record set names slot {s}"
                    )))
                }
            },
        }
        let mut value = customer.0.to_vec();
        if let Some(m) = marks.get(&(tenant.to_owned(), slot)) {
            value.extend_from_slice(m);
        }
        writer.insert(tree, mark_key(tenant, slot), value)?;
        kept += 1;
    }
    for tag in [b'R', b'P'] {
        for item in tree.scan_prefix([tag]) {
            old.push(item?.0);
        }
    }
    for k in old {
        writer.remove(tree, k)?;
    }
    Ok(kept)
}

/// Every customer of the tenant with a slot: (reference, slot), by slot.
fn slots(tree: &sled::Tree, tenant: &str) -> Result<Vec<(CustomerRef, u32)>> {
    let mut prefix = key(b'M', tenant, &[]);
    prefix.push(0);
    let mut out = Vec::new();
    for item in tree.scan_prefix(&prefix) {
        let (k, v) = item?;
        let (_, slot) = split_mark_key(&k).ok_or_else(bad_slot)?;
        let (customer, _) = decode_slot(&v).ok_or_else(bad_slot)?;
        out.push((customer, slot));
    }
    Ok(out)
}

/// The stored blocks of `feature`, by block number (None where no customer
/// of that block holds it), up to `blocks` blocks. Every block is checked
/// (conformant deserialisation) before it is returned.
fn column(
    tree: &sled::Tree,
    tenant: &str,
    feature: &str,
    blocks: usize,
) -> Result<Vec<Option<FeatureBlock>>> {
    let prefix = block_prefix(tenant, feature);
    let mut out: Vec<Option<FeatureBlock>> = vec![None; blocks];
    for item in tree.scan_prefix(&prefix) {
        let (k, v) = item?;
        let b = u32_of(&k[prefix.len()..], "block key")? as usize;
        if b >= blocks {
            continue;
        }
        let what = format!("block {b} of feature `{feature}`");
        out[b] = Some(
            FeatureBlock::from_bytes(&v, &what)
                .map_err(|e| VaultError::integrity(e.to_string()))?,
        );
    }
    Ok(out)
}

/// Quantised feature values of a write: (feature, value) for each feature
/// field among `values`.
pub(crate) fn quantised(
    values: &[(&crate::schema::FieldDef, crate::schema::FieldValue)],
) -> Vec<(String, i64)> {
    let mut out: BTreeMap<String, i64> = BTreeMap::new();
    for (def, v) in values {
        if let (Some(q), crate::schema::FieldValue::Integer(i)) = (&def.feature, v) {
            out.insert(def.name.clone(), q.quantise(*i));
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp_any() -> Stamp {
        next_stamp()
    }

    /// The feature trees and the records tree over a temporary database,
    /// and their writer.
    struct Trees {
        _dir: tempfile::TempDir,
        t: sled::Tree,
        tb: sled::Tree,
        records: sled::Tree,
        w: Writer,
    }

    fn trees() -> Trees {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("fhe_features").unwrap();
        let tb = db.open_tree("fhe_blocks").unwrap();
        let records = db.open_tree("records").unwrap();
        let wal = Arc::new(
            sovra_wal::Wal::open(&dir.path().join("wal"), sovra_wal::WalOptions::default())
                .unwrap()
                .wal,
        );
        Trees {
            _dir: dir,
            t,
            tb,
            records,
            w: Writer::new(db, wal),
        }
    }

    fn budget(slots: Vec<(u32, CustomerRef, Stamp, i64)>) -> Vec<PackFeature> {
        vec![PackFeature {
            feature: "budget".into(),
            slots,
        }]
    }

    fn store_over(x: &Trees) -> FeatureStore {
        FeatureStore::new(
            x.t.clone(),
            x.tb.clone(),
            x.w.clone(),
            Arc::new(KeyRing::new(crate::crypto::keys::RootKey::generate())),
        )
        .unwrap()
    }

    /// A write as the engine does it (the engine keeps the slot in the
    /// record set; here it is found by a scan): the slot, the transaction,
    /// the note. Returns the slot.
    fn write(store: &FeatureStore, x: &Trees, who: &CustomerRef, values: &[(String, i64)]) -> u32 {
        let slot = match store.find_slot("t", who).unwrap() {
            Some(s) => s,
            None => store.new_slot("t").unwrap(),
        };
        let stamp = next_stamp();
        x.w.transact([store.tree()], |[f]| put(f, "t", who, slot, stamp, values))
            .unwrap();
        store.note_pending("t", slot, who, stamp, values);
        slot
    }

    fn mark_of(t: &sled::Tree, slot: u32) -> Option<SlotValue> {
        t.get(mark_key("t", slot))
            .unwrap()
            .map(|v| decode_slot(&v).unwrap())
    }

    #[test]
    fn one_mark_per_slot_keeps_each_features_stamp_and_damage_is_refused() {
        let x = trees();
        let (t, tb, w) = (&x.t, &x.tb, &x.w);
        let secret = FheSecret::generate();
        let (alice, bob) = (CustomerRef([1; 16]), CustomerRef([2; 16]));
        let store = store_over(&x);
        // Two features in one write: one value (the customer and its mark).
        let slot = write(
            &store,
            &x,
            &alice,
            &[("budget".into(), 5), ("visits".into(), 2)],
        );
        assert_eq!(slot, 0);
        assert_eq!(t.scan_prefix(b"M").count(), 1);
        let (c, m) = mark_of(t, 0).unwrap();
        assert_eq!((c, m.len()), (alice, 2));
        let pending = store.pending(Some("t"));
        let names: Vec<&str> = pending.iter().map(|p| p.feature.as_str()).collect();
        assert_eq!(names, ["budget", "visits"]);
        assert!(pending.iter().all(|p| p.customer == alice && p.slot == 0));
        let noted: Vec<Option<i64>> = pending.iter().map(|p| p.value).collect();
        assert_eq!(noted, [Some(5), Some(2)]);
        assert!(store.pending(Some("other")).is_empty());
        let stamp_of = |feature: &str| {
            store
                .pending(Some("t"))
                .into_iter()
                .find(|p| p.feature == feature)
                .map(|p| p.stamp)
        };
        let (b1, v1) = (stamp_of("budget").unwrap(), stamp_of("visits").unwrap());
        // A later write of `visits` alone gives it a new stamp and keeps
        // `budget`'s.
        write(&store, &x, &alice, &[("visits".into(), 3)]);
        assert_eq!(stamp_of("budget").unwrap(), b1);
        assert_ne!(stamp_of("visits").unwrap(), v1);
        // Packing both with the first stamps clears `budget` only.
        let work = vec![
            PackFeature {
                feature: "budget".into(),
                slots: vec![(0, alice, b1, 5)],
            },
            PackFeature {
                feature: "visits".into(),
                slots: vec![(0, alice, v1, 2)],
            },
        ];
        let p = store.pack(&secret, "t", &work).unwrap();
        assert_eq!((p.cleared, p.failed.len()), (1, 0));
        let left: Vec<String> = store
            .pending(Some("t"))
            .into_iter()
            .map(|p| p.feature)
            .collect();
        assert_eq!(left, ["visits"]);
        // A damaged block stops its own feature only, and leaves its stamp.
        write(&store, &x, &alice, &[("budget".into(), 7)]);
        w.insert(tb, block_key("t", "visits", 0), b"garbage")
            .unwrap();
        let work: Vec<PackFeature> = store
            .pending(Some("t"))
            .into_iter()
            .map(|p| PackFeature {
                feature: p.feature,
                slots: vec![(0, alice, p.stamp, 7)],
            })
            .collect();
        let p = store.pack(&secret, "t", &work).unwrap();
        assert_eq!((p.cleared, p.failed.len()), (1, 1));
        let left: Vec<String> = store
            .pending(Some("t"))
            .into_iter()
            .map(|p| p.feature)
            .collect();
        assert_eq!(left, ["visits"]);
        assert_eq!(
            secret.decrypt_block(column(tb, "t", "budget", 1).unwrap()[0].as_ref().unwrap())[0],
            7
        );
        // The pending slots are found again by a store opened later, with
        // no value (the packer reads it back).
        let reopened = store_over(&x);
        let again: Vec<(String, Option<i64>)> = reopened
            .pending(None)
            .into_iter()
            .map(|p| (p.feature, p.value))
            .collect();
        assert_eq!(again, [("visits".to_owned(), None)]);
        // A slot another customer holds is refused by a write, left alone
        // by an erasure, and not taken for bob's by the erasure's lookup.
        let before = t.get(mark_key("t", 0)).unwrap();
        let block = tb.get(block_key("t", "budget", 0)).unwrap();
        let bobs = |f: &Tx<'_>| put(f, "t", &bob, 0, stamp_any(), &[("budget".into(), 1)]);
        assert!(w.transact([t], |[f]| bobs(f)).is_err());
        let gone = ["budget".to_owned()];
        w.transact([t, tb], |[f, fb]| {
            erase(f, fb, &secret, "t", &bob, 0, &gone)
        })
        .unwrap();
        assert_eq!(t.get(mark_key("t", 0)).unwrap(), before);
        assert_eq!(tb.get(block_key("t", "budget", 0)).unwrap(), block);
        assert_eq!(store.slot_of("t", &bob, Some(0)).unwrap(), None);
        assert_eq!(store.slot_of("t", &alice, Some(0)).unwrap(), Some(0));
        assert_eq!(store.slot_of("t", &alice, Some(7)).unwrap(), Some(7));
        assert_eq!(store.slot_of("t", &alice, None).unwrap(), Some(0));
        // A slot no reservation covers is refused.
        assert!(store.check_reserved("t", SLOT_BLOCK - 1).is_ok());
        let e = store
            .check_reserved("t", SLOT_BLOCK)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only slots below 256"), "{e}");
        // A damaged slot value is refused: by a packing, by a write, by the
        // cohort's scan and at open.
        w.insert(t, mark_key("t", 0), b"short").unwrap();
        let work = budget(vec![(0, alice, stamp_any(), 1)]);
        assert!(store.pack(&secret, "t", &work).is_err());
        assert!(w
            .transact([t], |[f]| put(
                f,
                "t",
                &alice,
                0,
                stamp_any(),
                &[("budget".into(), 1)]
            ))
            .is_err());
        assert!(store.slots("t").is_err());
        // ...but not an erasure's lookup, which takes the named slot.
        assert_eq!(store.slot_of("t", &alice, Some(0)).unwrap(), Some(0));
        assert_eq!(store.find_slot("t", &alice).unwrap(), None);
        assert!(FeatureStore::new(
            t.clone(),
            tb.clone(),
            w.clone(),
            Arc::new(KeyRing::new(crate::crypto::keys::RootKey::generate())),
        )
        .is_err());
        for bad in [
            &b"budget"[..],
            b"\0stampstm",
            b"b\0short",
            b"b\0stamp_01a\0stamp_02",
        ] {
            assert!(decode_mark(bad).is_none(), "{bad:?}");
        }
        for bad in [&b""[..], &[1; 15], &[[1; 16].as_slice(), b"x"].concat()] {
            assert!(decode_slot(bad).is_none(), "{bad:?}");
        }
        assert_eq!(
            decode_slot(&[7; 16]).unwrap(),
            (CustomerRef([7; 16]), BTreeMap::new())
        );
        for bad in [&b"M"[..], b"Mt\0\0\0\0", b"Mt\x01\0\0\0\0", b"St\0\0\0\0\0"] {
            assert!(split_mark_key(bad).is_none(), "{bad:?}");
        }
        assert_eq!(split_mark_key(&mark_key("t", 9)), Some(("t", 9)));
    }

    #[test]
    fn slots_come_from_logged_reservations_and_are_never_handed_out_twice() {
        let x = trees();
        let (t, w) = (&x.t, &x.w);
        let store = store_over(&x);
        let who = |i: u8| CustomerRef([i; 16]);
        for i in 0..3 {
            assert_eq!(
                write(&store, &x, &who(i), &[("budget".into(), 1)]),
                u32::from(i)
            );
        }
        // One reservation for the three.
        assert_eq!(
            t.get(next_key("t")).unwrap().unwrap().as_ref(),
            SLOT_BLOCK.to_be_bytes()
        );
        // A slot handed out to a write that failed stays unused.
        assert_eq!(store.new_slot("t").unwrap(), 3);
        // A store opened later (a restart) starts after the reservation.
        let later = store_over(&x);
        assert_eq!(later.new_slot("t").unwrap(), SLOT_BLOCK);
        assert_eq!(
            later.slots("t").unwrap(),
            vec![(who(0), 0), (who(1), 1), (who(2), 2)]
        );
        assert_eq!(later.find_slot("t", &who(2)).unwrap(), Some(2));
        assert_eq!(later.find_slot("t", &who(9)).unwrap(), None);
        // A damaged reservation is refused.
        w.insert(t, next_key("u"), b"xx").unwrap();
        assert!(later.new_slot("u").is_err());
    }

    #[test]
    fn memory_forgets_what_the_tree_no_longer_holds_and_keeps_later_writes() {
        let x = trees();
        let (t, tb, w) = (&x.t, &x.tb, &x.w);
        let secret = FheSecret::generate();
        let store = store_over(&x);
        let (alice, bob) = (CustomerRef([1; 16]), CustomerRef([2; 16]));
        write(&store, &x, &alice, &[("budget".into(), 5)]);
        let first = store.pending(None)[0].stamp;
        // A write after the packer's look: its stamp is kept, in the tree
        // and in memory; the packing clears nothing, writes nothing (an
        // older value never overwrites a newer one), and says it raced.
        write(&store, &x, &alice, &[("budget".into(), 6)]);
        let work = budget(vec![(0, alice, first, 5)]);
        let p = store.pack(&secret, "t", &work).unwrap();
        assert_eq!((p.cleared, p.raced), (0, 1));
        assert!(tb.get(block_key("t", "budget", 0)).unwrap().is_none());
        let p = store.pending(None);
        assert_eq!((p.len(), p[0].value), (1, Some(6)));
        assert!(!mark_of(t, 0).unwrap().1.is_empty());
        // Packing the latest clears it in both.
        let work = budget(vec![(0, alice, p[0].stamp, 6)]);
        assert_eq!(store.pack(&secret, "t", &work).unwrap().cleared, 1);
        assert!(store.pending(None).is_empty());
        assert!(store.marked.lock().unwrap().is_empty());
        assert!(mark_of(t, 0).unwrap().1.is_empty());
        let col = column(tb, "t", "budget", 1).unwrap();
        assert_eq!(secret.decrypt_block(col[0].as_ref().unwrap())[0], 6);
        // An erased customer's pending slot is forgotten by the next
        // packing, which writes nothing for it.
        let slot = write(&store, &x, &bob, &[("budget".into(), 9)]);
        w.transact([t, tb], |[f, fb]| {
            erase(f, fb, &secret, "t", &bob, slot, &["budget".to_owned()])
        })
        .unwrap();
        let p = store.pending(None);
        assert_eq!(p.len(), 1);
        let work = budget(vec![(slot, bob, p[0].stamp, 9)]);
        assert_eq!(store.pack(&secret, "t", &work).unwrap().cleared, 0);
        assert!(store.pending(None).is_empty());
        let col = column(tb, "t", "budget", 1).unwrap();
        assert_eq!(secret.decrypt_block(col[0].as_ref().unwrap())[1], 0);
    }

    #[test]
    fn format_3_slots_move_into_record_sets_and_keep_their_marks() {
        let x = trees();
        let (t, w) = (&x.t, &x.w);
        let (alice, bob, carol) = (
            CustomerRef([1; 16]),
            CustomerRef([2; 16]),
            CustomerRef([3; 16]),
        );
        let mark = encode_mark(
            &[("budget".to_owned(), [7; STAMP_LEN])]
                .into_iter()
                .collect(),
        );
        // Format 3: slots, reverse links, one mark (bob's is packed); alice
        // and bob have record sets, carol's is lost.
        w.insert(t, next_key("t"), 3u32.to_be_bytes()).unwrap();
        for (who, slot) in [(alice, 0u32), (bob, 1), (carol, 2)] {
            w.insert(t, legacy_slot_key("t", &who), slot.to_be_bytes())
                .unwrap();
            w.insert(t, legacy_key(b'R', "t", slot), &who.0[..])
                .unwrap();
        }
        w.insert(t, legacy_key(b'P', "t", 0), mark.as_slice())
            .unwrap();
        for who in [alice, bob] {
            let set = crate::store::FieldSet::default()
                .encode_with(&[("budget", b"sealed")])
                .unwrap();
            w.insert(&x.records, crate::store::record_key("t", &who), set)
                .unwrap();
        }
        assert_eq!(upgrade_from_format_3(t, &x.records, w).unwrap(), 2);
        // Idempotent: a second run (after a crash) changes nothing.
        assert_eq!(upgrade_from_format_3(t, &x.records, w).unwrap(), 0);
        let keys: Vec<u8> = t.iter().map(|i| i.unwrap().0[0]).collect();
        // carol, with no record set, has no slot left: nothing names her.
        assert_eq!(keys, b"MMN");
        assert!(t
            .iter()
            .all(|i| !i.unwrap().1.windows(16).any(|w| w == carol.0)));
        assert_eq!(
            mark_of(t, 0).unwrap(),
            (alice, decode_mark(&mark).unwrap().into_iter().collect())
        );
        assert_eq!(mark_of(t, 1).unwrap(), (bob, BTreeMap::new()));
        for (who, slot) in [(alice, 0), (bob, 1)] {
            let held = x
                .records
                .get(crate::store::record_key("t", &who))
                .unwrap()
                .unwrap();
            let set = crate::store::FieldSet::decode(&held).unwrap();
            assert_eq!(
                (set.slot(), set.get("budget")),
                (Some(slot), Some(&b"sealed"[..]))
            );
        }
        let store = store_over(&x);
        let p = store.pending(None);
        assert_eq!((p.len(), p[0].customer, p[0].slot), (1, alice, 0));
        assert_eq!(store.new_slot("t").unwrap(), 3);
        // A damaged format-3 key, or a record set naming another slot, is
        // refused, naming it.
        w.insert(t, legacy_key(b'P', "t", 1), b"junk").unwrap();
        let e = upgrade_from_format_3(t, &x.records, w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("format-3 pending mark"), "{e}");
        t.remove(legacy_key(b'P', "t", 1)).unwrap();
        w.insert(t, legacy_slot_key("t", &alice), 5u32.to_be_bytes())
            .unwrap();
        let e = upgrade_from_format_3(t, &x.records, w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names slot 0"), "{e}");
    }

    #[test]
    fn erasure_zeroes_the_slot_in_a_fresh_encryption_and_removes_the_links() {
        let x = trees();
        let (t, tb, w) = (&x.t, &x.tb, &x.w);
        let secret = FheSecret::generate();
        let features = vec!["budget".to_owned()];
        let (alice, bob) = (CustomerRef([1; 16]), CustomerRef([2; 16]));
        let store = store_over(&x);
        write(&store, &x, &alice, &[("budget".into(), 5)]);
        write(&store, &x, &bob, &[("budget".into(), 9)]);
        // A write marks its slot pending and does no TFHE work; packing
        // folds the values in and clears the marks it saw.
        assert!(tb.get(block_key("t", "budget", 0)).unwrap().is_none());
        let stamp = |slot: u32| {
            let m = mark_of(t, slot).unwrap().1;
            assert_eq!(m.len(), 1);
            m["budget"]
        };
        let packed = budget(vec![(0, alice, stamp(0), 5), (1, bob, *b"stale-01", 9)]);
        let removed = store.pack(&secret, "t", &packed).unwrap();
        assert_eq!(removed.cleared, 1, "a mark whose stamp changed stays");
        assert_eq!(removed.raced, 1);
        assert!(mark_of(t, 0).unwrap().1.is_empty());
        assert!(!mark_of(t, 1).unwrap().1.is_empty());
        let col = column(tb, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!(
            (v[0], v[1]),
            (5, 0),
            "a value read with another stamp is not folded in"
        );
        let packed = budget(vec![(1, bob, stamp(1), 9)]);
        assert_eq!(store.pack(&secret, "t", &packed).unwrap().cleared, 1);
        let col = column(tb, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (5, 9));
        let before = tb.get(block_key("t", "budget", 0)).unwrap().unwrap();

        w.transact([t, tb], |[f, fb]| {
            erase(f, fb, &secret, "t", &alice, 0, &features)
        })
        .unwrap();
        let after = tb.get(block_key("t", "budget", 0)).unwrap().unwrap();
        // A fresh encryption: no byte of the body is kept.
        let same = before
            .iter()
            .zip(after.iter())
            .skip(64)
            .filter(|(a, b)| a == b)
            .count();
        assert!(same < 512, "{same} bytes unchanged");
        let col = column(tb, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (0, 9));
        assert_eq!(store.find_slot("t", &alice).unwrap(), None);
        assert_eq!(store.slots("t").unwrap(), vec![(bob, 1)]);
        assert!(mark_of(t, 0).is_none());
        // A packing that read the erased customer's value writes nothing
        // back for it: its slot is gone.
        let late = budget(vec![(0, alice, stamp_any(), 5)]);
        store.pack(&secret, "t", &late).unwrap();
        let col = column(tb, "t", "budget", 1).unwrap();
        assert_eq!(secret.decrypt_block(col[0].as_ref().unwrap())[0], 0);
        for item in t.iter() {
            let (k, v) = item.unwrap();
            assert!(!k.windows(16).any(|w| w == alice.0));
            assert!(!v.windows(16).any(|w| w == alice.0));
        }
    }
}
