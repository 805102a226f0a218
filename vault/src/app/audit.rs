//! Consent and audit: recording consent, a customer's consent state, the
//! ledger's checkpoints, proofs and entries, audit bundles, and rebuilding
//! the consent view from the log.
//!
//! Guarantees: every use case is authorised by the policy set in force
//! before it reads or writes; a consent receipt is returned only once its
//! entry is durable and covered by a signed checkpoint; inputs are checked
//! as identifiers before they reach an entry, so no free text (and so no
//! personal data) can be smuggled into the ledger; a principal sees only
//! its own tenant's entries, proofs and bundles.
//!
//! Does not guarantee: that a customer's consent recorded here is genuine;
//! the evidence digest is what ties it to the form or recording the caller
//! keeps.

use std::sync::Arc;

use futures::Stream;
use sovra_ledger::entry::Consent;
use sovra_ledger::{
    AuditBundle, Body, ConsentAction, ConsentStatus, Digest, Entry, Ledger, Receipt,
    SignedCheckpoint,
};
use sovra_policy::Action;

use super::App;
use crate::access::auth::Principal;
use crate::engine::{validate_id, MAX_CUSTOMER_ID_LEN};
use crate::error::{Result, VaultError};

/// Legal bases accepted for a consent record (GDPR Art. 6(1); PIPL Art. 13
/// maps onto them).
pub const LEGAL_BASES: &[&str] = &[
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
];
/// Most entries one entries call streams.
pub const MAX_ENTRIES_PER_CALL: u64 = 100_000;

/// A consent given or withdrawn.
#[derive(Debug, Clone)]
pub struct ConsentRequest {
    /// The customer.
    pub customer_id: String,
    /// The purpose, one of the schema's.
    pub purpose: String,
    /// Grant or withdraw; `None` if the request named neither.
    pub action: Option<ConsentAction>,
    /// Where it was collected.
    pub channel: String,
    /// One of [`LEGAL_BASES`].
    pub legal_basis: String,
    /// The notice the customer saw.
    pub notice_version: String,
    /// SHA-256 of the evidence the caller keeps (32 bytes).
    pub evidence_sha256: Vec<u8>,
}

/// A recorded consent: its entry, its receipt and the customer's pseudonym.
#[derive(Debug, Clone)]
pub struct ConsentRecorded {
    /// The entry's index.
    pub index: u64,
    /// The receipt (entry, inclusion proof, checkpoint).
    pub receipt: Receipt,
    /// The customer's pseudonym.
    pub subject: Digest,
}

/// A customer's consent state.
#[derive(Debug, Clone)]
pub struct ConsentState {
    /// The customer's pseudonym.
    pub subject: Digest,
    /// The latest grant or withdrawal per purpose.
    pub purposes: Vec<ConsentStatus>,
}

/// A customer's audit bundle, rendered.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Entries in it.
    pub entries: u64,
    /// The tree size its checkpoint signs.
    pub tree_size: u64,
    /// The bundle as JSON (the format offline verifiers read).
    pub json: String,
}

/// One entry of the log as the caller may see it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Its index.
    pub index: u64,
    /// Its encoded bytes (what the leaf hash covers).
    pub bytes: Vec<u8>,
    /// Decoded.
    pub entry: Entry,
}

/// Which consents, bundles and rebuilds: the window of a bundle.
#[derive(Debug, Clone, Copy, Default)]
pub struct BundleWindow {
    /// From this time (ms; 0: from the start).
    pub from_ms: u64,
    /// Up to this time (ms; 0: until now).
    pub to_ms: u64,
    /// Also prove consistency from this tree size (0: no proof).
    pub consistency_from_size: u64,
}

impl App {
    /// Records a consent grant or withdrawal, durably, and returns its
    /// receipt.
    pub async fn record_consent(
        &self,
        p: &Principal,
        r: ConsentRequest,
    ) -> Result<ConsentRecorded> {
        self.authorize(p, Action::RecordConsent)?;
        let intent = self.engine.intent();
        let (body, created) = self.consent_entry(p, &r)?;
        let subject = body.subject().copied().unwrap_or_default();
        let trigger = match &body {
            Body::ConsentWithdrawn(_) => "consent_withdrawn",
            _ => "consent_granted",
        };
        let index = if created {
            // A customer first seen here got a data key: make it durable
            // before the entry that names its pseudonym.
            drop(intent);
            self.engine.commit().await?;
            self.audit(body).await?
        } else {
            self.audit_announced(body, intent).await?
        };
        // The contracts' inbox, after the entry (the runtime reads the
        // consent state it changed); durable with the next commit, and
        // written again on this request's retry.
        if self.engine.contract_hooks().listens(&p.tenant, trigger) {
            self.engine
                .contract_inbox(&p.tenant, trigger, &r.purpose, &r.customer_id, &subject)?;
            self.engine.commit().await?;
        }
        let receipt = self.ledger.receipt(index)?;
        tracing::info!(principal = %p.name, index, purpose = %r.purpose, "consent recorded");
        Ok(ConsentRecorded {
            index,
            receipt,
            subject,
        })
    }

