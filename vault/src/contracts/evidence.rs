//! A contract instance's evidence report: every `contract_event` entry of
//! the instance with its inclusion proof against a signed checkpoint, and
//! per obligation when it was due and when and by whom it was kept,
//! escalated or cancelled. The obligations are derived from the entries;
//! [`verify`] derives them again offline and refuses a report whose
//! entries do not prove, or whose obligations say anything the entries do
//! not, naming what failed. The format is in docs/contracts.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sovra_ledger::{
    verify_checkpoint, verify_proven_entry, Body, BundleEntry, ContractStep, Digest, Entry,
};

use crate::access::auth::Principal;
use crate::error::{Result, VaultError};

/// The report's format name.
pub const FORMAT: &str = "sovra-contract-evidence";
/// The report's format version.
pub const VERSION: u32 = 1;
/// Largest report [`verify`] reads.
pub const MAX_REPORT_BYTES: usize = 64 * 1024 * 1024;

/// One obligation (an action of the instance) as the entries show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Obligation {
    /// The action's id.
    pub action: String,
    /// Its kind.
    pub kind: String,
    /// The entry that queued (or denied) it.
    pub queued_entry: u64,
    /// When it was due (ms; 0: no deadline).
    pub due_ms: i64,
    /// `kept`, `kept_late`, `escalated` (due, not kept), `cancelled`,
    /// `failed` (retries exhausted), `denied` (policy refused it) or
    /// `pending`.
    pub outcome: String,
    /// When it was kept, cancelled or failed (ms; 0: not yet).
    pub at_ms: i64,
    /// Who kept it (the connector principal), or who cancelled it.
    pub by: String,
    /// The entry of that step (0: none).
    pub outcome_entry: u64,
    /// Whom it was escalated to ("" when it was not).
    pub escalated_to: String,
    /// The escalation's entry (0: none).
    pub escalated_entry: u64,
    /// Failures reported by connectors.
    pub failures: u32,
}

/// An evidence report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The log's origin.
    pub origin: String,
    /// The log's verifier key (pin your own copy).
    pub verifier_key: String,
    /// The signed checkpoint every proof is against.
    pub checkpoint: String,
    /// The tenant.
    pub tenant: String,
    /// The customer's pseudonym (hex).
    pub subject: String,
    /// The contract.
    pub contract: String,
    /// Its version.
    pub contract_version: u32,
    /// Its pin (hex).
    pub contract_sha256: String,
    /// The instance.
    pub instance: u64,
    /// When the report was made (ms).
    pub generated_at_ms: i64,
    /// The instance's entries, in log order.
    pub entries: Vec<BundleEntry>,
    /// Its obligations, derived from the entries.
    pub obligations: Vec<Obligation>,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries proven.
    pub entries: usize,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// Whether the key was the caller's own.
    pub key_pinned: bool,
    /// The obligations, as derived from the entries.
    pub obligations: Vec<Obligation>,
}

/// Builds the evidence report of `instance` (see the proto's `GetEvidence`).
pub fn build(
    runtime: &super::runtime::Runtime,
    ledger: &sovra_ledger::Ledger,
    p: &Principal,
    instance: u64,
) -> Result<Report> {
    let (view, subject, indexes) = runtime.instance_entries(p, instance)?;
    let (checkpoint, entries) = ledger.prove_entries(&indexes)?;
    let decoded: Vec<Entry> = entries
        .iter()
        .map(|be| {
            let bytes = base64::Engine::decode(&base64::prelude::BASE64_STANDARD, &be.entry)
                .map_err(|_| VaultError::internal("an entry the ledger proved is not base64"))?;
            Ok(Entry::decode(&bytes)?)
        })
        .collect::<Result<_>>()?;
    let obligations = derive(&decoded);
    Ok(Report {
        format: FORMAT.into(),
        version: VERSION,
        origin: ledger.origin().to_owned(),
        verifier_key: ledger.verifier_key(),
        checkpoint,
        tenant: p.tenant.clone(),
        subject: subject.to_hex(),
        contract: view.contract,
        contract_version: view.version,
        contract_sha256: view.sha256,
        instance,
        generated_at_ms: crate::clock::now_ms(),
        entries,
        obligations,
    })
}

