//! Start-up reconciliation of the shred slots with the data keys, telling
//! faults from facts.
//!
//! Guarantees:
//! - An erasure is recognised only by its ledger entry ([`ErasureFacts`]):
//!   a data key whose pad is zero is removed only if the ledger records the
//!   erasure of that customer (an erasure interrupted after its
//!   write-ahead entry). Without such an entry the zero pad is a fault.
//! - A pad that lies beyond the end of `shred.slots` (the file was deleted,
//!   truncated or replaced by an older, shorter copy), or whose check value
//!   disagrees with the one stored beside its wrapped key, refuses the start,
//!   naming the file and the slots; nothing is changed.
//! - A customer whose erasure the ledger recorded after the vault's anchor
//!   (its files were restored from an older copy) is erased again before
//!   anything is served.
//! - A pad no data key references (a creation that never reached sled) is
//!   zeroed; every zero, unreferenced slot becomes reusable.
//!
//! Does not guarantee: that a data key wrapped before pad check values
//! existed (format without `pad_check`) is checked; such a key with a
//! zero pad and no stored pseudonym cannot be told from a lost pad, and is
//! refused too.

use std::collections::{HashMap, HashSet};

use prost::Message;

use super::Engine;
use crate::crypto::keys::{CustomerRef, WrappedKey};
use crate::crypto::shred::SlotState;
use crate::error::{Result, VaultError};
use crate::store;
use sovra_ledger::{Digest, Pseudonym};

/// What the ledger says about erasures, for [`Engine::recover`].
pub trait ErasureFacts {
    /// Whether the ledger records the erasure of `subject` in `tenant`.
    fn erased(&self, tenant: &str, subject: &Pseudonym) -> Result<bool>;
    /// The `(tenant, subject)` pairs whose erasure the ledger recorded
    /// after the position the vault last recorded (its anchor): if the
    /// vault still holds one, its files are older than the ledger and the
    /// erasure is applied again.
    fn erased_since_anchor(&self) -> &HashSet<(String, Pseudonym)>;
    /// The lowest field versions the vault must hold, by `(tenant,
    /// subject)`, from the ledger's `fields_written` entries after the
    /// anchor (see [`Floor`]).
    fn floors_since_anchor(&self) -> &Floors;
}

/// A field version the vault must hold: `version`, from ledger entry
/// `index`. The ledger entry of a write is appended before the write is
/// applied, so after a crash a customer's *latest* write may be in the
/// ledger and not in the vault: its floor is one version lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor {
    /// The lowest version the vault may hold.
    pub version: u64,
    /// The ledger entry that wrote it.
    pub index: u64,
}

/// Floors by `(tenant, subject)`, then by field name.
pub type Floors = HashMap<(String, Pseudonym), HashMap<String, Floor>>;

/// No ledger (tools and tests that open the engine alone): no erasure is
/// known, so a zero pad beside a data key refuses the start.
#[derive(Debug, Default)]
pub struct NoLedger(HashSet<(String, Pseudonym)>, Floors);

impl ErasureFacts for NoLedger {
    fn erased(&self, _: &str, _: &Pseudonym) -> Result<bool> {
        Ok(false)
    }
    fn erased_since_anchor(&self) -> &HashSet<(String, Pseudonym)> {
        &self.0
    }
    fn floors_since_anchor(&self) -> &Floors {
        &self.1
    }
}

/// What [`Engine::recover`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Erasures interrupted after their ledger entry, completed now.
    pub completed_erasures: usize,
    /// Erasures the ledger recorded since the vault's anchor, applied again
    /// because the vault's files still held the customer.
    pub reapplied_erasures: usize,
    /// Unreferenced pads zeroed.
    pub zeroed_pads: usize,
}

/// At most this many slots are named in a refusal.
const NAMED: usize = 8;

fn named(slots: &[u64]) -> String {
    let mut s: Vec<String> = slots.iter().take(NAMED).map(u64::to_string).collect();
    if slots.len() > NAMED {
        s.push(format!("and {} more", slots.len() - NAMED));
    }
    s.join(", ")
}

struct Scan {
    referenced: HashSet<u64>,
    zero: Vec<(String, CustomerRef, Vec<u8>, u64)>,
    missing: Vec<u64>,
    bad_check: Vec<u64>,
    reerase: Vec<(String, CustomerRef, Pseudonym, u64)>,
    stale: Vec<String>,
    damaged: usize,
    keys: usize,
}

