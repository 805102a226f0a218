//! `sovra migrate`: a vault copied from one storage to another (a data
//! directory into PostgreSQL, or back), and checked on both sides.
//!
//! Both configurations must name the same vault: the same root key, the
//! same ledger key and origin. The source is opened as a server opens it
//! (its start-up checks run first); the destination must be empty. Then,
//! in order: every pad into the same slot, every ledger entry byte for
//! byte (`Ledger::import` checks each continues the log), every key and
//! value of every tree through the destination's writer (so that all of
//! it is in the destination's log); then the destination is made durable
//! and checked: its start-up checks (pads against data keys against the
//! ledger), the same ledger root at the same size, and a sample of
//! customers whose every field decrypts to the same value, version and
//! time on both sides.
//!
//! Guarantees: nothing is written to the source except what its own
//! start-up checks write (erasures the ledger holds, applied again); a
//! refusal names the check that failed. Not guaranteed: that the copy is
//! atomic (a failure part way leaves a destination to drop and make
//! again); the source's signed checkpoints are not copied (the
//! destination signs its own over the same roots, so officers' earlier
//! checkpoints stay consistent with it).

use sovra_ledger::Ledger;

use crate::app::recovery;
use crate::config::Config;
use crate::crypto::keys::KeyRing;
use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::store;

/// Ledger entries imported per call.
const ENTRY_BATCH: u64 = 1024;

/// What a migration copied and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Where from and to (the logs' places).
    pub from: String,
    /// Where to.
    pub to: String,
    /// Ledger entries copied.
    pub entries: u64,
    /// The ledger's root at that size, on both sides (hex).
    pub root: String,
    /// Tree writes copied.
    pub writes: u64,
    /// Pads copied.
    pub pads: u64,
    /// Customers whose fields were decrypted on both sides and compared.
    pub sampled: usize,
    /// Customers whose pad is gone (erased) on both sides, among those.
    pub erased: usize,
}

struct Side {
    engine: Engine,
    ledger: Ledger,
    place: String,
}

fn open(cfg: &Config, role: &str) -> Result<Side> {
    let wal = cfg.open_wal()?;
    let place = wal.place().to_owned();
    let fresh = wal.durable_lsn()? == 0;
    if role == "destination" && !fresh {
        return Err(VaultError::config(
            &place,
            "the destination already holds a vault's log; migrate into a new schema or an empty data directory",
        ));
    }
    let ledger = cfg.open_ledger(wal.clone())?;
    let data_dir = cfg.resolve(&cfg.data_dir);
    let engine = Engine::open_with(
        &data_dir,
        cfg.load_root_key()?,
        cfg.load_schema()?,
        wal,
        &cfg.pad_place()?,
        || Ok(()),
    )?;
    if role == "destination" && !engine.store().data_keys.is_empty() {
        return Err(VaultError::config(
            data_dir.display().to_string(),
            "the destination's data directory already holds a vault; use an empty one",
        ));
    }
    if role == "source" {
        recovery::reconcile(&engine, &ledger, &data_dir, &data_dir.join("ledger"))?;
    }
    Ok(Side {
        engine,
        ledger,
        place,
    })
}

