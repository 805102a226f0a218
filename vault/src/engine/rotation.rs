//! Tenant key versions, rotation and retirement: the [`KeyRotation`]
//! component, which owns every tenant's key state (kept in memory and
//! persisted in `meta` under `keystate 0 tenant`) and changes it over the
//! store, key ring and per-customer locks it is given. The engine holds it
//! and asks it which versions wrap and unwrap.
//!
//! Guarantees:
//! - After [`KeyRotation::rotate`] returns, every new data key is wrapped
//!   under the new version. A background job re-wraps every existing data key
//!   to it, never touching field ciphertexts (the data keys themselves do not
//!   change). The job persists its cursor after every batch, so a restart
//!   resumes where it stopped ([`KeyRotation::resume`]).
//! - Reads keep working during the job: any version at or above the minimum
//!   decryption version unwraps.
//! - After [`KeyRotation::retire`], data keys wrapped under a version below
//!   the new minimum are refused with an explicit error naming both versions.
//! - Rotations and retirements run one at a time, each with its ledger entry
//!   durable before the change (write-ahead).
//!
//! Does not guarantee: that old KEK versions become underivable. They derive
//! from the root key; retirement is a policy enforced by the vault, and
//! re-keying the root is a separate (offline) operation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use prost::Message;

use super::locks::CustomerLocks;
use crate::clock::now_ms;
use crate::crypto::keys::{Kek, KeyPlace, KeyRing, WrappedKey};
use crate::error::{Result, VaultError};
use crate::store::{self, Store};

/// Data keys re-wrapped per batch (one cursor write and flush per batch).
const BATCH: usize = 512;

/// Progress of a rotation job.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RotationJob {
    /// Version being rotated to.
    #[prost(uint32, tag = "1")]
    pub target_version: u32,
    /// Data keys processed.
    #[prost(uint64, tag = "2")]
    pub rewrapped: u64,
    /// Data keys present when the job started.
    #[prost(uint64, tag = "3")]
    pub total: u64,
    /// Whether the job finished.
    #[prost(bool, tag = "4")]
    pub done: bool,
    /// Start time.
    #[prost(int64, tag = "5")]
    pub started_at_ms: i64,
    /// End time (0 while running).
    #[prost(int64, tag = "6")]
    pub finished_at_ms: i64,
    /// Last data-key entry processed (resume point).
    #[prost(bytes = "vec", tag = "7")]
    pub cursor: Vec<u8>,
}

/// A tenant's key state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyState {
    /// Version used for new wraps.
    #[prost(uint32, tag = "1")]
    pub active_version: u32,
    /// Lowest version accepted for unwrapping.
    #[prost(uint32, tag = "2")]
    pub min_version: u32,
    /// The latest rotation job.
    #[prost(message, optional, tag = "3")]
    pub job: Option<RotationJob>,
}

impl KeyState {
    fn initial() -> Self {
        KeyState {
            active_version: 1,
            min_version: 1,
            job: None,
        }
    }
}

/// The key state of every tenant, cached in memory and persisted in `meta`.
struct KeyStates {
    map: RwLock<HashMap<String, KeyState>>,
    // Serialises state changes (rotate, retire, job progress); they are rare,
    // so one lock for all tenants is enough.
    change: std::sync::Mutex<()>,
    // Serialises rotations and retirements across their ledger write,
    // which is awaited and so cannot be under `change`.
    ordered: tokio::sync::Mutex<()>,
}

impl KeyStates {
    fn load(store: &Store) -> Result<KeyStates> {
        let mut map = HashMap::new();
        for item in store.meta.scan_prefix(b"keystate\0") {
            let (k, v) = item?;
            let tenant = String::from_utf8(k[b"keystate\0".len()..].to_vec())
                .map_err(|_| VaultError::integrity("a tenant key state"))?;
            let st = KeyState::decode(&v[..]).map_err(|_| {
                VaultError::integrity(format!("the key state of tenant `{tenant}`"))
            })?;
            map.insert(tenant, st);
        }
        Ok(KeyStates {
            map: RwLock::new(map),
            change: std::sync::Mutex::new(()),
            ordered: tokio::sync::Mutex::new(()),
        })
    }

