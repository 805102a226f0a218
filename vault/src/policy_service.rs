//! The gRPC `Policy` service: status, reload and explanation of the policy
//! set in force.
//!
//! Guarantees: each RPC is itself authorised by the set in force
//! (`read_audit` for status and explanations, `manage_policies` for
//! reloads); an explanation reads the customer's consent state and policy
//! attributes but returns only the decision, never a value.

use sovra_policy::{Action, CustomerAttrs, FieldAttrs, Target};
use sovra_proto::policy::v1 as pb;
use sovra_proto::policy::v1::policy_server::Policy;
use tonic::{Request, Response, Status};

use crate::engine::{validate_id, MAX_CUSTOMER_ID_LEN};
use crate::policy::{self, Active};
use crate::policy::{CONTRACT_VALUE_FIELD, CUSTOMER_KIND_FIELD};
use crate::service::{to_status, Shared};

/// The `Policy` service.
#[derive(Debug, Clone)]
pub struct PolicyService {
    shared: Shared,
}

impl PolicyService {
    /// A service over the shared gate.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn status(&self, a: &Active) -> pb::PolicyStatus {
        pb::PolicyStatus {
            sha256: a.policies.sha256_hex(),
            files: a.policies.files().to_vec(),
            policy_ids: a.policies.policies().map(|(id, _)| id.to_owned()).collect(),
            loaded_at_ms: a.loaded_at_ms,
            ledger_index: a.ledger_index,
            source: self.shared.gate.dir().map_or_else(
                || "(compiled-in default)".to_owned(),
                |d| d.display().to_string(),
            ),
        }
    }

    /// The customer's policy attributes: consents from the ledger, kind and
    /// contract value from the record.
    fn customer(&self, tenant: &str, customer_id: &str) -> Result<CustomerAttrs, Status> {
        if customer_id.is_empty() {
            return Ok(CustomerAttrs::default());
        }
        validate_id("customer_id", customer_id, MAX_CUSTOMER_ID_LEN).map_err(to_status)?;
        let schema = self.shared.engine.schema();
        let defs: Vec<_> = [CUSTOMER_KIND_FIELD, CONTRACT_VALUE_FIELD]
            .into_iter()
            .filter_map(|n| schema.field(n).ok())
            .collect();
        let (subject, values) = self
            .shared
            .engine
            .get(tenant, customer_id, &defs)
            .map_err(to_status)?;
        let consent = self
            .shared
            .ledger
            .consent_state(&subject)
            .map_err(|e| to_status(e.into()))?;
        Ok(policy::customer_attrs(&values, consent))
    }
}

#[tonic::async_trait]
impl Policy for PolicyService {
    async fn get_policy_status(
        &self,
        req: Request<pb::GetPolicyStatusRequest>,
    ) -> Result<Response<pb::PolicyStatus>, Status> {
        self.shared.principal(&req, Action::ReadAudit)?;
        Ok(Response::new(self.status(&self.shared.gate.current())))
    }

    async fn reload_policies(
        &self,
        req: Request<pb::ReloadPoliciesRequest>,
    ) -> Result<Response<pb::ReloadPoliciesResponse>, Status> {
        let p = self.shared.principal(&req, Action::ManagePolicies)?;
        let r = self
            .shared
            .gate
            .reload(&p.name, &self.shared.engine.store().meta)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReloadPoliciesResponse {
            status: Some(self.status(&r.active)),
            changed: r.changed,
        }))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::Explanation>, Status> {
        let caller = self.shared.principal(&req, Action::ReadAudit)?;
        let r = req.into_inner();
        let shown = |s: &str| s.chars().take(64).collect::<String>();
        let subject = self
            .shared
            .auth
            .by_name(&r.principal)
            .filter(|s| s.tenant == caller.tenant)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no principal named `{}` in tenant `{}`",
                    shown(&r.principal),
                    caller.tenant
                ))
            })?;
        let action = Action::from_name(&r.action).ok_or_else(|| {
            Status::invalid_argument(format!(
                "invalid `action`: unknown action `{}`; one of {}",
                shown(&r.action),
                Action::ALL.map(Action::name).join(", ")
            ))
        })?;
        let schema = self.shared.engine.schema();
        if !r.purpose.is_empty() {
            schema.check_purpose(&r.purpose).map_err(to_status)?;
        }
        let field: Option<&FieldAttrs> = match action.target() {
            Target::Field => Some(&schema.field(&r.field).map_err(to_status)?.policy),
            _ if !r.field.is_empty() => {
                return Err(Status::invalid_argument(format!(
                    "invalid `field`: action `{}` is not a field action",
                    action.name()
                )))
            }
            _ => None,
        };
        let customer = self.customer(&caller.tenant, &r.customer_id)?;
        let active = self.shared.gate.current();
        let ctx = policy::context(&r.purpose, i64::from(r.approvals));
        let out = policy::explain(&active.policies, &subject, action, field, &customer, &ctx)
            .map_err(to_status)?;
        Ok(Response::new(out))
    }
}
