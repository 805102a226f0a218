//! Storage layout on sled, and group commit.
//!
//! One sled database per data directory, one tree per concern:
//! - `records`: `tenant 0 ref 0 field` → [`StoredField`] (sealed value)
//! - `data_keys`: `tenant 0 ref` → [`WrappedKey`](crate::crypto::keys::WrappedKey)
//!   (which holds the customer id, sealed under a key derived from the pad)
//! - `blind_index`: `tenant 0 field 0 token ref` → empty
//!
//! `ref` is the customer's [`CustomerRef`], a 16-byte keyed pseudonym of
//! the customer id: no key and no value holds a customer id in the clear.
//! - `meta`: `keystate 0 tenant` → tenant key state
//! - `lineage`: field lineage (see `lineage.rs` for its key spaces)
//! - `idempotency`: keyed hash of (tenant, principal, idempotency key) →
//!   [`IdempotencyRecord`], kept for [`IDEMPOTENCY_RETENTION_MS`]
//!
//! Beside it, `shred.slots` holds each customer's pad (see `shred.rs`).
//!
//! Guarantees: [`Store::commit`] returns only once every write made before
//! it was called is on disk (the shred slots fsynced, then the sled flush). Concurrent callers share
//! one flush (group commit), so durable writes cost one fsync per group, not
//! per write.
//!
//! Does not guarantee: that removed bytes are overwritten on disk. sled is
//! log-structured, so a removed wrapped key may survive in an old segment
//! until the segment is reused (SECURITY.md discusses what this means for
//! erasure).

use std::sync::{mpsc, Arc};
use std::thread;

use tokio::sync::oneshot;

use crate::crypto::keys::{CustomerRef, CUSTOMER_REF_LEN};
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

/// The sled database and its trees.
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) records: sled::Tree,
    pub(crate) data_keys: sled::Tree,
    pub(crate) index: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) lineage: sled::Tree,
    pub(crate) features: sled::Tree,
    pub(crate) idempotency: sled::Tree,
    pub(crate) slots: Arc<ShredSlots>,
    pub(crate) dir: std::path::PathBuf,
    committer: Option<mpsc::Sender<Waiter>>,
    commit_thread: Option<thread::JoinHandle<()>>,
}

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue ends the commit thread; joining it releases its
        // handle on the database, so the directory's lock is free once the
        // store is gone.
        self.committer.take();
        if let Some(t) = self.commit_thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| {
            VaultError::config(
                dir.display().to_string(),
                format!("cannot create the data directory: {e}"),
            )
        })?;
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
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
        let idempotency = db.open_tree("idempotency")?;
        // Opened after sled, whose lock keeps a second server out.
        let slots = Arc::new(ShredSlots::open(&dir.join("shred.slots"))?);
        let (committer, commit_thread) = spawn_committer(db.clone(), slots.clone())?;
        Ok(Store {
            db,
            records,
            data_keys,
            index,
            meta,
            lineage,
            features,
            idempotency,
            slots,
            dir: dir.to_path_buf(),
            committer: Some(committer),
            commit_thread: Some(commit_thread),
        })
    }

    /// Waits until everything written before the call is durable.
    pub async fn commit(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.committer
            .as_ref()
            .ok_or_else(|| VaultError::storage("the store is closing"))?
            .send(tx)
            .map_err(|_| VaultError::storage("the commit thread has stopped"))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(VaultError::storage(format!("flush failed: {e}"))),
            Err(_) => Err(VaultError::storage("the commit thread has stopped")),
        }
    }

    /// Flushes synchronously (for callers without an async runtime).
    pub fn flush(&self) -> Result<()> {
        self.slots.sync()?;
        self.db.flush()?;
        Ok(())
    }
}

/// The group-commit thread: it takes every waiter queued while the previous
/// flush ran, flushes once, and answers them all.
fn spawn_committer(
    db: sled::Db,
    slots: Arc<ShredSlots>,
) -> Result<(mpsc::Sender<Waiter>, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Waiter>();
    let handle = thread::Builder::new()
        .name("sovra-commit".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                // Pads first: a durable record must never reference a pad
                // that is not durable.
                let r = slots
                    .sync()
                    .map_err(|e| e.to_string())
                    .and_then(|()| db.flush().map(|_| ()).map_err(|e| e.to_string()));
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        })
        .map_err(|e| VaultError::storage(format!("cannot start the commit thread: {e}")))?;
    Ok((tx, handle))
}

/// `tenant 0 ref 0`: prefix of every record of a customer.
pub(crate) fn customer_prefix(tenant: &str, c: &CustomerRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + CUSTOMER_REF_LEN + 2);
    k.extend_from_slice(tenant.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&c.0);
    k.push(SEP);
    k
}

/// `tenant 0 ref 0 field`.
pub(crate) fn record_key(tenant: &str, c: &CustomerRef, field: &str) -> Vec<u8> {
    let mut k = customer_prefix(tenant, c);
    k.extend_from_slice(field.as_bytes());
    k
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
        let a = customer_prefix("t", &c1);
        assert!(!record_key("t", &c2, "x").starts_with(&a));
        assert!(record_key("t", &c1, "phone").starts_with(&a));
        assert!(index_entry("t", "phone", &[1; 32], &c1)
            .starts_with(&index_prefix("t", "phone", &[1; 32])));
        assert_eq!(
            split_data_key(&data_key_key("t", &c2)),
            Some(("t".to_owned(), c2))
        );
    }

    #[tokio::test]
    async fn commit_is_shared_by_concurrent_callers() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..32u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.records.insert(i.to_be_bytes(), &[1u8][..]).unwrap();
                s.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.records.len(), 32);
    }
}