    /// The tenant's state (the initial state if it has none yet).
    fn get(&self, tenant: &str) -> KeyState {
        self.map
            .read()
            .ok()
            .and_then(|m| m.get(tenant).cloned())
            .unwrap_or_else(KeyState::initial)
    }

    fn set(&self, store: &Store, tenant: &str, st: KeyState) -> Result<()> {
        store
            .writer
            .insert(&store.meta, store::keystate_key(tenant), st.encode_to_vec())?;
        if let Ok(mut m) = self.map.write() {
            m.insert(tenant.to_owned(), st);
        }
        Ok(())
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unfinished(&self) -> Vec<String> {
        self.map
            .read()
            .map(|m| {
                m.iter()
                    .filter(|(_, s)| s.job.as_ref().is_some_and(|j| !j.done))
                    .map(|(t, _)| t.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A tenant's key status, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    /// The tenant's state.
    pub state: KeyState,
    /// Data keys per wrapping version.
    pub by_version: BTreeMap<u32, u64>,
}

/// Tenant key rotation and retirement over the vault's data keys.
pub struct KeyRotation {
    store: Arc<Store>,
    keyring: Arc<KeyRing>,
    locks: Arc<CustomerLocks>,
    states: KeyStates,
}

impl std::fmt::Debug for KeyRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRotation")
    }
}

impl KeyRotation {
    /// Loads every tenant's key state from `store`. `locks` must be the
    /// engine's: a re-wrap holds the customer's lock, so it never races a
    /// write or an erasure of that customer.
    pub(crate) fn load(
        store: Arc<Store>,
        keyring: Arc<KeyRing>,
        locks: Arc<CustomerLocks>,
    ) -> Result<KeyRotation> {
        let states = KeyStates::load(&store)?;
        Ok(KeyRotation {
            store,
            keyring,
            locks,
            states,
        })
    }

    /// The tenant's key state (the initial one if it never changed).
    pub fn state(&self, tenant: &str) -> KeyState {
        self.states.get(tenant)
    }

    /// Starts a rotation: the next version becomes active at once and a
    /// re-wrap job is recorded. Run the job with [`KeyRotation::run`] (the
    /// server spawns it). Durable when this returns.
    ///
    /// `audit(from, to)` runs once the new version is decided and before
    /// anything is stored; the server makes the ledger entry durable there.
    /// If it fails, nothing changes.
    // INVARIANT: write-ahead. A rotation in effect always has its durable
    // ledger entry; a crash after the entry and before the state is stored
    // leaves an entry for a rotation that did not happen (GetKeyStatus
    // shows the version in force), never the reverse.
    pub async fn rotate<F, Fut>(&self, tenant: &str, audit: F) -> Result<KeyState>
    where
        F: FnOnce(u32, u32) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let _ordered = self.states.ordered.lock().await;
        let (from, to, total) = {
            let _g = self.states.guard();
            let st = self.states.get(tenant);
            if let Some(j) = st.job.as_ref().filter(|j| !j.done) {
                return Err(VaultError::precondition(format!(
                    "a rotation to version {} is still running ({} of {} data keys re-wrapped); wait for it to finish",
                    j.target_version, j.rewrapped, j.total
                )));
            }
            let total = self
                .store
                .data_keys
                .scan_prefix(store::tenant_prefix(tenant))
                .count() as u64;
            let to = st
                .active_version
                .checked_add(1)
                .ok_or_else(|| VaultError::precondition("no tenant key version left"))?;
            (st.active_version, to, total)
        };
        audit(from, to).await?;
        let st = {
            let _g = self.states.guard();
            let mut st = self.states.get(tenant);
            st.active_version = to;
            st.job = Some(RotationJob {
                target_version: to,
                rewrapped: 0,
                total,
                done: total == 0,
                started_at_ms: now_ms(),
                finished_at_ms: if total == 0 { now_ms() } else { 0 },
                cursor: Vec::new(),
            });
            self.states.set(&self.store, tenant, st.clone())?;
            st
        };
        self.store.commit().await?;
        Ok(st)
    }

    /// Runs (or resumes) the tenant's rotation job to completion, one batch
    /// at a time, persisting progress after each batch.
    pub async fn run(self: &Arc<Self>, tenant: &str) -> Result<()> {
        loop {
            let this = self.clone();
            let t = tenant.to_owned();
            let done = tokio::task::spawn_blocking(move || this.batch(&t))
                .await
                .map_err(|e| VaultError::storage(format!("rotation task failed: {e}")))??;
            self.store.commit().await?;
            if done {
                return Ok(());
            }
        }
    }

    /// Resumes every unfinished rotation job in the background.
    pub fn resume(self: &Arc<Self>) {
        for tenant in self.states.unfinished() {
            self.spawn(tenant);
        }
    }

    /// Runs the tenant's rotation job on a background task.
    pub fn spawn(self: &Arc<Self>, tenant: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tracing::info!(tenant = %tenant, "tenant key rotation job running");
            match this.run(&tenant).await {
                Ok(()) => tracing::info!(tenant = %tenant, "tenant key rotation job finished"),
                Err(e) => {
                    tracing::error!(tenant = %tenant, error = %e, "tenant key rotation job stopped; it resumes at the next start")
                }
            }
        });
    }

