//! The contract runtime's storage: one sled tree, `contract_runtime`,
//! written through the write-ahead log, with one-byte key prefixes:
//!
//! | prefix | key after it | value |
//! |--------|--------------|-------|
//! | `n` | — | the first instance id not reserved (u64, big-endian) |
//! | `i` | tenant 0 instance (u64 BE) | [`InstanceRec`] (JSON) |
//! | `a` | tenant 0 instance (u64 BE) action id | [`ActionRec`] (JSON) |
//! | `t` | due ms (u64 BE) tenant 0 instance (u64 BE) action id | timer kind (1 deadline, 2 retry) |
//! | `q` | sequence (u64 BE) | [`InboxRec`] (JSON): a vault event to run contracts on |
//! | `s` | tenant 0 SHA-256(idempotency key) | [`SignalRec`] (JSON) |
//! | `c` | tenant 0 pseudonym (32) instance (u64 BE) action id | empty: the customer's open actions |
//!
//! Customers appear only as their [`CustomerRef`] (a keyed pseudonym) and
//! their ledger pseudonym; no customer id or field value is stored here.
//! Timers are keyed by due time, so adding, cancelling and finding the
//! next due timer are O(log n) B-tree operations.
//!
//! Guarantees: a record is read back as written or refused as damaged,
//! naming its key's place; several keys written in one call are one log
//! frame (all or nothing after a crash). Not guaranteed here: that the
//! records agree with the ledger (the application layer reconciles them at
//! start, `contracts::runtime`).

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sovra_ledger::Digest;

use super::Engine;
use crate::crypto::keys::CustomerRef;
use crate::error::{Result, VaultError};

/// A contract instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceRec {
    /// The contract.
    pub contract: String,
    /// Its version.
    pub version: u32,
    /// Its pin (hex).
    pub sha256: String,
    /// `kind:name` of the trigger.
    pub trigger: String,
    /// The customer's reference (hex; "" when none).
    pub cref: String,
    /// The customer's ledger pseudonym (hex).
    pub subject: String,
    /// `open`, `done`, `not_met` or `failed`.
    pub state: String,
    /// Why it failed.
    pub failure: String,
    /// Its evaluation's ledger entry.
    pub evaluated_entry: u64,
    /// When (ms).
    pub created_at_ms: i64,
    /// Guest fuel used.
    pub fuel_used: u64,
    /// Its action ids, in order.
    pub actions: Vec<String>,
}

/// An action in the outbox (and after it: its final state stays).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionRec {
    /// The contract.
    pub contract: String,
    /// Its version.
    pub version: u32,
    /// Its pin (hex).
    pub sha256: String,
    /// The purpose its contract acts for.
    pub purpose: String,
    /// The action's kind.
    pub kind: String,
    /// Its parameters (the manifest's, never a field value).
    pub detail: serde_json::Value,
    /// The customer's reference (hex; "" when none).
    pub cref: String,
    /// The customer's ledger pseudonym (hex).
    pub subject: String,
    /// Due (ms; 0: no deadline).
    pub due_ms: i64,
    /// Escalation target ("" for none).
    pub escalate_to: String,
    /// `ready`, `waiting`, `escalated`, `completed`, `failed`, `cancelled`
    /// or `denied`.
    pub state: String,
    /// Failures so far.
    pub failures: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// First backoff (ms).
    pub backoff_ms: u64,
    /// Its decision's determining policies.
    pub policies: Vec<String>,
    /// The ledger entry that queued (or denied) it.
    pub queued_entry: u64,
    /// The principal it was last delivered to ("" before its first
    /// delivery).
    pub delivered_to: String,
    /// Who completed it.
    pub completed_by: String,
    /// When (ms).
    pub completed_at_ms: i64,
    /// The ledger entry of its completion, failure, cancellation or
    /// escalation, the latest.
    pub last_entry: u64,
}

impl ActionRec {
    /// Whether it still waits for a connector (deliverable now or later).
    pub fn is_open(&self) -> bool {
        matches!(self.state.as_str(), "ready" | "waiting" | "escalated")
    }
}

/// A vault event for the runtime to run contracts on (written in the same
/// request as the event, before it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InboxRec {
    /// Tenant.
    pub tenant: String,
    /// The trigger kind (manifest spelling).
    pub trigger: String,
    /// Its name (field, purpose).
    pub name: String,
    /// The customer's reference (hex).
    pub cref: String,
    /// The customer's ledger pseudonym (hex).
    pub subject: String,
    /// When (ms).
    pub at_ms: i64,
}

