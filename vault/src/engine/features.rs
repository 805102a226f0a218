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
//! written; the slot's value in every feature block is written in the same
//! sled transaction as the field itself, so a field and its encrypted
//! feature never disagree after a crash; erasure zeroes the customer's slot
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
//! customer` slot; `R tenant 0 slot` customer; `B tenant 0 feature 0
//! block` block.

use crate::crypto::fhe::FheSecret;
use crate::crypto::keys::KeyRing;
use crate::error::{Result, VaultError};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
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
fn slot_key(tenant: &str, customer: &str) -> Vec<u8> {
    key(b'S', tenant, &[customer.as_bytes()])
}
fn reverse_key(tenant: &str, slot: u32) -> Vec<u8> {
    key(b'R', tenant, &[&slot.to_be_bytes()])
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
    pub(crate) fn new(tree: sled::Tree, keyring: Arc<KeyRing>) -> Self {
        Self {
            tree,
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
                match self
                    .tree
                    .compare_and_swap(&key, None as Option<&[u8]>, Some(wrapped))?
                {
                    Ok(()) => fresh,
                    Err(cas) => match cas.current {
                        Some(w) => FheSecret::unwrap(keyring, tenant, &w)?,
                        None => return Err(VaultError::storage("TFHE key creation raced")),
                    },
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
    pub(crate) fn slot_of(&self, tenant: &str, customer: &str) -> Result<Option<u32>> {
        slot_of(&self.tree, tenant, customer)
    }

    /// Every customer of the tenant with a slot: (customer, slot), by slot.
    pub(crate) fn slots(&self, tenant: &str) -> Result<Vec<(String, u32)>> {
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
    f: &TransactionalTree,
    secret: &FheSecret,
    tenant: &str,
    feature: &str,
    slot: u32,
    value: i64,
) -> TxResult<()> {
    let block = slot / SLOTS as u32;
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
    values[slot as usize % SLOTS] = value;
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

/// In the write's transaction: gives `customer` a slot if it has none and
/// writes each (feature, quantised value).
pub(crate) fn put(
    f: &TransactionalTree,
    secret: &FheSecret,
    tenant: &str,
    customer: &str,
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
            f.insert(nk, &after.to_be_bytes())?;
            f.insert(sk, &next.to_be_bytes())?;
            f.insert(reverse_key(tenant, next), customer.as_bytes())?;
            next
        }
    };
    for (feature, v) in values {
        rewrite(f, secret, tenant, feature, slot, *v)?;
    }
    Ok(())
}

/// In the erasure's transaction: zeroes the customer's slot in every
/// feature block that exists and removes its slot links.
pub(crate) fn erase(
    f: &TransactionalTree,
    secret: &FheSecret,
    tenant: &str,
    customer: &str,
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
    Ok(())
}

/// The slot of `customer`, if it has one.
fn slot_of(tree: &sled::Tree, tenant: &str, customer: &str) -> Result<Option<u32>> {
    tree.get(slot_key(tenant, customer))?
        .map(|b| u32_of(&b, "slot"))
        .transpose()
}

/// Every customer of the tenant with a slot: (customer, slot), by slot.
fn slots(tree: &sled::Tree, tenant: &str) -> Result<Vec<(String, u32)>> {
    let prefix = key(b'R', tenant, &[]);
    let mut prefix = prefix;
    prefix.push(0);
    let mut out = Vec::new();
    for item in tree.scan_prefix(&prefix) {
        let (k, v) = item?;
        let slot = u32_of(&k[prefix.len()..], "slot link")?;
        let customer = String::from_utf8(v.to_vec())
            .map_err(|_| VaultError::integrity("encrypted-feature slot link"))?;
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

    #[test]
    fn erasure_zeroes_the_slot_in_a_fresh_encryption_and_removes_the_links() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("fhe_features").unwrap();
        let secret = FheSecret::generate();
        let features = vec!["budget".to_owned()];
        t.transaction(|f| {
            put(f, &secret, "t", "alice", &[("budget".into(), 5)])?;
            put(f, &secret, "t", "bob", &[("budget".into(), 9)])
        })
        .unwrap();
        let col = column(&t, "t", "budget", 1).unwrap();
        let v = secret.decrypt_block(col[0].as_ref().unwrap());
        assert_eq!((v[0], v[1]), (5, 9));
        let before = t.get(block_key("t", "budget", 0)).unwrap().unwrap();

        t.transaction(|f| erase(f, &secret, "t", "alice", &features))
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
        assert_eq!(slot_of(&t, "t", "alice").unwrap(), None);
        assert_eq!(slots(&t, "t").unwrap(), vec![("bob".to_owned(), 1)]);
        for item in t.iter() {
            let (k, v) = item.unwrap();
            assert!(!k.windows(5).any(|w| w == b"alice"));
            assert!(!v.windows(5).any(|w| w == b"alice"));
        }
        // Erasing a customer without features changes nothing.
        t.transaction(|f| erase(f, &secret, "t", "carol", &features))
            .unwrap();
    }
}
