//! The gRPC `Policy` service: decode, call the application layer
//! ([`crate::app::policies`]), encode.

use sovra_proto::policy::v1 as pb;
use sovra_proto::policy::v1::policy_server::Policy;
use tonic::{Request, Response, Status};

use crate::access::policy::Active;
use crate::app::policies::Question;
use crate::app::App;
use crate::grpc::authn::caller;

/// The `Policy` service.
#[derive(Debug, Clone)]
pub struct PolicyService {
    app: App,
}

impl PolicyService {
    /// A service over the application layer.
    pub fn new(app: App) -> Self {
        Self { app }
    }

    fn status(&self, a: &Active) -> pb::PolicyStatus {
        pb::PolicyStatus {
            sha256: a.policies.sha256_hex(),
            files: a.policies.files().to_vec(),
            policy_ids: a.policies.policies().map(|(id, _)| id.to_owned()).collect(),
            loaded_at_ms: u64::try_from(a.loaded_at_ms).unwrap_or(0),
            ledger_index: a.ledger_index,
            source: self.app.policies.dir().map_or_else(
                || "(compiled-in default)".to_owned(),
                |d| d.display().to_string(),
            ),
        }
    }
}

#[tonic::async_trait]
impl Policy for PolicyService {
    async fn get_policy_status(
        &self,
        req: Request<pb::GetPolicyStatusRequest>,
    ) -> Result<Response<pb::PolicyStatus>, Status> {
        let p = caller(&req)?;
        let active = self.app.policy_status(&p)?;
        Ok(Response::new(self.status(&active)))
    }

    async fn reload_policies(
        &self,
        req: Request<pb::ReloadPoliciesRequest>,
    ) -> Result<Response<pb::ReloadPoliciesResponse>, Status> {
        let p = caller(&req)?;
        let r = self.app.reload_policies(&p).await?;
        Ok(Response::new(pb::ReloadPoliciesResponse {
            status: Some(self.status(&r.active)),
            changed: r.changed,
        }))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::Explanation>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let q = Question {
            principal: r.principal,
            action: r.action,
            field: r.field,
            customer_id: r.customer_id,
            purpose: r.purpose,
            approvals: r.approvals,
        };
        Ok(Response::new(self.app.explain(&p, q)?))
    }
}