/// A signal's idempotency record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalRec {
    /// SHA-256 of the signal (name, customer, contract, attributes).
    pub request: String,
    /// The instances it started.
    pub instances: Vec<u64>,
    /// When (ms).
    pub at_ms: i64,
}

/// How long a signal's idempotency key is remembered.
pub const SIGNAL_KEY_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// Timer kinds.
pub const TIMER_DEADLINE: u8 = 1;
/// A retry after a failure's backoff.
pub const TIMER_RETRY: u8 = 2;

fn tenant_key(prefix: u8, tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 2);
    k.push(prefix);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

/// Key of an instance.
pub fn instance_key(tenant: &str, id: u64) -> Vec<u8> {
    let mut k = tenant_key(b'i', tenant);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Prefix of a tenant's instances.
pub fn instance_prefix(tenant: &str) -> Vec<u8> {
    tenant_key(b'i', tenant)
}

/// Key of an action.
pub fn action_key(tenant: &str, instance: u64, action: &str) -> Vec<u8> {
    let mut k = tenant_key(b'a', tenant);
    k.extend_from_slice(&instance.to_be_bytes());
    k.extend_from_slice(action.as_bytes());
    k
}

/// Prefix of an instance's actions.
pub fn actions_prefix(tenant: &str, instance: u64) -> Vec<u8> {
    let mut k = tenant_key(b'a', tenant);
    k.extend_from_slice(&instance.to_be_bytes());
    k
}

/// Key of a timer.
pub fn timer_key(due_ms: i64, tenant: &str, instance: u64, action: &str) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(&u64::try_from(due_ms.max(0)).unwrap_or(0).to_be_bytes());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&instance.to_be_bytes());
    k.extend_from_slice(action.as_bytes());
    k
}

/// Key of a customer's open action.
pub fn customer_action_key(tenant: &str, subject: &[u8], instance: u64, action: &str) -> Vec<u8> {
    let mut k = tenant_key(b'c', tenant);
    k.extend_from_slice(subject);
    k.extend_from_slice(&instance.to_be_bytes());
    k.extend_from_slice(action.as_bytes());
    k
}

/// Prefix of a customer's open actions.
pub fn customer_actions_prefix(tenant: &str, subject: &[u8]) -> Vec<u8> {
    let mut k = tenant_key(b'c', tenant);
    k.extend_from_slice(subject);
    k
}

/// Key of a signal's idempotency record.
pub fn signal_key(tenant: &str, idempotency_key: &str) -> Vec<u8> {
    let mut k = tenant_key(b's', tenant);
    k.extend_from_slice(&Sha256::digest(idempotency_key.as_bytes()));
    k
}

/// Key of an inbox record.
pub fn inbox_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'q'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The key of the instance id reservation.
pub const NEXT_KEY: &[u8] = b"n";

/// A timer, decoded from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// Due (ms).
    pub due_ms: i64,
    /// Tenant.
    pub tenant: String,
    /// Instance.
    pub instance: u64,
    /// Action id.
    pub action: String,
    /// [`TIMER_DEADLINE`] or [`TIMER_RETRY`].
    pub kind: u8,
    /// Its key.
    pub key: Vec<u8>,
}

fn damaged(what: &str) -> VaultError {
    VaultError::integrity(format!(
        "{what} in the vault's `contract_runtime` tree (altered or damaged)"
    ))
}

/// Decodes a record (JSON), naming it when damaged.
pub fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|_| damaged(what))
}

/// Encodes a record.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| VaultError::internal(format!("encoding a record: {e}")))
}

/// Which tenants have enabled contracts triggered by which vault events,
/// so that the vault's use cases write an inbox record only when some
/// contract listens, and a way to wake the runtime.
#[derive(Debug, Default)]
pub struct Hooks {
    listening: RwLock<HashMap<String, HashSet<String>>>,
    /// Woken when the inbox has work.
    pub wake: std::sync::Arc<tokio::sync::Notify>,
    seq: std::sync::atomic::AtomicU64,
}

impl Hooks {
    /// Sets what `tenant` listens to (trigger kinds, manifest spelling).
    pub fn set_listening(&self, tenant: &str, kinds: HashSet<String>) {
        let mut l = self
            .listening
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kinds.is_empty() {
            l.remove(tenant);
        } else {
            l.insert(tenant.to_owned(), kinds);
        }
    }

