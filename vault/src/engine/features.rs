//! Encrypted model features: each feature field of each customer, quantised
//! as the schema says, also kept packed in TFHE blocks for the sandbox.
//!
//! [`FeatureStore`] owns the `fhe_features` tree and the tenants' TFHE keys
//! (wrapped in that tree, cached in memory with their bootstrap keys); the
//! engine holds it. The writes that must agree with a field ([`put`],
//! [`erase`]) run inside the engine's transaction over that tree.
//!
//! Guarantees: a customer gets one slot per tenant (block = slot / 2048,
//! coefficient = slot % 2048) the first time one of its feature fields is
//! written. The write itself does no TFHE work: in its transaction it marks
//! each written feature of the slot *pending* (a stamp; no value), and the
//! packer ([`pack`], run in the background and by every job before it reads
//! a block) folds the current sealed values of pending slots into their
//! blocks, one fresh encryption per block and feature whatever the number
//! of writes; a damaged block stops only its own feature. A pending mark is removed only by a packing that saw its
//! stamp, so a write racing a packing is packed again, and a job never
//! misses an acknowledged write. A mark is durable with the field, so a
//! crash loses no packing work. Erasure zeroes the customer's slot
//! in every block, re-encrypting each block freshly, and removes the
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
//! Key layout in the `fhe_features` tree (`0` is a zero byte):
//! `K tenant` wrapped secret key; `N tenant` next slot; `S tenant 0
//! ref` slot; `R tenant 0 slot` ref (the customer's [`CustomerRef`]);
//! `P tenant 0 feature 0 slot` pending stamp; `B tenant 0 feature 0 block` block.

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
fn pending_key(tenant: &str, feature: &str, slot: u32) -> Vec<u8> {
    key(b'P', tenant, &[feature.as_bytes(), &slot.to_be_bytes()])
}