impl Engine {
    /// Reconciles the shred slots with the data keys and the ledger's
    /// erasures (see the module docs); refuses, changing nothing, if a pad
    /// was lost or damaged.
    pub fn recover(&self, facts: &dyn ErasureFacts) -> Result<Recovered> {
        let scan = self.scan_keys(facts)?;
        let shown = self.store.slots.place().to_owned();
        if scan.keys > 0 && self.store.slots.was_created() {
            return Err(VaultError::config(
                &shown,
                format!(
                    "the {} was missing, but {} customers' data keys reference pads in it: lost pads are \
                     not an erasure; nothing was changed: restore the pads (shred.slots, or the pads table) from the backup taken with this database",
                    if self.store.slots.in_database() { "table's every row" } else { "file" },
                    scan.keys
                ),
            ));
        }
        if !scan.missing.is_empty() {
            return Err(VaultError::config(
                &shown,
                format!(
                    "{} customers' pads lie beyond the end of the file (it holds {} slots; missing: slot {}): \
                     it was truncated or replaced by an older copy; a lost pad is not an erasure; nothing was \
                     changed: restore the pads (shred.slots, or the pads table) from the backup taken with this database",
                    scan.missing.len(),
                    self.store.slots.len(),
                    named(&scan.missing)
                ),
            ));
        }
        if !scan.bad_check.is_empty() {
            return Err(VaultError::config(
                &shown,
                format!(
                    "the pad in slot {} does not match the check value stored with its data key: the file was \
                     altered or swapped; nothing was changed: restore the pads (shred.slots, or the pads table) from the backup taken with this database",
                    named(&scan.bad_check)
                ),
            ));
        }
        if !scan.stale.is_empty() {
            return Err(self.stale_refusal(scan.stale));
        }
        let mut unexplained = Vec::new();
        let mut completions = Vec::new();
        for (tenant, customer, subject, slot) in scan.zero {
            let erased = match Digest::from_slice("subject", &subject) {
                Ok(s) => facts.erased(&tenant, &s)?.then_some(s),
                Err(_) => None,
            };
            match erased {
                Some(s) => completions.push((tenant, customer, s)),
                None => unexplained.push(slot),
            }
        }
        if !unexplained.is_empty() {
            return Err(VaultError::config(
                &shown,
                format!(
                    "the pad in slot {} is zero, but the ledger records no erasure of its customer: the file \
                     was altered or restored from another copy; a zero pad is not an erasure; nothing was \
                     changed: restore the pads (shred.slots, or the pads table) from the backup taken with this database",
                    named(&unexplained)
                ),
            ));
        }
        let mut out = Recovered::default();
        for (tenant, customer, subject) in &completions {
            self.remove_customer(tenant, customer, Some(*subject), None)?;
            out.completed_erasures += 1;
        }
        let mut shredded = Vec::new();
        for (tenant, customer, subject, slot) in &scan.reerase {
            // INVARIANT: the pad goes first, as in `Engine::erase`.
            self.store.slots.shred(*slot)?;
            self.remove_customer(tenant, customer, Some(*subject), None)?;
            shredded.push(*slot);
            out.reapplied_erasures += 1;
        }
        let mut free = Vec::new();
        for slot in 0..self.store.slots.len() {
            if scan.referenced.contains(&slot) {
                continue;
            }
            if let SlotState::Pad(_) = self.store.slots.state(slot)? {
                // A damaged entry might reference this pad: keep it for
                // repair from a backup rather than destroy it.
                if scan.damaged > 0 {
                    continue;
                }
                if !shredded.contains(&slot) {
                    out.zeroed_pads += 1;
                }
                self.store.slots.shred(slot)?;
            }
            free.push(slot);
        }
        if scan.damaged > 0 {
            tracing::error!(entries = scan.damaged, "data-key entries fail to decode; unreferenced pads are kept until they are repaired");
        }
        self.store.flush()?;
        self.store.slots.release(free);
        if out.completed_erasures > 0 {
            tracing::warn!(customers = out.completed_erasures, "completed erasures that the ledger records but that were interrupted before they reached the vault's files");
        }
        if out.reapplied_erasures > 0 {
            tracing::warn!(customers = out.reapplied_erasures, "the vault's files still held customers whose erasure the ledger records (files restored from an older copy): erased them again");
        }
        Ok(out)
    }

