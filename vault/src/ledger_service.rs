//! The gRPC `Ledger` service: consent recording, consent state, checkpoints,
//! proofs, entries and audit bundles.
//!
//! Guarantees: every RPC authenticates and asks the policy layer (see `policy.rs`)
//! before it reads or writes; a consent receipt is returned only once its
//! entry is durable and covered by a signed checkpoint; inputs are validated
//! as identifiers before they reach an entry, so no free text (and so no
//! personal data) can be smuggled into the ledger.
//!
//! Does not guarantee: that a customer's consent recorded here is genuine;
//! the evidence digest is what ties it to the form or recording the caller
//! keeps.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sovra_ledger::entry::Consent;
use sovra_ledger::{Body, ConsentAction, Digest, LedgerError};
use sovra_proto::ledger::v1 as pb;
use sovra_proto::ledger::v1::ledger_server::Ledger as LedgerRpc;
use tonic::{Request, Response, Status};

use crate::auth::Principal;
use crate::engine::{validate_id, MAX_CUSTOMER_ID_LEN};
use crate::error::VaultError;
use crate::service::{to_status, Shared};
use sovra_policy::Action;

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
/// Most entries one GetEntries call streams.
pub const MAX_ENTRIES_PER_CALL: u64 = 100_000;

fn ledger_status(e: LedgerError) -> Status {
    to_status(e.into())
}

fn action_pb(a: ConsentAction) -> i32 {
    match a {
        ConsentAction::Grant => pb::ConsentAction::Grant as i32,
        ConsentAction::Withdraw => pb::ConsentAction::Withdraw as i32,
    }
}

/// The `Ledger` service.
#[derive(Debug, Clone)]
pub struct LedgerService {
    shared: Shared,
}