/// Derives the obligations from an instance's entries (in log order).
pub fn derive(entries: &[Entry]) -> Vec<Obligation> {
    let mut by_id: BTreeMap<String, Obligation> = BTreeMap::new();
    let mut order = Vec::new();
    for e in entries {
        let Body::ContractEvent(ev) = &e.body else {
            continue;
        };
        if ev.action.is_empty() {
            continue;
        }
        let d: serde_json::Value = serde_json::from_str(&ev.detail).unwrap_or_default();
        let ts = i64::try_from(e.timestamp_ms).unwrap_or(i64::MAX);
        let o = by_id.entry(ev.action.clone()).or_insert_with(|| {
            order.push(ev.action.clone());
            Obligation {
                action: ev.action.clone(),
                kind: String::new(),
                queued_entry: 0,
                due_ms: 0,
                outcome: "pending".into(),
                at_ms: 0,
                by: String::new(),
                outcome_entry: 0,
                escalated_to: String::new(),
                escalated_entry: 0,
                failures: 0,
            }
        });
        match ev.step {
            ContractStep::ActionQueued | ContractStep::ActionDenied => {
                o.queued_entry = e.seq;
                o.kind = d["kind"].as_str().unwrap_or_default().to_owned();
                o.due_ms = d["due_ms"].as_i64().unwrap_or(0);
                if ev.step == ContractStep::ActionDenied {
                    o.outcome = "denied".into();
                    o.outcome_entry = e.seq;
                    o.at_ms = ts;
                }
            }
            ContractStep::ActionCompleted => {
                o.outcome = if o.due_ms > 0 && ts > o.due_ms {
                    "kept_late"
                } else {
                    "kept"
                }
                .into();
                o.at_ms = ts;
                o.by = ev.actor.clone();
                o.outcome_entry = e.seq;
            }
            ContractStep::Escalated => {
                o.escalated_to = d["to"].as_str().unwrap_or_default().to_owned();
                o.escalated_entry = e.seq;
                if o.outcome == "pending" {
                    o.outcome = "escalated".into();
                }
            }
            ContractStep::Cancelled => {
                o.outcome = "cancelled".into();
                o.at_ms = ts;
                o.by = ev.actor.clone();
                o.outcome_entry = e.seq;
            }
            ContractStep::ActionFailed => {
                o.failures += 1;
                if d["gave_up"].as_bool() == Some(true) {
                    o.outcome = "failed".into();
                    o.at_ms = ts;
                    o.by = ev.actor.clone();
                    o.outcome_entry = e.seq;
                }
            }
            _ => {}
        }
    }
    order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect()
}

/// Verifies a report offline (with the log's key as the officer holds it
/// when given): the checkpoint's signature, every entry's inclusion,
/// that every entry is of this tenant, customer, contract, pin and
/// instance, and that the obligations are what the entries say.
pub fn verify(json: &[u8], trusted_key: Option<&str>) -> Result<Verified> {
    let bad = |m: String| VaultError::integrity(format!("evidence report: {m}"));
    if json.len() > MAX_REPORT_BYTES {
        return Err(VaultError::invalid(
            "report",
            format!("{} bytes; at most {MAX_REPORT_BYTES}", json.len()),
        ));
    }
    let r: Report = serde_json::from_slice(json).map_err(|e| {
        VaultError::invalid("report", format!("not a contract evidence report: {e}"))
    })?;
    if r.format != FORMAT || r.version != VERSION {
        return Err(VaultError::invalid(
            "report",
            format!(
                "format `{:.40}` version {}; this verifier reads `{FORMAT}` version {VERSION}",
                r.format, r.version
            ),
        ));
    }
    let key = trusted_key
        .map(str::trim)
        .unwrap_or(r.verifier_key.as_str());
    if trusted_key.is_some() && key != r.verifier_key.trim() {
        return Err(bad(
            "it names a different verifier key than the one given: it is not from the log you trust".into(),
        ));
    }
    let cp = verify_checkpoint(r.checkpoint.as_bytes(), key)
        .map_err(|e| bad(format!("checkpoint: {e}")))?;
    if cp.origin != r.origin {
        return Err(bad(format!(
            "checkpoint: origin `{}` differs from the report's `{:.80}`",
            cp.origin, r.origin
        )));
    }
    let subject = Digest::from_hex(&r.subject).map_err(|e| bad(format!("subject: {e}")))?;
    let pin =
        Digest::from_hex(&r.contract_sha256).map_err(|e| bad(format!("contract_sha256: {e}")))?;
    let mut entries = Vec::with_capacity(r.entries.len());
    let mut prev = None;
    for (pos, be) in r.entries.iter().enumerate() {
        let at = |m: String| bad(format!("entry {} (position {pos}): {m}", be.index));
        if prev.is_some_and(|p| be.index <= p) {
            return Err(at("indexes must increase".into()));
        }
        prev = Some(be.index);
        let e = verify_proven_entry(be, &cp).map_err(|e| at(e.to_string()))?;
        match &e.body {
            Body::ContractEvent(ev)
                if ev.tenant == r.tenant
                    && ev.subject == subject
                    && ev.contract == r.contract
                    && ev.version == r.contract_version
                    && ev.contract_sha256 == pin
                    && ev.instance == r.instance => {}
            _ => {
                return Err(at(
                    "it is not a step of this contract instance (tenant, customer, contract, pin or instance differ)".into(),
                ))
            }
        }
        entries.push(e);
    }
    let first = entries.first().map(|e| match &e.body {
        Body::ContractEvent(ev) => ev.step,
        _ => ContractStep::Failed,
    });
    if !matches!(first, Some(ContractStep::Evaluated | ContractStep::Failed)) {
        return Err(bad(
            "its first entry is not the instance's evaluation: entries were left out".into(),
        ));
    }
    let derived = derive(&entries);
    if derived.len() != r.obligations.len() {
        return Err(bad(format!(
            "it claims {} obligations; its entries show {}",
            r.obligations.len(),
            derived.len()
        )));
    }
    for (claimed, found) in r.obligations.iter().zip(&derived) {
        if claimed != found {
            return Err(bad(format!(
                "obligation `{:.80}`: the report says {} at {} by `{:.80}`; its entries say {} at {} by `{}`",
                claimed.action,
                claimed.outcome,
                claimed.at_ms,
                claimed.by,
                found.outcome,
                found.at_ms,
                found.by
            )));
        }
    }
    Ok(Verified {
        entries: entries.len(),
        tree_size: cp.size,
        key_pinned: trusted_key.is_some(),
        obligations: derived,
    })
}