    /// The consent entry, and whether the customer's data key was created
    /// for it.
    fn consent_entry(&self, p: &Principal, r: &ConsentRequest) -> Result<(Body, bool)> {
        validate_id("customer_id", &r.customer_id, MAX_CUSTOMER_ID_LEN)?;
        self.engine.schema().check_purpose(&r.purpose)?;
        let action = r.action.ok_or_else(|| {
            VaultError::invalid(
                "action",
                "must be CONSENT_ACTION_GRANT or CONSENT_ACTION_WITHDRAW",
            )
        })?;
        validate_id("channel", &r.channel, 64)?;
        if !LEGAL_BASES.contains(&r.legal_basis.as_str()) {
            let shown: String = r.legal_basis.chars().take(40).collect();
            return Err(VaultError::invalid(
                "legal_basis",
                format!(
                    "unknown legal basis `{shown}`; one of {}",
                    LEGAL_BASES.join(", ")
                ),
            ));
        }
        validate_id("notice_version", &r.notice_version, 64)?;
        let evidence = <[u8; 32]>::try_from(r.evidence_sha256.as_slice()).map_err(|_| {
            VaultError::invalid(
                "evidence_sha256",
                format!(
                    "must be the 32-byte SHA-256 digest of the evidence, got {} bytes; hash the evidence and keep it yourself, never send it",
                    r.evidence_sha256.len()
                ),
            )
        })?;
        let (subject, created) = self.engine.ensure_pseudonym(&p.tenant, &r.customer_id)?;
        let c = Consent {
            tenant: p.tenant.clone(),
            subject,
            purpose: r.purpose.clone(),
            channel: r.channel.clone(),
            legal_basis: r.legal_basis.clone(),
            notice_version: r.notice_version.clone(),
            evidence_sha256: Digest(evidence),
            actor: p.name.clone(),
        };
        Ok(match action {
            ConsentAction::Grant => (Body::ConsentGranted(c), created),
            ConsentAction::Withdraw => (Body::ConsentWithdrawn(c), created),
        })
    }

    /// A customer's consent state, per purpose.
    pub fn consent_state(&self, p: &Principal, customer_id: &str) -> Result<ConsentState> {
        self.authorize(p, Action::ReadConsent)?;
        validate_id("customer_id", customer_id, MAX_CUSTOMER_ID_LEN)?;
        let subject = self.linked_subject(p, customer_id)?;
        Ok(ConsentState {
            subject,
            purposes: self.ledger.consent_state(&subject)?,
        })
    }

    /// The customer's pseudonym, if it can still be linked to them.
    fn linked_subject(&self, p: &Principal, customer: &str) -> Result<Digest> {
        self.engine
            .pseudonym(&p.tenant, customer, false)
            .map_err(|e| match e {
                VaultError::NotFound(_) => VaultError::not_found_because(format!(
                    "customer `{customer}` has no pseudonym: never seen, or erased (an erased customer's entries stay in the ledger but can no longer be linked to them)"
                )),
                e => e,
            })
    }

    /// The latest signed checkpoint.
    pub fn checkpoint(&self, p: &Principal) -> Result<SignedCheckpoint> {
        self.authorize(p, Action::ReadAudit)?;
        Ok(self.ledger.checkpoint()?)
    }

    /// The log's verifier key (C2SP note verifier).
    pub fn verifier_key(&self) -> String {
        self.ledger.verifier_key()
    }

    /// The inclusion proof of one of the caller's tenant's entries in the
    /// tree of `tree_size` (0: the latest checkpoint's), with the entry;
    /// returns the size used.
    pub fn inclusion_proof(
        &self,
        p: &Principal,
        index: u64,
        tree_size: u64,
    ) -> Result<(u64, Vec<[u8; 32]>, Vec<u8>)> {
        self.authorize(p, Action::ReadAudit)?;
        let size = self.size_or_latest(tree_size)?;
        let hashes = self.ledger.inclusion_proof(index, size)?;
        let (entry, decoded) = self.ledger.entry(index)?;
        // INVARIANT: the entry is checked before anything of it (or of its
        // proof) leaves; the same answer for every foreign entry, so the
        // reply tells only what the indexes already show.
        if !decoded.body.visible_to(&p.tenant) {
            return Err(VaultError::not_found_because(format!(
                "entry {index} is not an entry of tenant `{}`",
                p.tenant
            )));
        }
        Ok((size, hashes, entry))
    }

    /// The consistency proof between two tree sizes (`to_size` 0: the
    /// latest checkpoint's); returns the size used.
    pub fn consistency_proof(
        &self,
        p: &Principal,
        from_size: u64,
        to_size: u64,
    ) -> Result<(u64, Vec<[u8; 32]>)> {
        self.authorize(p, Action::ReadAudit)?;
        let to = self.size_or_latest(to_size)?;
        let hashes = self.ledger.consistency_proof(from_size, to)?;
        Ok((to, hashes))
    }