    /// The refusal for field values older than their floors.
    fn stale_refusal(&self, stale: Vec<String>) -> VaultError {
        let n = stale.len();
        let mut shown: Vec<String> = stale.into_iter().take(NAMED).collect();
        if n > NAMED {
            shown.push(format!("and {} more", n - NAMED));
        }
        VaultError::config(
            self.store.dir.display().to_string(),
            format!(
                "{n} field values are older than the versions the ledger records for them ({}): the vault's \
                 files were restored from an older copy or altered, and the write-ahead log did not bring them \
                 up to date; a stale value is never served as current; nothing was changed: restore vault \
                 files at least as new as the ledger",
                shown.join("; ")
            ),
        )
    }

    /// Adds to `stale` each of the customer's fields whose stored version
    /// is below its floor (or that holds no value at all).
    fn check_floors(
        &self,
        tenant: &str,
        customer: &CustomerRef,
        subject: &Pseudonym,
        fields: &HashMap<String, Floor>,
        stale: &mut Vec<String>,
    ) -> Result<()> {
        // A field the schema no longer has is not served at all.
        let checked: Vec<(&String, &Floor)> = fields
            .iter()
            .filter(|(field, floor)| floor.version > 0 && self.schema.field(field).is_ok())
            .collect();
        if checked.is_empty() {
            return Ok(());
        }
        let record = self
            .store
            .records
            .get(store::record_key(tenant, customer))?;
        let set = super::decode_set(record.as_deref(), || {
            format!(
                "{}: the stored record of subject {}… cannot be decoded (its fields are damaged); \
                 nothing was changed: restore the vault's files from a backup",
                self.store.dir.display(),
                hex::encode(&subject.0[..8])
            )
        })?;
        for (field, floor) in checked {
            let held = match set.get(field) {
                None => 0,
                Some(b) => {
                    super::decode_field(b, || format!("field `{field}` of a customer"))?.version
                }
            };
            if held < floor.version {
                stale.push(format!(
                    "subject {}…: field `{field}` holds version {held}, below version {} (ledger entry {})",
                    hex::encode(&subject.0[..8]),
                    floor.version,
                    floor.index
                ));
            }
        }
        Ok(())
    }

    fn scan_keys(&self, facts: &dyn ErasureFacts) -> Result<Scan> {
        let recent = facts.erased_since_anchor();
        let floors = facts.floors_since_anchor();
        let mut scan = Scan {
            referenced: HashSet::new(),
            zero: Vec::new(),
            missing: Vec::new(),
            bad_check: Vec::new(),
            reerase: Vec::new(),
            stale: Vec::new(),
            damaged: 0,
            keys: 0,
        };
        for item in self.store.data_keys.iter() {
            let (k, v) = item?;
            scan.keys += 1;
            let (Ok(w), Some((tenant, customer))) =
                (WrappedKey::decode(&v[..]), store::split_data_key(&k))
            else {
                // Its reads report DATA_LOSS; it must not keep the vault down.
                scan.damaged += 1;
                continue;
            };
            match self.store.slots.state(w.slot)? {
                SlotState::Missing => scan.missing.push(w.slot),
                SlotState::Zero => scan.zero.push((tenant, customer, w.subject, w.slot)),
                SlotState::Pad(pad) => {
                    if !w.pad_check.is_empty() && pad.check(w.slot)[..] != w.pad_check[..] {
                        scan.bad_check.push(w.slot);
                        continue;
                    }
                    scan.referenced.insert(w.slot);
                    if recent.is_empty() && floors.is_empty() {
                        continue;
                    }
                    let subject = match Digest::from_slice("subject", &w.subject) {
                        Ok(s) => s,
                        // A key wrapped before pseudonyms were stored with it.
                        Err(_) => match self
                            .keyring
                            .open_id(&tenant, &customer, &w, &pad)
                            .and_then(|id| Ok((self.unwrap_dek(&tenant, &id, &w)?, id)))
                        {
                            Ok((dek, id)) => Digest(dek.pseudonym(&tenant, &id)),
                            Err(_) => continue,
                        },
                    };
                    let at = (tenant, subject);
                    if recent.contains(&at) {
                        scan.referenced.remove(&w.slot);
                        scan.reerase.push((at.0, customer, subject, w.slot));
                    } else if let Some(fields) = floors.get(&at) {
                        self.check_floors(&at.0, &customer, &subject, fields, &mut scan.stale)?;
                    }
                }
            }
        }
        Ok(scan)
    }
}