impl LedgerService {
    /// A service over the vault's engine (for pseudonyms) and ledger.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn principal<T>(&self, req: &Request<T>, action: Action) -> Result<Arc<Principal>, Status> {
        self.shared.principal(req, action)
    }

    /// The consent entry, and whether the customer's data key was created
    /// for it.
    fn parse_consent(
        &self,
        p: &Principal,
        r: &pb::RecordConsentRequest,
    ) -> Result<(Body, bool), VaultError> {
        validate_id("customer_id", &r.customer_id, MAX_CUSTOMER_ID_LEN)?;
        self.shared.engine.schema().check_purpose(&r.purpose)?;
        let action = match pb::ConsentAction::try_from(r.action) {
            Ok(pb::ConsentAction::Grant) => ConsentAction::Grant,
            Ok(pb::ConsentAction::Withdraw) => ConsentAction::Withdraw,
            _ => {
                return Err(VaultError::invalid(
                    "action",
                    "must be CONSENT_ACTION_GRANT or CONSENT_ACTION_WITHDRAW",
                ))
            }
        };
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
        let (subject, created) = self
            .shared
            .engine
            .ensure_pseudonym(&p.tenant, &r.customer_id)?;
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

    fn linked_subject(&self, p: &Principal, customer: &str) -> Result<Digest, Status> {
        self.shared.engine
            .pseudonym(&p.tenant, customer, false)
            .map_err(|e| match e {
                VaultError::NotFound(_) => Status::not_found(format!(
                    "customer `{customer}` has no pseudonym: never seen, or erased (an erased customer's entries stay in the ledger but can no longer be linked to them)"
                )),
                e => to_status(e),
            })
    }

    fn latest_size(&self) -> Result<u64, Status> {
        Ok(self.shared.ledger.checkpoint().map_err(ledger_status)?.size)
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<pb::LogEntry, Status>> + Send>>;

#[tonic::async_trait]
impl LedgerRpc for LedgerService {
    async fn record_consent(
        &self,
        req: Request<pb::RecordConsentRequest>,
    ) -> Result<Response<pb::ConsentReceipt>, Status> {
        let p = self.principal(&req, Action::RecordConsent)?;
        let r = req.into_inner();
        let (body, created) = self.parse_consent(&p, &r).map_err(to_status)?;
        let subject = body.subject().copied().unwrap_or_default();
        if created {
            // A customer first seen here got a data key: make it durable
            // before the entry that names its pseudonym.
            self.shared.engine.commit().await.map_err(to_status)?;
        }
        let appended = self
            .shared
            .ledger
            .append_durable(std::slice::from_ref(&body))
            .await
            .map_err(ledger_status)?;
        let index = appended.first().map_or(0, |a| a.index);
        let receipt = self.shared.ledger.receipt(index).map_err(ledger_status)?;
        tracing::info!(principal = %p.name, index, purpose = %r.purpose, "consent recorded");
        Ok(Response::new(pb::ConsentReceipt {
            index,
            entry: receipt.entry,
            proof: receipt.proof.to_text(),
            verifier_key: self.shared.ledger.verifier_key(),
            subject: subject.to_hex(),
        }))
    }

    async fn get_consent_state(
        &self,
        req: Request<pb::GetConsentStateRequest>,
    ) -> Result<Response<pb::ConsentState>, Status> {
        let p = self.principal(&req, Action::ReadConsent)?;
        let r = req.into_inner();
        validate_id("customer_id", &r.customer_id, MAX_CUSTOMER_ID_LEN).map_err(to_status)?;
        let subject = self.linked_subject(&p, &r.customer_id)?;
        let purposes = self
            .shared
            .ledger
            .consent_state(&subject)
            .map_err(ledger_status)?
            .into_iter()
            .map(|c| pb::PurposeConsent {
                purpose: c.purpose,
                action: action_pb(c.action),
                index: c.index,
                timestamp_ms: c.timestamp_ms,
            })
            .collect();
        Ok(Response::new(pb::ConsentState {
            customer_id: r.customer_id,
            subject: subject.to_hex(),
            purposes,
        }))
    }

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::Checkpoint>, Status> {
        self.principal(&req, Action::ReadAudit)?;
        let cp = self.shared.ledger.checkpoint().map_err(ledger_status)?;
        Ok(Response::new(pb::Checkpoint {
            note: String::from_utf8_lossy(&cp.note).into_owned(),
            tree_size: cp.size,
            root_hash: cp.root.to_vec(),
            verifier_key: self.shared.ledger.verifier_key(),
            origin: cp.origin,
        }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProof>, Status> {
        let p = self.principal(&req, Action::ReadAudit)?;
        let r = req.into_inner();
        let size = if r.tree_size == 0 {
            self.latest_size()?
        } else {
            r.tree_size
        };
        let hashes = self
            .shared
            .ledger
            .inclusion_proof(r.index, size)
            .map_err(ledger_status)?;
        let (entry, decoded) = self.shared.ledger.entry(r.index).map_err(ledger_status)?;
        // INVARIANT: the entry is checked before anything of it (or of its
        // proof) leaves; the same answer for every foreign entry, so the
        // reply tells only what the indexes already show.
        if !decoded.body.visible_to(&p.tenant) {
            return Err(Status::not_found(format!(
                "entry {} is not an entry of tenant `{}`",
                r.index, p.tenant
            )));
        }
        Ok(Response::new(pb::InclusionProof {
            index: r.index,
            tree_size: size,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            entry,
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProof>, Status> {
        self.principal(&req, Action::ReadAudit)?;
        let r = req.into_inner();
        let to = if r.to_size == 0 {
            self.latest_size()?
        } else {
            r.to_size
        };
        let hashes = self
            .shared
            .ledger
            .consistency_proof(r.from_size, to)
            .map_err(ledger_status)?;
        Ok(Response::new(pb::ConsistencyProof {
            from_size: r.from_size,
            to_size: to,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    type GetEntriesStream = EntryStream;

    async fn get_entries(
        &self,
        req: Request<pb::GetEntriesRequest>,
    ) -> Result<Response<Self::GetEntriesStream>, Status> {
        let p = self.principal(&req, Action::ReadAudit)?;
        let r = req.into_inner();
        let size = self.shared.ledger.durable_size();
        let end = if r.end == 0 { size } else { r.end };
        if end > size {
            return Err(Status::out_of_range(format!(
                "end {end} is beyond the log, which holds {size} committed entries"
            )));
        }
        if r.start > end {
            return Err(Status::invalid_argument(format!(
                "invalid `start`: {} is after end {end}",
                r.start
            )));
        }
        if end - r.start > MAX_ENTRIES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "invalid range: {} entries; at most {MAX_ENTRIES_PER_CALL} per call",
                end - r.start
            )));
        }
        // A lazy stream, not a task: an entry is read and rendered only when
        // the transport asks for the next one, so a client that stops
        // reading holds no thread and no more than HTTP/2's flow-control
        // window of encoded entries (backpressure); a cancelled call drops
        // the stream and everything it holds.
        let ledger = self.shared.ledger.clone();
        let tenant = p.tenant.clone();
        // The state carries the ledger and tenant, so nothing is cloned per
        // entry; `None` ends the stream (after an error).
        let stream = futures::stream::unfold(Some((ledger, tenant, r.start)), move |state| {
            async move {
                let (ledger, tenant, mut i) = state?;
                // Entries of other tenants are skipped (their indexes show as
                // gaps); a long run of them yields to the runtime in between.
                let mut skipped = 0u32;
                while i < end {
                    let item = ledger.entry(i).map_err(ledger_status);
                    let here = i;
                    i += 1;
                    match item {
                        Err(e) => return Some((Err(e), None)),
                        Ok((entry, e)) if e.body.visible_to(&tenant) => {
                            let item = serde_json::to_string(&e)
                                .map_err(|e| {
                                    Status::internal(format!("cannot render entry {here}: {e}"))
                                })
                                .map(|decoded_json| pb::LogEntry {
                                    index: here,
                                    entry,
                                    decoded_json,
                                });
                            let next = item.is_ok().then_some((ledger, tenant, i));
                            return Some((item, next));
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
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn export_audit_bundle(
        &self,
        req: Request<pb::ExportAuditBundleRequest>,
    ) -> Result<Response<pb::AuditBundle>, Status> {
        let p = self.principal(&req, Action::ReadAudit)?;
        let r = req.into_inner();
        validate_id("customer_id", &r.customer_id, MAX_CUSTOMER_ID_LEN).map_err(to_status)?;
        let subject = self.linked_subject(&p, &r.customer_id)?;
        let nz = |v: u64| (v != 0).then_some(v);
        let ledger = self.shared.ledger.clone();
        let tenant = p.tenant.clone();
        let bundle = tokio::task::spawn_blocking(move || {
            ledger.export_bundle(
                &tenant,
                &subject,
                nz(r.from_ms),
                nz(r.to_ms),
                nz(r.consistency_from_size),
            )
        })
        .await
        .map_err(|e| Status::internal(format!("bundle task failed: {e}")))?
        .map_err(ledger_status)?;
        let json = serde_json::to_string_pretty(&bundle)
            .map_err(|e| Status::internal(format!("cannot render the bundle: {e}")))?;
        tracing::info!(principal = %p.name, entries = bundle.entries.len(), "audit bundle exported");
        Ok(Response::new(pb::AuditBundle {
            entries: bundle.entries.len() as u64,
            tree_size: sovra_ledger::verify_checkpoint(
                bundle.checkpoint.as_bytes(),
                &bundle.verifier_key,
            )
            .map(|c| c.size)
            .map_err(ledger_status)?,
            json,
        }))
    }

    async fn rebuild_consent_state(
        &self,
        req: Request<pb::RebuildConsentStateRequest>,
    ) -> Result<Response<pb::RebuildConsentStateResponse>, Status> {
        let p = self.principal(&req, Action::RebuildConsent)?;
        let ledger = self.shared.ledger.clone();
        let tenant = p.tenant.clone();
        let (corrected, entries) = tokio::task::spawn_blocking(move || {
            // Only the caller's tenant's customers: another tenant's consent
            // state is not this admin's to change.
            ledger
                .rebuild_consent_view_for(Some(&tenant))
                .map(|c| (c as u64, ledger.size()))
        })
        .await
        .map_err(|e| Status::internal(format!("rebuild task failed: {e}")))?
        .map_err(ledger_status)?;
        tracing::info!(principal = %p.name, corrected, entries, "consent view rebuilt");
        Ok(Response::new(pb::RebuildConsentStateResponse {
            corrected,
            entries,
        }))
    }
}
