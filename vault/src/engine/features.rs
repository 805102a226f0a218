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
//! written. The write itself does no TFHE work: in its transaction it marks
//! each written feature of the slot *pending* (a stamp per feature, all in
//! the slot's one mark; no value), and the packer ([`pack`], run in the
//! background and by every job before it reads a block) folds the current
//! sealed values of pending slots into their blocks, one transaction per
//! block holding one fresh encryption per feature whatever the number of
//! writes; a damaged block stops only its own feature. A feature's stamp is
//! removed from a mark only by a packing that saw it, so a write racing a
//! packing is packed again, and a job never misses an acknowledged write.
//! A mark is durable with the field, so a crash loses no packing work.
//! Erasure zeroes the customer's slot in every block, re-encrypting each block freshly, and removes the
//! customer ↔ slot links in the erasure's transaction. At rest a block is
//! the whole GLWE ciphertext, 2 × 2048 × 8 bytes plus framing (about 16
//! bytes per value). Blocks read back are checked by tfhe's conformant
//! deserialisation before any use.
//!
//! Does not: reuse an erased customer's slot (it stays 0 and out of every
//! cohort), or remove copies of old blocks that sled keeps in log segments
//! it has not compacted yet (the TFHE key is tenant-wide, so these are not
//! crypto-shredded; see SECURITY.md).
//!
//! Key layout (`0` is a zero byte). The `fhe_features` tree holds the small
//! keys every write updates: `N tenant` next slot; `S tenant 0 ref` slot;
//! `R tenant 0 slot` ref (the customer's [`CustomerRef`]); `P tenant 0
//! slot` pending mark (per feature, in name order: the name, a zero byte
//! and an 8-byte stamp). The `fhe_blocks` tree holds the large values:
//! `K tenant` wrapped secret key; `B tenant 0 feature 0 block` block. They
//! are apart because sled rewrites a whole node when it consolidates one:
//! with a block or a key in the same node, every slot or mark update wrote
//! tens of kilobytes (a sled blob file each time).

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
fn slot_key(tenant: &str, customer: &CustomerRef) -> Vec<u8> {
    key(b'S', tenant, &[&customer.0])
}
fn reverse_key(tenant: &str, slot: u32) -> Vec<u8> {
    key(b'R', tenant, &[&slot.to_be_bytes()])
}
fn pending_key(tenant: &str, slot: u32) -> Vec<u8> {
    key(b'P', tenant, &[&slot.to_be_bytes()])
}

/// Length of a pending stamp.
const STAMP_LEN: usize = 8;

/// A slot's pending mark: (feature, stamp) in strictly increasing feature
/// order. `None` if `b` is not a well-formed mark.
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
    (!out.is_empty()).then_some(out)
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

/// The mark stored at `k` in a transaction, as a map; damage aborts.
fn read_mark(f: &Tx<'_>, k: &[u8]) -> TxResult<BTreeMap<String, [u8; STAMP_LEN]>> {
    match f.get(k)? {
        None => Ok(BTreeMap::new()),
        Some(b) => match decode_mark(&b) {
            Some(m) => Ok(m.into_iter().collect()),
            None => abort(VaultError::integrity("an encrypted-feature pending mark")),
        },
    }
}

/// Stamps of pending marks: unique within the process (seeded with the
/// time, so marks left by an earlier process differ too).
static STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_stamp() -> [u8; STAMP_LEN] {
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
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FeatureStore")
    }
}