    /// Re-wraps one batch. Returns true when the job is done.
    fn batch(&self, tenant: &str) -> Result<bool> {
        let st = self.states.get(tenant);
        let Some(mut job) = st.job.clone().filter(|j| !j.done) else {
            return Ok(true);
        };
        let prefix = store::tenant_prefix(tenant);
        let start = if job.cursor.is_empty() {
            prefix.clone()
        } else {
            let mut c = job.cursor.clone();
            c.push(0); // the smallest key after the cursor
            c
        };
        let kek = self.keyring.kek(tenant, job.target_version);
        let mut processed = 0usize;
        for item in self.store.data_keys.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let customer = match self.id_of(tenant, &k, &v) {
                Ok(Some(c)) => c,
                // A shredded pad means the customer is being erased.
                Ok(None) => continue,
                Err(e @ VaultError::Integrity(_)) => {
                    tracing::error!(tenant, error = %e, "a data key cannot be re-wrapped");
                    job.cursor = k.to_vec();
                    processed += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.rewrap_one(
                tenant,
                &customer,
                &k,
                &kek,
                job.target_version,
                st.min_version,
            ) {
                Ok(()) => {}
                // A key that fails authentication cannot be re-wrapped; it
                // must not stall the job for everyone else. Reads of it
                // report DATA_LOSS.
                Err(e @ VaultError::Integrity(_)) => {
                    // The key is named by its storage reference, never the
                    // customer id: logs hold no personal data.
                    tracing::warn!(tenant, key = %hex::encode(&k), error = %e, "rotation skips a data key that fails authentication");
                }
                Err(e) => return Err(e),
            }
            job.cursor = k.to_vec();
            job.rewrapped += 1;
            processed += 1;
            if processed == BATCH {
                break;
            }
        }
        if processed < BATCH {
            job.done = true;
            job.finished_at_ms = now_ms();
            job.rewrapped = job.rewrapped.max(job.total);
        }
        let done = job.done;
        let _g = self.states.guard();
        let mut st = self.states.get(tenant);
        st.job = Some(job);
        self.states.set(&self.store, tenant, st)?;
        Ok(done)
    }

    /// The id sealed in the data key stored under `key` (value `v`), or
    /// `None` if its pad is zero (an erasure under way).
    fn id_of(&self, tenant: &str, key: &[u8], v: &[u8]) -> Result<Option<String>> {
        let bad = || VaultError::integrity("a data-key entry");
        let (_, r) = store::split_data_key(key).ok_or_else(bad)?;
        let w = WrappedKey::decode(v).map_err(|_| bad())?;
        let Some(pad) = self.store.slots.read(w.slot)? else {
            return Ok(None);
        };
        self.keyring.open_id(tenant, &r, &w, &pad).map(Some)
    }

    /// Re-wraps one data key to `kek`, under the customer's lock.
    fn rewrap_one(
        &self,
        tenant: &str,
        customer: &str,
        key: &[u8],
        kek: &Kek,
        target: u32,
        min: u32,
    ) -> Result<()> {
        let _g = self.locks.lock(tenant, customer);
        // Re-read under the lock: the customer may have been erased or
        // written since the scan.
        let Some(cur) = self.store.data_keys.get(key)? else {
            return Ok(());
        };
        let w = WrappedKey::decode(&cur[..])
            .map_err(|_| VaultError::integrity(format!("the data key of customer `{customer}`")))?;
        // Keys under a retired version cannot be unwrapped; they stay as they
        // are (their data is unreadable by design).
        if w.kek_version >= target || w.kek_version < min {
            return Ok(());
        }
        // A shredded pad means the customer is being erased.
        let Some(pad) = self.store.slots.read(w.slot)? else {
            return Ok(());
        };
        let dek = self.keyring.unwrap(tenant, customer, &w, &pad)?;
        let place = KeyPlace {
            tenant,
            customer,
            slot: w.slot,
            dek_version: w.dek_version,
        };
        let nw = self
            .keyring
            .wrap(kek, &place, &dek, &pad, w.created_at_ms)?;
        self.store
            .writer
            .insert(&self.store.data_keys, key, nw.encode_to_vec())?;
        Ok(())
    }

    /// The tenant's key state and data keys per wrapping version.
    pub fn key_status(&self, tenant: &str) -> Result<KeyStatus> {
        let mut by_version = BTreeMap::new();
        for item in self
            .store
            .data_keys
            .scan_prefix(store::tenant_prefix(tenant))
        {
            let (_, v) = item?;
            let w = WrappedKey::decode(&v[..])
                .map_err(|_| VaultError::integrity("a data-key entry"))?;
            *by_version.entry(w.kek_version).or_insert(0) += 1;
        }
        Ok(KeyStatus {
            state: self.states.get(tenant),
            by_version,
        })
    }

    /// Retires versions below `min_version`. Refused while data keys remain
    /// under them, unless `force`.
    ///
    /// `audit(retirement)` runs once the retirement is checked and before
    /// it is stored (write-ahead, as [`KeyRotation::rotate`]); if it fails,
    /// nothing changes.
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
        let _ordered = self.states.ordered.lock().await;
        let st = self.states.get(tenant);
        if min_version < st.min_version || min_version > st.active_version {
            return Err(VaultError::invalid(
                "min_version",
                format!(
                    "must be between the current minimum {} and the active version {}",
                    st.min_version, st.active_version
                ),
            ));
        }
        let status = self.key_status(tenant)?;
        let remaining: u64 = status.by_version.range(..min_version).map(|(_, n)| n).sum();
        if remaining > 0 && !force {
            return Err(VaultError::precondition(format!(
                "{remaining} data keys are still wrapped under versions below {min_version}; \
                 wait for the rotation job to finish, or force (their data becomes unreadable)"
            )));
        }
        if min_version == st.min_version {
            // Nothing changes, so nothing is recorded.
            return Ok(status);
        }
        audit(Retirement {
            from_min_version: st.min_version,
            to_min_version: min_version,
            forced: force && remaining > 0,
            data_keys_lost: remaining,
        })
        .await?;
        {
            let _g = self.states.guard();
            let mut st = self.states.get(tenant);
            st.min_version = min_version;
            self.states.set(&self.store, tenant, st)?;
        }
        self.store.commit().await?;
        self.key_status(tenant)
    }
}

/// A retirement about to take effect, for its ledger entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retirement {
    /// The lowest usable version before.
    pub from_min_version: u32,
    /// The lowest usable version after.
    pub to_min_version: u32,
    /// Whether data keys were still wrapped under the retired versions.
    pub forced: bool,
    /// How many (their data becomes unreadable).
    pub data_keys_lost: u64,
}
