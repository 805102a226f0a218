//! Start-up checks that tell faults from facts, run before anything is
//! served, and the anchor that makes them possible.
//!
//! The vault records, in its own database, the ledger position it has seen
//! durable (the *anchor*: a size and the Merkle root at that size). At
//! start:
//! - a ledger shorter than the anchor (restored from an older copy, or its
//!   tail lost) or whose root at the anchor's size differs (history
//!   rewritten, another vault's ledger) refuses to start, naming both
//!   directories; so does an empty ledger beside a vault that holds
//!   customers (the ledger folder was deleted);
//! - every erasure the ledger recorded from the anchor on is applied again
//!   if the vault's files still hold that customer (they were restored
//!   from an older copy);
//! - the shred slots are reconciled with the data keys, an erasure being
//!   recognised only by its ledger entry (see `engine::recovery`);
//! - the ledger's consent view is derived again from the entries and any
//!   record that disagrees is rebuilt, so a changed view byte is never
//!   taken as a consent.
//!
//! - a field value older than the ledger's `fields_written` entries from
//!   the anchor on say the vault holds refuses to start, naming the
//!   customer's pseudonym, the field and the entry (the write-ahead log
//!   normally brings restored files up to date first; this catches a view
//!   whose recorded log position was forged or a log restored with it).
//!   An entry whose write failed after it was appended is marked in the
//!   vault (`store::void_anchor_key`) and sets no floor.
//!
//! Does not guarantee: that a customer's *latest* write, restored away,
//! is noticed. Its ledger entry is appended before the write is applied, so
//! a crash leaves the same picture; the floor of the latest entry is one
//! version lower. Nor that a value altered in place below the anchor is
//! noticed: only entries from the anchor on are read at start.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sovra_ledger::{Body, Ledger, Pseudonym};

use crate::engine::{Engine, ErasureFacts, Floor, Floors, Recovered};
use crate::error::{Result, VaultError};

/// The `meta` key of the anchor: size (8 bytes, big-endian) and root (32).
const ANCHOR_KEY: &[u8] = b"ledger-anchor";

/// The ledger position the vault recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// Entries the ledger held, durably.
    pub size: u64,
    /// Its Merkle root at that size.
    pub root: [u8; 32],
}

impl Anchor {
    fn decode(v: &[u8]) -> Option<Anchor> {
        if v.len() != 40 {
            return None;
        }
        let size = u64::from_be_bytes(v[..8].try_into().ok()?);
        let root = v[8..].try_into().ok()?;
        Some(Anchor { size, root })
    }

    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.size.to_be_bytes());
        out[8..].copy_from_slice(&self.root);
        out
    }
}

/// The anchor the vault recorded, if any.
pub fn stored_anchor(engine: &Engine) -> Result<Option<Anchor>> {
    match engine.store().meta.get(ANCHOR_KEY)? {
        None => Ok(None),
        Some(v) => Anchor::decode(&v).map(Some).ok_or_else(|| {
            VaultError::integrity("the vault's ledger anchor (meta `ledger-anchor`)")
        }),
    }
}

/// Records the ledger's durable size and root as the vault's anchor (not
/// flushed: the next commit or the store's own flush carries it). Any
/// durable size is a valid anchor, so a lagging one only widens the range
/// the next start re-checks.
pub fn record_anchor(engine: &Engine, ledger: &Ledger) -> Result<()> {
    let size = ledger.durable_size();
    if size == 0 {
        return Ok(());
    }
    if stored_anchor(engine)?.is_some_and(|a| a.size == size) {
        return Ok(());
    }
    let root = ledger.tree_root(size)?;
    engine
        .store()
        .meta
        .insert(ANCHOR_KEY, &Anchor { size, root }.encode()[..])?;
    Ok(())
}

/// Checks the ledger against the vault's anchor; returns the position from
/// which the ledger's entries are newer than the vault's files may be.
fn check_anchor(
    engine: &Engine,
    ledger: &Ledger,
    data_dir: &Path,
    ledger_dir: &Path,
) -> Result<u64> {
    let Some(anchor) = stored_anchor(engine)? else {
        if ledger.size() == 0 && !engine.store().data_keys.is_empty() {
            return Err(VaultError::config(
                ledger_dir.display().to_string(),
                format!(
                    "the ledger is empty, but the vault in {} holds {} customers: the ledger folder was \
                     deleted or replaced; nothing was changed: restore it from a backup",
                    data_dir.display(),
                    engine.store().data_keys.len()
                ),
            ));
        }
        return Ok(0);
    };
    let size = ledger.durable_size();
    if size < anchor.size {
        return Err(VaultError::config(
            ledger_dir.display().to_string(),
            format!(
                "the ledger holds {size} entries, but the vault in {} recorded it at {} entries (root {}): \
                 the ledger was restored from an older copy, replaced, or lost its tail; nothing was changed: \
                 restore a ledger at least as new as the vault",
                data_dir.display(),
                anchor.size,
                hex::encode(anchor.root)
            ),
        ));
    }
    let root = ledger.tree_root(anchor.size)?;
    if root != anchor.root {
        return Err(VaultError::config(
            ledger_dir.display().to_string(),
            format!(
                "the ledger's first {} entries have root {}, but the vault in {} recorded root {} at that \
                 size: the ledger's history was rewritten or it belongs to another vault; nothing was changed",
                anchor.size,
                hex::encode(root),
                data_dir.display(),
                hex::encode(anchor.root)
            ),
        ));
    }
    Ok(anchor.size)
}