    /// Whether `tenant` has an enabled contract triggered by `kind`.
    pub fn listens(&self, tenant: &str, kind: &str) -> bool {
        self.listening
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .is_some_and(|k| k.contains(kind))
    }
}

impl Engine {
    /// The runtime's hooks.
    pub fn contract_hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// One runtime record.
    pub fn rt_get(&self, key: &[u8]) -> Result<Option<sled::IVec>> {
        Ok(self.store.contract_runtime.get(key)?)
    }

    /// Every runtime record under `prefix`, in key order.
    pub fn rt_scan(&self, prefix: &[u8]) -> Result<Vec<(sled::IVec, sled::IVec)>> {
        let mut out = Vec::new();
        for item in self.store.contract_runtime.scan_prefix(prefix) {
            out.push(item?);
        }
        Ok(out)
    }

    /// The first `limit` records under `prefix`, in key order.
    pub fn rt_scan_limit(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>> {
        let mut out = Vec::new();
        for item in self.store.contract_runtime.scan_prefix(prefix).take(limit) {
            out.push(item?);
        }
        Ok(out)
    }

    /// The newest `limit` records under `prefix`, newest first.
    pub fn rt_scan_rev(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>> {
        let mut out = Vec::new();
        for item in self.store.contract_runtime.scan_prefix(prefix).rev() {
            out.push(item?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Writes runtime records, all in one logged write (not durable until
    /// [`Engine::commit`]).
    pub fn rt_write(&self, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<()> {
        let w: Vec<(&[u8], Option<&[u8]>)> = writes
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect();
        self.store.writer.write(&self.store.contract_runtime, &w)?;
        Ok(())
    }

    /// The timers due at or before `now_ms`, at most `limit`, earliest
    /// first.
    pub fn due_timers(&self, now_ms: i64, limit: usize) -> Result<Vec<Timer>> {
        let end = timer_key(now_ms.saturating_add(1), "", 0, "");
        let end = end[..9].to_vec();
        let mut out = Vec::new();
        for item in self.store.contract_runtime.range(b"t".to_vec()..end) {
            let (k, v) = item?;
            match decode_timer(&k, &v) {
                Ok(t) => out.push(t),
                // A damaged timer must not stop the others: it is reported
                // and left where it is.
                Err(e) => {
                    tracing::error!(key = %hex::encode(&k), error = %e, "a timer that does not decode is skipped")
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// When the next timer is due (ms), if any is.
    pub fn next_timer(&self) -> Result<Option<i64>> {
        match self.store.contract_runtime.scan_prefix(b"t").next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item?;
                Ok(Some(decode_timer(&k, &v)?.due_ms))
            }
        }
    }

    /// How many timers are pending.
    pub fn pending_timers(&self) -> usize {
        self.store.contract_runtime.scan_prefix(b"t").count()
    }

    /// Writes an inbox record for a vault event about `customer` when some
    /// enabled contract of `tenant` listens to `trigger`; wakes the
    /// runtime. Called after the event's own change and before the commit
    /// that acknowledges it, so an acknowledged event always has its
    /// record, and the runtime never sees a record before the change it
    /// reports.
    pub fn contract_inbox(
        &self,
        tenant: &str,
        trigger: &str,
        name: &str,
        customer: &str,
        subject: &Digest,
    ) -> Result<()> {
        if !self.hooks.listens(tenant, trigger) {
            return Ok(());
        }
        let cref = self.cref(tenant, customer);
        let rec = InboxRec {
            tenant: tenant.to_owned(),
            trigger: trigger.to_owned(),
            name: name.to_owned(),
            cref: hex::encode(cref.0),
            subject: subject.to_hex(),
            at_ms: crate::clock::now_ms(),
        };
        // Sequence numbers: time-ordered and unique in this process; a
        // restart starts above every record left (the time moved on).
        let now = u64::try_from(rec.at_ms).unwrap_or(0) << 20;
        let next = |s: u64| s.max(now) + 1;
        let seq = self
            .hooks
            .seq
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |s| Some(next(s)),
            )
            .map_or(now + 1, next);
        self.rt_write(&[(inbox_key(seq), Some(encode(&rec)?))])?;
        self.hooks.wake.notify_one();
        Ok(())
    }

    /// What a contract needs of a customer: the ledger pseudonym, the
    /// reference and the keyed digest of its evaluation input. NOT_FOUND
    /// for an unknown or erased customer.
    pub fn contract_customer(
        &self,
        tenant: &str,
        customer: &str,
        input: &[u8; 32],
    ) -> Result<(Digest, CustomerRef, [u8; 32])> {
        crate::schema::validate_id("customer_id", customer, crate::schema::MAX_CUSTOMER_ID_LEN)?;
        let w = self
            .load_wrapped(tenant, customer)?
            .ok_or_else(|| VaultError::not_found(format!("customer `{customer}`")))?;
        let dek = self.unwrap_dek(tenant, customer, &w)?;
        Ok((
            Digest(dek.pseudonym(tenant, customer)),
            self.cref(tenant, customer),
            dek.input_digest(input),
        ))
    }

    /// The id of the customer with reference `cref` (hex): NOT_FOUND once
    /// erased.
    pub fn contract_customer_id(&self, tenant: &str, cref: &str) -> Result<String> {
        let r = hex::decode(cref)
            .ok()
            .and_then(|b| CustomerRef::from_slice(&b))
            .ok_or_else(|| damaged("a customer reference"))?;
        self.customer_id(tenant, &r)
    }
}

/// `tenant 0 id(u64 BE) rest` of a key (after its prefix bytes).
fn split_tenant_id<'k>(k: &'k [u8], skip: usize, what: &str) -> Result<(String, u64, &'k [u8])> {
    let bad = || damaged(what);
    let rest = k.get(skip..).ok_or_else(bad)?;
    let z = rest.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let tenant = std::str::from_utf8(&rest[..z])
        .map_err(|_| bad())?
        .to_owned();
    let id = rest
        .get(z + 1..z + 9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(bad)?;
    Ok((tenant, id, rest.get(z + 9..).ok_or_else(bad)?))
}

fn utf8(b: &[u8], what: &str) -> Result<String> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| damaged(what))
}

/// (tenant, instance, action) of an action key.
pub fn split_action_key(k: &[u8]) -> Result<(String, u64, String)> {
    let what = "an action key";
    let (tenant, id, action) = split_tenant_id(k, 1, what)?;
    Ok((tenant, id, utf8(action, what)?))
}

/// (tenant, instance) of an instance key.
pub fn split_instance_key(k: &[u8]) -> Result<(String, u64)> {
    let what = "an instance key";
    match split_tenant_id(k, 1, what)? {
        (tenant, id, []) => Ok((tenant, id)),
        _ => Err(damaged(what)),
    }
}

/// (tenant, instance, action) of a customer's open-action key of `tenant`.
pub fn split_customer_action_key(k: &[u8], tenant: &str) -> Result<(String, u64, String)> {
    let what = "a customer action key";
    let at = 1 + tenant.len() + 1 + 32;
    let id = k
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| damaged(what))?;
    let action = utf8(k.get(at + 8..).ok_or_else(|| damaged(what))?, what)?;
    Ok((tenant.to_owned(), id, action))
}

fn decode_timer(k: &[u8], v: &[u8]) -> Result<Timer> {
    let what = "a timer";
    let due = k
        .get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| damaged(what))?;
    let (tenant, instance, action) = split_tenant_id(k, 9, what)?;
    let kind = *v.first().ok_or_else(|| damaged(what))?;
    if kind != TIMER_DEADLINE && kind != TIMER_RETRY {
        return Err(damaged(what));
    }
    Ok(Timer {
        due_ms: i64::try_from(due).map_err(|_| damaged(what))?,
        tenant,
        instance,
        action: utf8(action, what)?,
        kind,
        key: k.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_keys_order_by_due_time_and_decode() {
        let a = timer_key(5, "t", 1, "x");
        let b = timer_key(1_000_000, "a", 0, "y");
        assert!(a < b);
        let t = decode_timer(&b, &[TIMER_RETRY]).unwrap();
        assert_eq!(
            (t.due_ms, t.tenant.as_str(), t.instance, t.action.as_str()),
            (1_000_000, "a", 0, "y")
        );
        assert!(decode_timer(&b, &[9]).is_err());
        assert_eq!(
            split_action_key(&action_key("t", 7, "x.y")).unwrap(),
            ("t".into(), 7, "x.y".into())
        );
        assert_eq!(
            split_instance_key(&instance_key("t", 7)).unwrap(),
            ("t".into(), 7)
        );
        assert!(split_instance_key(&action_key("t", 7, "x")).is_err());
        assert_eq!(
            split_customer_action_key(&customer_action_key("t", &[1; 32], 3, "a"), "t").unwrap(),
            ("t".into(), 3, "a".into())
        );
        assert!(decode_timer(&b[..5], &[1]).is_err());
    }
}