impl FeatureStore {
    /// The store over `tree` (the `fhe_features` tree), wrapping keys with
    /// `keyring`.
    pub(crate) fn new(
        tree: sled::Tree,
        blocks: sled::Tree,
        writer: Writer,
        keyring: Arc<KeyRing>,
    ) -> Self {
        Self {
            tree,
            blocks,
            writer,
            keyring,
            secrets: RwLock::new(HashMap::new()),
            bootstrap: Mutex::new(HashMap::new()),
        }
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

    /// The slot of `customer`, if it has one.
    pub(crate) fn slot_of(&self, tenant: &str, customer: &CustomerRef) -> Result<Option<u32>> {
        slot_of(&self.tree, tenant, customer)
    }

    /// Every pending (feature, slot) of `tenant` or of every tenant:
    /// (tenant, feature, slot, stamp).
    pub(crate) fn pending(&self, tenant: Option<&str>) -> Result<Vec<Pending>> {
        let prefix = match tenant {
            Some(t) => {
                let mut p = key(b'P', t, &[]);
                p.push(0);
                p
            }
            None => vec![b'P'],
        };
        let bad = || VaultError::integrity("an encrypted-feature pending mark");
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            // INVARIANT: tenants hold no 0 byte; the key is `P tenant 0
            // slot` with a 4-byte slot.
            let tenant = k
                .get(1..k.len().saturating_sub(5))
                .filter(|t| k.get(k.len().saturating_sub(5)) == Some(&0) && !t.contains(&0))
                .ok_or_else(bad)?;
            let tenant = std::str::from_utf8(tenant).map_err(|_| bad())?;
            let slot = u32_of(&k[k.len() - 4..], "pending slot")?;
            for (feature, stamp) in decode_mark(&v).ok_or_else(bad)? {
                out.push(Pending {
                    tenant: tenant.to_owned(),
                    feature,
                    slot,
                    stamp: stamp.to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// The customer in `slot`, if any.
    pub(crate) fn customer_at(&self, tenant: &str, slot: u32) -> Result<Option<CustomerRef>> {
        self.tree
            .get(reverse_key(tenant, slot))?
            .map(|v| {
                CustomerRef::from_slice(&v)
                    .ok_or_else(|| VaultError::integrity("encrypted-feature slot link"))
            })
            .transpose()
    }

    /// Folds `slots` of one block of `feature` into it, in one
    /// transaction: (slot, the stamp seen before its value was read, its
    /// quantised value). A slot whose mark is gone (erased, or packed by a
    /// concurrent packing) is left as it is; a mark is removed only if it
    /// still holds the stamp seen. Returns how many marks were removed.
    pub(crate) fn pack(
        &self,
        secret: &FheSecret,
        tenant: &str,
        features: &[PackFeature],
    ) -> Result<Packed> {
        self.writer.transact([&self.tree, &self.blocks], |[f, fb]| {
            pack_block(f, fb, secret, tenant, features)
        })
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
    pub(crate) stamp: Vec<u8>,
}

/// What a packing folds in for one feature of one block: (slot, stamp
/// read before the value, value).
#[derive(Debug)]
pub(crate) struct PackFeature {
    pub(crate) feature: String,
    pub(crate) slots: Vec<(u32, Vec<u8>, i64)>,
}

/// What one packing did: the (feature, slot) stamps it cleared, and the
/// features whose block failed (damaged), which it left pending.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    pub(crate) cleared: usize,
    pub(crate) failed: Vec<VaultError>,
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
    let mut marks: BTreeMap<u32, BTreeMap<String, [u8; STAMP_LEN]>> = BTreeMap::new();
    for pf in features {
        for (slot, _, _) in &pf.slots {
            if !marks.contains_key(slot) {
                marks.insert(*slot, read_mark(f, &pending_key(tenant, *slot))?);
            }
        }
    }
    let mut out = Packed::default();
    let mut changed: std::collections::BTreeSet<u32> = Default::default();
    for pf in features {
        let Some(block) = pf.slots.first().map(|s| s.0 / SLOTS as u32) else {
            continue;
        };
        // A slot no longer marked for the feature (erased, or packed by
        // another packing) is left as its block holds it.
        let live: Vec<(u32, i64)> = pf
            .slots
            .iter()
            .filter(|(slot, _, _)| marks.get(slot).is_some_and(|m| m.contains_key(&pf.feature)))
            .map(|(slot, _, v)| (*slot, *v))
            .collect();
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
        for (slot, stamp, _) in &pf.slots {
            let Some(m) = marks.get_mut(slot) else {
                continue;
            };
            if m.get(&pf.feature)
                .is_some_and(|s| s.as_slice() == stamp.as_slice())
            {
                m.remove(&pf.feature);
                changed.insert(*slot);
                out.cleared += 1;
            }
        }
    }
    for slot in changed {
        let k = pending_key(tenant, slot);
        match marks.get(&slot) {
            Some(m) if !m.is_empty() => f.insert(k, encode_mark(m))?,
            _ => f.remove(k)?,
        }
    }
    Ok(out)
}

/// In the write's transaction: gives `customer` a slot if it has none and
/// marks it pending (the packer folds the values in; see the module docs).
pub(crate) fn put(
    f: &Tx<'_>,
    tenant: &str,
    customer: &CustomerRef,
    values: &[(String, i64)],
) -> TxResult<()> {
    if values.is_empty() {
        return Ok(());
    }
    let sk = slot_key(tenant, customer);
    let slot = match f.get(&sk)? {
        Some(b) => match u32_of(&b, "slot") {
            Ok(s) => s,
            Err(e) => return abort(e),
        },
        None => {
            let nk = next_key(tenant);
            let next = match f.get(&nk)? {
                Some(b) => match u32_of(&b, "slot counter") {
                    Ok(s) => s,
                    Err(e) => return abort(e),
                },
                None => 0,
            };
            let Some(after) = next.checked_add(1) else {
                return abort(VaultError::storage(
                    "the tenant has used every feature slot",
                ));
            };
            f.insert(nk, after.to_be_bytes())?;
            f.insert(sk, next.to_be_bytes())?;
            f.insert(reverse_key(tenant, next), &customer.0[..])?;
            next
        }
    };
    // One mark per slot, so a write of many features is one insert.
    let stamp = next_stamp();
    let pk = pending_key(tenant, slot);
    let mut mark = read_mark(f, &pk)?;
    for (feature, _) in values {
        mark.insert(feature.clone(), stamp);
    }
    f.insert(pk, encode_mark(&mark))?;
    Ok(())
}

/// In the erasure's transaction: zeroes the customer's slot in every
/// feature block that exists and removes its slot links.
pub(crate) fn erase(
    f: &Tx<'_>,
    fb: &Tx<'_>,
    secret: &FheSecret,
    tenant: &str,
    customer: &CustomerRef,
    features: &[String],
) -> TxResult<()> {
    let sk = slot_key(tenant, customer);
    let Some(b) = f.get(&sk)? else {
        return Ok(());
    };
    let slot = match u32_of(&b, "slot") {
        Ok(s) => s,
        Err(e) => return abort(e),
    };
    for feature in features {
        if fb
            .get(block_key(tenant, feature, slot / SLOTS as u32))?
            .is_some()
        {
            rewrite(fb, secret, tenant, feature, slot, 0)?;
        }
    }
    f.remove(sk)?;
    f.remove(reverse_key(tenant, slot))?;
    f.remove(pending_key(tenant, slot))?;
    Ok(())
}

/// The slot of `customer`, if it has one.
fn slot_of(tree: &sled::Tree, tenant: &str, customer: &CustomerRef) -> Result<Option<u32>> {
    tree.get(slot_key(tenant, customer))?
        .map(|b| u32_of(&b, "slot"))
        .transpose()
}

/// Every customer of the tenant with a slot: (reference, slot), by slot.
fn slots(tree: &sled::Tree, tenant: &str) -> Result<Vec<(CustomerRef, u32)>> {
    let prefix = key(b'R', tenant, &[]);
    let mut prefix = prefix;
    prefix.push(0);
    let mut out = Vec::new();
    for item in tree.scan_prefix(&prefix) {
        let (k, v) = item?;
        let slot = u32_of(&k[prefix.len()..], "slot link")?;
        let customer = CustomerRef::from_slice(&v)
            .ok_or_else(|| VaultError::integrity("encrypted-feature slot link"))?;
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

    fn stamp_any() -> Vec<u8> {
        next_stamp().to_vec()
    }

    /// The two trees over a temporary database, and their writer.
    fn trees() -> (tempfile::TempDir, sled::Tree, sled::Tree, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("fhe_features").unwrap();
        let tb = db.open_tree("fhe_blocks").unwrap();
        let wal = Arc::new(
            sovra_wal::Wal::open(&dir.path().join("wal"), sovra_wal::WalOptions::default())
                .unwrap()
                .wal,
        );
        (dir, t, tb, Writer::new(db, wal))
    }

    fn budget(slots: Vec<(u32, Vec<u8>, i64)>) -> Vec<PackFeature> {
        vec![PackFeature {
            feature: "budget".into(),
            slots,
        }]
    }

    #[test]
    fn one_mark_per_slot_keeps_each_features_stamp_and_damage_is_refused() {
        let (_dir, t, tb, w) = trees();
        let secret = FheSecret::generate();
        let alice = CustomerRef([1; 16]);
        let store = FeatureStore::new(
            t.clone(),
            tb.clone(),
            w.clone(),
            Arc::new(KeyRing::new(crate::crypto::keys::RootKey::generate())),
        );
        // Two features in one write: one mark, one insert.
        w.transact([&t], |[f]| {
            put(
                f,
                "t",
                &alice,
                &[("budget".into(), 5), ("visits".into(), 2)],
            )
        })
        .unwrap();
        let marks: Vec<_> = t.scan_prefix(b"P").collect();
        assert_eq!(marks.len(), 1);
        let pending = store.pending(Some("t")).unwrap();
        let names: Vec<&str> = pending.iter().map(|p| p.feature.as_str()).collect();
        assert_eq!(names, ["budget", "visits"]);
        let stamp_of = |feature: &str| {
            store
                .pending(Some("t"))
                .unwrap()
                .into_iter()
                .find(|p| p.feature == feature)
                .map(|p| p.stamp)
        };
        let (b1, v1) = (stamp_of("budget").unwrap(), stamp_of("visits").unwrap());
        // A later write of `visits` alone gives it a new stamp and keeps
        // `budget`'s.
        w.transact([&t], |[f]| put(f, "t", &alice, &[("visits".into(), 3)]))
            .unwrap();
        assert_eq!(stamp_of("budget").unwrap(), b1);
        assert_ne!(stamp_of("visits").unwrap(), v1);
        // Packing both with the first stamps clears `budget` only.
        let work = vec![
            PackFeature {
                feature: "budget".into(),
                slots: vec![(0, b1, 5)],
            },
            PackFeature {
                feature: "visits".into(),
                slots: vec![(0, v1, 2)],
            },
        ];
        let p = w
            .transact([&t, &tb], |[f, fb]| pack_block(f, fb, &secret, "t", &work))
            .unwrap();
        assert_eq!((p.cleared, p.failed.len()), (1, 0));
        let left: Vec<String> = store
            .pending(Some("t"))
            .unwrap()
            .into_iter()
            .map(|p| p.feature)
            .collect();
        assert_eq!(left, ["visits"]);
        // A damaged block stops its own feature only, and leaves its stamp.
        w.transact([&t], |[f]| put(f, "t", &alice, &[("budget".into(), 7)]))
            .unwrap();
        w.insert(&tb, block_key("t", "visits", 0), b"garbage")
            .unwrap();
        let work: Vec<PackFeature> = store
            .pending(Some("t"))
            .unwrap()
            .into_iter()
            .map(|p| PackFeature {
                feature: p.feature,
                slots: vec![(0, p.stamp, 7)],
            })
            .collect();
        let p = w
            .transact([&t, &tb], |[f, fb]| pack_block(f, fb, &secret, "t", &work))
            .unwrap();
        assert_eq!((p.cleared, p.failed.len()), (1, 1));
        let left: Vec<String> = store
            .pending(Some("t"))
            .unwrap()
            .into_iter()
            .map(|p| p.feature)
            .collect();
        assert_eq!(left, ["visits"]);
        assert_eq!(
            secret.decrypt_block(column(&tb, "t", "budget", 1).unwrap()[0].as_ref().unwrap())[0],
            7
        );
        // A damaged mark is refused, by the scan and by a write.
        w.insert(&t, pending_key("t", 0), b"budget").unwrap();
        assert!(store.pending(Some("t")).is_err());
        assert!(w
            .transact([&t], |[f]| put(f, "t", &alice, &[("budget".into(), 1)]))
            .is_err());
        for bad in [
            &b""[..],
            b"budget",
            b"\0stampstm",
            b"b\0short",
            b"b\0stamp_01a\0stamp_02",
        ] {
            assert!(decode_mark(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn erasure_zeroes_the_slot_in_a_fresh_encryption_and_removes_the_links() {
        let (_dir, t, tb, w) = trees();
        let secret = FheSecret::generate();
        let features = vec!["budget".to_owned()];
        let (alice, bob, carol) = (
            CustomerRef([1; 16]),
            CustomerRef([2; 16]),
            CustomerRef([3; 16]),
        );
        w.transact([&t], |[f]| {
            put(f, "t", &alice, &[("budget".into(), 5)])?;
            put(f, "t", &bob, &[("budget".into(), 9)])
        })
        .unwrap();
        // A write marks its slot pending and does no TFHE work; packing
        // folds the values in and clears the marks it saw.
        assert!(tb.get(block_key("t", "budget", 0)).unwrap().is_none());
        let stamp = |slot: u32| {
            let m = decode_mark(&t.get(pending_key("t", slot)).unwrap().unwrap()).unwrap();
            assert_eq!(m.len(), 1);
            m[0].1.to_vec()
        };
        let packed = budget(vec![(0, stamp(0), 5), (1, b"stale".to_vec(), 9)]);
        let removed = w
            .transact([&t, &tb], |[f, fb]| {
                pack_block(f, fb, &secret, "t", &packed)
            })
            .unwrap();
        assert_eq!(removed.cleared, 1, "a mark whose stamp changed stays");
        assert!(t.get(pending_key("t", 0)).unwrap().is_none());
        assert!(t.get(pending_key("t", 1)).unwrap().is_some());
        let col = column(&tb, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (5, 9));
        let before = tb.get(block_key("t", "budget", 0)).unwrap().unwrap();

        w.transact([&t, &tb], |[f, fb]| {
            erase(f, fb, &secret, "t", &alice, &features)
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
        let col = column(&tb, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (0, 9));
        assert_eq!(slot_of(&t, "t", &alice).unwrap(), None);
        assert_eq!(slots(&t, "t").unwrap(), vec![(bob, 1)]);
        assert!(t.get(pending_key("t", 0)).unwrap().is_none());
        // A packing that read the erased customer's value writes nothing
        // back for it: its mark is gone.
        let late = budget(vec![(0, stamp_any(), 5)]);
        w.transact([&t, &tb], |[f, fb]| pack_block(f, fb, &secret, "t", &late))
            .unwrap();
        let col = column(&tb, "t", "budget", 1).unwrap();
        assert_eq!(secret.decrypt_block(col[0].as_ref().unwrap())[0], 0);
        for item in t.iter() {
            let (k, v) = item.unwrap();
            assert!(!k.windows(16).any(|w| w == alice.0));
            assert!(!v.windows(16).any(|w| w == alice.0));
        }
        // Erasing a customer without features changes nothing.
        w.transact([&t, &tb], |[f, fb]| {
            erase(f, fb, &secret, "t", &carol, &features)
        })
        .unwrap();
    }
}