/// Stamps of pending marks: unique within the process (seeded with the
/// time, so marks left by an earlier process differ too).
static STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_stamp() -> [u8; 8] {
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

/// The `fhe_features` tree and the tenants' TFHE keys.
pub(crate) struct FeatureStore {
    tree: sled::Tree,
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
    pub(crate) fn new(tree: sled::Tree, writer: Writer, keyring: Arc<KeyRing>) -> Self {
        Self {
            tree,
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
        let secret = match self.tree.get(&key)? {
            Some(w) => FheSecret::unwrap(keyring, tenant, &w)?,
            None => {
                let fresh = FheSecret::generate();
                let wrapped = fresh.wrap(keyring, tenant)?;
                // Two first writers race: the first stored key wins, the
                // other is dropped (and zeroed) unused.
                match self.writer.insert_if_absent(&self.tree, &key, &wrapped)? {
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

    /// Every pending mark, of `tenant` or of every tenant: (tenant,
    /// feature, slot, stamp).
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
            // INVARIANT: tenants and feature names hold no 0 byte; the slot
            // is the last 4 bytes.
            let body = k.get(1..k.len().saturating_sub(5)).ok_or_else(bad)?;
            let pos = body.iter().position(|&b| b == 0).ok_or_else(bad)?;
            let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_owned).map_err(|_| bad());
            out.push(Pending {
                tenant: text(&body[..pos])?,
                feature: text(&body[pos + 1..])?,
                slot: u32_of(&k[k.len() - 4..], "pending slot")?,
                stamp: v.to_vec(),
            });
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
        feature: &str,
        slots: &[(u32, Vec<u8>, i64)],
    ) -> Result<usize> {
        self.writer.transact([&self.tree], |[f]| {
            pack_block(f, secret, tenant, feature, slots)
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
        column(&self.tree, tenant, feature, blocks)
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

/// One packing transaction (see [`FeatureStore::pack`]); every slot is in
/// the same block.
fn pack_block(
    f: &Tx<'_>,
    secret: &FheSecret,
    tenant: &str,
    feature: &str,
    slots: &[(u32, Vec<u8>, i64)],
) -> TxResult<usize> {
    let Some(block) = slots.first().map(|s| s.0 / SLOTS as u32) else {
        return Ok(0);
    };
    let mut live = Vec::with_capacity(slots.len());
    let mut removed = 0;
    for (slot, stamp, value) in slots {
        let pk = pending_key(tenant, feature, *slot);
        let Some(cur) = f.get(&pk)? else {
            continue;
        };
        if cur.as_ref() == stamp.as_slice() {
            f.remove(pk)?;
            removed += 1;
        }
        live.push((*slot, *value));
    }
    if live.is_empty() {
        return Ok(0);
    }
    set_slots(f, secret, tenant, feature, block, &live)?;
    Ok(removed)
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
    let stamp = next_stamp();
    for (feature, _) in values {
        f.insert(pending_key(tenant, feature, slot), &stamp[..])?;
    }
    Ok(())
}

/// In the erasure's transaction: zeroes the customer's slot in every
/// feature block that exists and removes its slot links.
pub(crate) fn erase(
    f: &Tx<'_>,
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
        if f.get(block_key(tenant, feature, slot / SLOTS as u32))?
            .is_some()
        {
            rewrite(f, secret, tenant, feature, slot, 0)?;
        }
    }
    f.remove(sk)?;
    f.remove(reverse_key(tenant, slot))?;
    for feature in features {
        f.remove(pending_key(tenant, feature, slot))?;
    }
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

    #[test]
    fn erasure_zeroes_the_slot_in_a_fresh_encryption_and_removes_the_links() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("fhe_features").unwrap();
        let wal = Arc::new(
            sovra_wal::Wal::open(&dir.path().join("wal"), sovra_wal::WalOptions::default())
                .unwrap()
                .wal,
        );
        let w = Writer::new(db.clone(), wal);
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
        assert!(t.get(block_key("t", "budget", 0)).unwrap().is_none());
        let stamp = |slot: u32| {
            t.get(pending_key("t", "budget", slot))
                .unwrap()
                .unwrap()
                .to_vec()
        };
        let packed = vec![(0, stamp(0), 5), (1, b"stale".to_vec(), 9)];
        let removed = w
            .transact([&t], |[f]| pack_block(f, &secret, "t", "budget", &packed))
            .unwrap();
        assert_eq!(removed, 1, "a mark whose stamp changed stays");
        assert!(t.get(pending_key("t", "budget", 0)).unwrap().is_none());
        assert!(t.get(pending_key("t", "budget", 1)).unwrap().is_some());
        let col = column(&t, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (5, 9));
        let before = t.get(block_key("t", "budget", 0)).unwrap().unwrap();

        w.transact([&t], |[f]| erase(f, &secret, "t", &alice, &features))
            .unwrap();
        let after = t.get(block_key("t", "budget", 0)).unwrap().unwrap();
        // A fresh encryption: no byte of the body is kept.
        let same = before
            .iter()
            .zip(after.iter())
            .skip(64)
            .filter(|(a, b)| a == b)
            .count();
        assert!(same < 512, "{same} bytes unchanged");
        let col = column(&t, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (0, 9));
        assert_eq!(slot_of(&t, "t", &alice).unwrap(), None);
        assert_eq!(slots(&t, "t").unwrap(), vec![(bob, 1)]);
        assert!(t.get(pending_key("t", "budget", 0)).unwrap().is_none());
        // A packing that read the erased customer's value writes nothing
        // back for it: its mark is gone.
        let late = vec![(0, stamp_any(), 5)];
        w.transact([&t], |[f]| pack_block(f, &secret, "t", "budget", &late))
            .unwrap();
        let col = column(&t, "t", "budget", 1).unwrap();
        assert_eq!(secret.decrypt_block(col[0].as_ref().unwrap())[0], 0);
        for item in t.iter() {
            let (k, v) = item.unwrap();
            assert!(!k.windows(16).any(|w| w == alice.0));
            assert!(!v.windows(16).any(|w| w == alice.0));
        }
        // Erasing a customer without features changes nothing.
        w.transact([&t], |[f]| erase(f, &secret, "t", &carol, &features))
            .unwrap();
    }
}