/// Copies the vault `from` names into the (empty) storage `to` names, and
/// checks `sample` customers on both sides; `report` gets a line per step.
pub fn migrate(
    from: &Config,
    to: &Config,
    sample: usize,
    report: &mut dyn FnMut(String),
) -> Result<Migrated> {
    let same_key = KeyRing::new(from.load_root_key()?).check_value()
        == KeyRing::new(to.load_root_key()?).check_value();
    if !same_key {
        return Err(VaultError::config(
            "root key",
            "the two configurations name different root keys: a migration copies one vault, under one root key",
        ));
    }
    let src = open(from, "source")?;
    report(format!("source: {} (checked at start)", src.place));
    let dst = open(to, "destination")?;
    if src.place == dst.place {
        return Err(VaultError::config(
            &dst.place,
            "the source and the destination are the same",
        ));
    }
    if src.ledger.verifier_key() != dst.ledger.verifier_key() {
        return Err(VaultError::config(
            "[ledger]",
            "the two configurations name different ledger keys or origins: the copied checkpoints would not verify",
        ));
    }
    report(format!("destination: {} (empty)", dst.place));

    let size = src.ledger.size();
    let mut at = 0;
    while at < size {
        let end = (at + ENTRY_BATCH).min(size);
        let batch = (at..end)
            .map(|i| src.ledger.entry(i).map(|(bytes, _)| bytes))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        dst.ledger.import(&batch)?;
        at = end;
    }
    report(format!("ledger: {size} entries copied"));
    let (writes, pads) = src.engine.store().copy_into(dst.engine.store())?;
    report(format!("vault: {writes} keys and {pads} pads copied"));
    // INVARIANT: durable before anything is checked or reported as done.
    dst.engine.store().flush()?;
    dst.ledger.flush_view()?;

    let data_dir = to.resolve(&to.data_dir);
    recovery::reconcile(
        &dst.engine,
        &dst.ledger,
        &data_dir,
        &data_dir.join("ledger"),
    )?;
    let (a, b) = (src.ledger.tree_root(size)?, dst.ledger.tree_root(size)?);
    if a != b || dst.ledger.size() != size {
        return Err(VaultError::integrity(format!(
            "the destination's ledger (size {}, root {}) is not the source's (size {size}, root {})",
            dst.ledger.size(),
            hex::encode(b),
            hex::encode(a)
        )));
    }
    report(format!(
        "ledger: the same root at size {size} on both sides: {}",
        hex::encode(a)
    ));
    let (sampled, erased) = compare_sample(&src.engine, &dst.engine, sample)?;
    report(format!(
        "sample: {sampled} customers decrypted on both sides, every field the same ({erased} erased on both)"
    ));
    Ok(Migrated {
        from: src.place,
        to: dst.place,
        entries: size,
        root: hex::encode(a),
        writes,
        pads,
        sampled,
        erased,
    })
}

/// Decrypts up to `n` customers, spread over the source's data keys, on
/// both sides and compares every field; returns (compared, erased on both).
fn compare_sample(src: &Engine, dst: &Engine, n: usize) -> Result<(usize, usize)> {
    let refs: Vec<(String, crate::crypto::keys::CustomerRef)> = src
        .store()
        .data_keys
        .iter()
        .keys()
        .map(|k| {
            let k = k?;
            store::split_data_key(&k)
                .ok_or_else(|| VaultError::integrity("a data key's storage key"))
        })
        .collect::<Result<_>>()?;
    let step = (refs.len() / n.max(1)).max(1);
    let mut compared = 0;
    let mut erased = 0;
    for (tenant, r) in refs.iter().step_by(step).take(n) {
        let shown = || format!("customer reference {}", hex::encode(r.0));
        let id = match (src.customer_id(tenant, r), dst.customer_id(tenant, r)) {
            (Ok(a), Ok(b)) if a == b => a,
            (Err(VaultError::NotFound(_)), Err(VaultError::NotFound(_))) => {
                erased += 1;
                compared += 1;
                continue;
            }
            _ => {
                return Err(VaultError::integrity(format!(
                    "{}: its customer id differs between the two sides",
                    shown()
                )))
            }
        };
        let (_, a) = src.get(tenant, &id, &[])?;
        let (_, b) = dst.get(tenant, &id, &[])?;
        let same = a.len() == b.len()
            && a.iter().zip(&b).all(|(x, y)| {
                x.def.name == y.def.name
                    && x.value == y.value
                    && x.version == y.version
                    && x.collected_at_ms == y.collected_at_ms
            });
        if !same {
            return Err(VaultError::integrity(format!(
                "{}: its fields differ between the two sides",
                shown()
            )));
        }
        compared += 1;
    }
    Ok((compared, erased))
}