/// The ledger's erasures and written versions, for the engine's
/// reconciliation.
struct LedgerFacts<'a> {
    ledger: &'a Ledger,
    since_anchor: HashSet<(String, Pseudonym)>,
    floors: Floors,
}

/// A customer's written versions while the entries are read in order.
#[derive(Default)]
struct Versions {
    /// From every entry but the latest.
    settled: HashMap<String, Floor>,
    /// From the latest entry.
    last: Vec<(String, Floor)>,
}

impl LedgerFacts<'_> {
    fn collect<'a>(engine: &Engine, ledger: &'a Ledger, from: u64) -> Result<LedgerFacts<'a>> {
        let void = engine.store().void_anchors()?;
        let mut since_anchor = HashSet::new();
        let mut versions: HashMap<(String, Pseudonym), Versions> = HashMap::new();
        for i in from..ledger.size() {
            let (_, e) = ledger.entry(i)?;
            match e.body {
                Body::CustomerErased(x) => {
                    since_anchor.insert((x.tenant, x.subject));
                }
                // A sandbox job's output is a derived value in the lineage,
                // not a stored field.
                Body::FieldsWritten(w)
                    if !w.channel.starts_with("sandbox:") && !void.contains(&i) =>
                {
                    let v = versions.entry((w.tenant, w.subject)).or_default();
                    for (f, floor) in std::mem::take(&mut v.last) {
                        raise(&mut v.settled, f, floor);
                    }
                    v.last = w
                        .fields
                        .into_iter()
                        .map(|f| {
                            (
                                f.field,
                                Floor {
                                    version: f.version,
                                    index: i,
                                },
                            )
                        })
                        .collect();
                }
                _ => {}
            }
        }
        let floors = versions
            .into_iter()
            .map(|(k, v)| {
                let mut fields = v.settled;
                for (f, floor) in v.last {
                    // INVARIANT: a write's ledger entry is appended before
                    // the write is applied (its lineage names the entry), so
                    // a crash can leave a customer's latest entry without
                    // its write: one version less is then what the vault
                    // holds.
                    let version = floor.version.saturating_sub(1);
                    raise(&mut fields, f, Floor { version, ..floor });
                }
                (k, fields)
            })
            .collect();
        Ok(LedgerFacts {
            ledger,
            since_anchor,
            floors,
        })
    }
}

/// Keeps the higher of `floor` and the one `fields` holds for `field`.
fn raise(fields: &mut HashMap<String, Floor>, field: String, floor: Floor) {
    let e = fields.entry(field).or_insert(floor);
    if floor.version > e.version {
        *e = floor;
    }
}

impl ErasureFacts for LedgerFacts<'_> {
    fn erased(&self, tenant: &str, subject: &Pseudonym) -> Result<bool> {
        // The subject index is a view: each entry it names is read back
        // (checked against its leaf hash) and must itself be the erasure.
        for i in self.ledger.subject_entries(subject)? {
            let (_, e) = self.ledger.entry(i)?;
            if let Body::CustomerErased(x) = &e.body {
                if x.tenant == tenant && x.subject == *subject {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn erased_since_anchor(&self) -> &HashSet<(String, Pseudonym)> {
        &self.since_anchor
    }

    fn floors_since_anchor(&self) -> &Floors {
        &self.floors
    }
}

/// Runs every start-up check (see the module docs) and records a fresh
/// anchor, durably, before the server serves.
pub fn reconcile(
    engine: &Engine,
    ledger: &Ledger,
    data_dir: &Path,
    ledger_dir: &Path,
) -> Result<Recovered> {
    let from = check_anchor(engine, ledger, data_dir, ledger_dir)?;
    let facts = LedgerFacts::collect(engine, ledger, from)?;
    let recovered = engine.recover(&facts)?;
    let rebuilt = ledger.rebuild_consent_view()?;
    if rebuilt > 0 {
        tracing::error!(
            records = rebuilt,
            ledger = %ledger_dir.display(),
            "the ledger's consent view disagreed with its entries (changed on disk): rebuilt it from the entries"
        );
    }
    record_anchor(engine, ledger)?;
    engine.store().flush()?;
    Ok(recovered)
}

#[cfg(test)]
mod view_only {
    /// The anchor is written outside the log: `sovra migrate` leaves it out.
    #[test]
    fn the_anchor_is_view_bookkeeping() {
        assert!(crate::store::VIEW_ONLY_META_KEYS.contains(&super::ANCHOR_KEY));
    }
}
