//! The gRPC `Ledger` service: decode, call the application layer
//! ([`crate::app::audit`]), encode.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use sovra_ledger::ConsentAction;
use sovra_proto::ledger::v1 as pb;
use sovra_proto::ledger::v1::ledger_server::Ledger as LedgerRpc;
use tonic::{Request, Response, Status};

use crate::app::audit::{BundleWindow, ConsentRequest};
use crate::app::App;
use crate::grpc::authn::caller;

fn action_pb(a: ConsentAction) -> i32 {
    match a {
        ConsentAction::Grant => pb::ConsentAction::Grant as i32,
        ConsentAction::Withdraw => pb::ConsentAction::Withdraw as i32,
    }
}

/// The `Ledger` service.
#[derive(Debug, Clone)]
pub struct LedgerService {
    app: App,
}

impl LedgerService {
    /// A service over the application layer.
    pub fn new(app: App) -> Self {
        Self { app }
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<pb::LogEntry, Status>> + Send>>;

#[tonic::async_trait]
impl LedgerRpc for LedgerService {
    async fn record_consent(
        &self,
        req: Request<pb::RecordConsentRequest>,
    ) -> Result<Response<pb::ConsentReceipt>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let action = match pb::ConsentAction::try_from(r.action) {
            Ok(pb::ConsentAction::Grant) => Some(ConsentAction::Grant),
            Ok(pb::ConsentAction::Withdraw) => Some(ConsentAction::Withdraw),
            _ => None,
        };
        let c = ConsentRequest {
            customer_id: r.customer_id,
            purpose: r.purpose,
            action,
            channel: r.channel,
            legal_basis: r.legal_basis,
            notice_version: r.notice_version,
            evidence_sha256: r.evidence_sha256,
        };
        let done = self.app.record_consent(&p, c).await?;
        Ok(Response::new(pb::ConsentReceipt {
            index: done.index,
            entry: done.receipt.entry,
            proof: done.receipt.proof.to_text(),
            verifier_key: self.app.verifier_key(),
            subject: done.subject.to_hex(),
        }))
    }

    async fn get_consent_state(
        &self,
        req: Request<pb::GetConsentStateRequest>,
    ) -> Result<Response<pb::ConsentState>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let s = self.app.consent_state(&p, &r.customer_id)?;
        let purposes = s
            .purposes
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
            subject: s.subject.to_hex(),
            purposes,
        }))
    }

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::Checkpoint>, Status> {
        let p = caller(&req)?;
        let cp = self.app.checkpoint(&p)?;
        Ok(Response::new(pb::Checkpoint {
            note: String::from_utf8_lossy(&cp.note).into_owned(),
            tree_size: cp.size,
            root_hash: cp.root.to_vec(),
            verifier_key: self.app.verifier_key(),
            origin: cp.origin,
        }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProof>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let (tree_size, hashes, entry) = self.app.inclusion_proof(&p, r.index, r.tree_size)?;
        Ok(Response::new(pb::InclusionProof {
            index: r.index,
            tree_size,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            entry,
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProof>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let (to_size, hashes) = self.app.consistency_proof(&p, r.from_size, r.to_size)?;
        Ok(Response::new(pb::ConsistencyProof {
            from_size: r.from_size,
            to_size,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    type GetEntriesStream = EntryStream;

    async fn get_entries(
        &self,
        req: Request<pb::GetEntriesRequest>,
    ) -> Result<Response<Self::GetEntriesStream>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        // Lazy end to end: the transport's demand drives the reads, so a
        // client that stops reading holds no thread and no more than
        // HTTP/2's flow-control window of encoded entries.
        let entries = self.app.entries(&p, r.start, r.end)?.map(|e| {
            let e = e?;
            let decoded_json = serde_json::to_string(&e.entry).map_err(|err| {
                Status::internal(format!("cannot render entry {}: {err}", e.index))
            })?;
            Ok(pb::LogEntry {
                index: e.index,
                entry: e.bytes,
                decoded_json,
            })
        });
        // An error ends the stream.
        let entries = entries.scan(false, |failed, item: Result<pb::LogEntry, Status>| {
            let out = (!*failed).then_some(item);
            *failed = out.as_ref().is_some_and(Result::is_err);
            futures::future::ready(out)
        });
        Ok(Response::new(Box::pin(entries)))
    }

    async fn export_audit_bundle(
        &self,
        req: Request<pb::ExportAuditBundleRequest>,
    ) -> Result<Response<pb::AuditBundle>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let window = BundleWindow {
            from_ms: r.from_ms,
            to_ms: r.to_ms,
            consistency_from_size: r.consistency_from_size,
        };
        let b = self.app.audit_bundle(&p, &r.customer_id, window).await?;
        Ok(Response::new(pb::AuditBundle {
            entries: b.entries,
            tree_size: b.tree_size,
            json: b.json,
        }))
    }

    async fn rebuild_consent_state(
        &self,
        req: Request<pb::RebuildConsentStateRequest>,
    ) -> Result<Response<pb::RebuildConsentStateResponse>, Status> {
        let p = caller(&req)?;
        let (corrected, entries) = self.app.rebuild_consent_state(&p).await?;
        Ok(Response::new(pb::RebuildConsentStateResponse {
            corrected,
            entries,
        }))
    }
}