    fn size_or_latest(&self, size: u64) -> Result<u64> {
        Ok(if size == 0 {
            self.ledger.checkpoint()?.size
        } else {
            size
        })
    }

    /// The caller's tenant's entries in `start..end` (`end` 0: every
    /// committed entry), as a lazy stream: an entry is read only when the
    /// consumer asks for the next one, so a consumer that stops reading
    /// holds no thread and nothing more than what it was given; entries of
    /// other tenants are skipped (their indexes show as gaps).
    pub fn entries(
        &self,
        p: &Principal,
        start: u64,
        end: u64,
    ) -> Result<impl Stream<Item = Result<LogEntry>> + Send + 'static> {
        self.authorize(p, Action::ReadAudit)?;
        let size = self.ledger.durable_size();
        let end = if end == 0 { size } else { end };
        if end > size {
            return Err(VaultError::out_of_range(format!(
                "end {end} is beyond the log, which holds {size} committed entries"
            )));
        }
        if start > end {
            return Err(VaultError::invalid(
                "start",
                format!("{start} is after end {end}"),
            ));
        }
        if end - start > MAX_ENTRIES_PER_CALL {
            return Err(VaultError::invalid(
                "range",
                format!(
                    "{} entries; at most {MAX_ENTRIES_PER_CALL} per call",
                    end - start
                ),
            ));
        }
        Ok(visible_entries(
            self.ledger.clone(),
            p.tenant.clone(),
            start,
            end,
        ))
    }

    /// A customer's audit bundle: every entry about them in the window,
    /// with proofs and a checkpoint, for offline verification.
    pub async fn audit_bundle(
        &self,
        p: &Principal,
        customer_id: &str,
        w: BundleWindow,
    ) -> Result<Bundle> {
        self.authorize(p, Action::ReadAudit)?;
        validate_id("customer_id", customer_id, MAX_CUSTOMER_ID_LEN)?;
        let subject = self.linked_subject(p, customer_id)?;
        let nz = |v: u64| (v != 0).then_some(v);
        let (ledger, tenant) = (self.ledger.clone(), p.tenant.clone());
        let bundle: AuditBundle = tokio::task::spawn_blocking(move || {
            ledger.export_bundle(
                &tenant,
                &subject,
                nz(w.from_ms),
                nz(w.to_ms),
                nz(w.consistency_from_size),
            )
        })
        .await
        .map_err(|_| VaultError::internal("the bundle task"))??;
        let json = serde_json::to_string_pretty(&bundle)
            .map_err(|_| VaultError::internal("rendering the bundle"))?;
        let tree_size =
            sovra_ledger::verify_checkpoint(bundle.checkpoint.as_bytes(), &bundle.verifier_key)?
                .size;
        tracing::info!(principal = %p.name, entries = bundle.entries.len(), "audit bundle exported");
        Ok(Bundle {
            entries: bundle.entries.len() as u64,
            tree_size,
            json,
        })
    }

    /// Rebuilds the caller's tenant's consent view from the log; returns
    /// the customers corrected and the entries read.
    pub async fn rebuild_consent_state(&self, p: &Principal) -> Result<(u64, u64)> {
        self.authorize(p, Action::RebuildConsent)?;
        let (ledger, tenant) = (self.ledger.clone(), p.tenant.clone());
        let (corrected, entries) = tokio::task::spawn_blocking(move || {
            // Only the caller's tenant's customers: another tenant's consent
            // state is not this admin's to change.
            ledger
                .rebuild_consent_view_for(Some(&tenant))
                .map(|c| (c as u64, ledger.size()))
        })
        .await
        .map_err(|_| VaultError::internal("the rebuild task"))??;
        tracing::info!(principal = %p.name, corrected, entries, "consent view rebuilt");
        Ok((corrected, entries))
    }
}

/// The entries of `tenant` in `start..end`, read one at a time as asked.
fn visible_entries(
    ledger: Arc<Ledger>,
    tenant: String,
    start: u64,
    end: u64,
) -> impl Stream<Item = Result<LogEntry>> + Send + 'static {
    // The state carries the ledger and tenant, so nothing is cloned per
    // entry; `None` ends the stream (after an error).
    futures::stream::unfold(Some((ledger, tenant, start)), move |state| async move {
        let (ledger, tenant, mut i) = state?;
        // A long run of other tenants' entries yields to the runtime in
        // between.
        let mut skipped = 0u32;
        while i < end {
            let here = i;
            i += 1;
            match ledger.entry(here) {
                Err(e) => return Some((Err(e.into()), None)),
                Ok((bytes, entry)) if entry.body.visible_to(&tenant) => {
                    let item = LogEntry {
                        index: here,
                        bytes,
                        entry,
                    };
                    return Some((Ok(item), Some((ledger, tenant, i))));
                }
                Ok(_) => {
                    skipped += 1;
                    if skipped % 1024 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        None
    })
}
