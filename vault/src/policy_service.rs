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

use crate::auth::Principal;
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

    /// The customer's policy attributes, as far as `caller` may read them
    /// itself: consents from the ledger if it may read consent state, kind
    /// and contract value from the record if it may read those fields (for
    /// the question's purpose). Returns what was withheld, by field name.
    // INVARIANT: an attribute the caller may not read never reaches the
    // decision, so no answer (allowed, policy ids, summary) depends on it.
    fn customer(
        &self,
        caller: &Principal,
        customer_id: &str,
        active: &Active,
        ctx: &sovra_policy::Context,
    ) -> Result<(CustomerAttrs, Vec<String>), Status> {
        if customer_id.is_empty() {
            return Ok((CustomerAttrs::default(), Vec::new()));
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
            .get(&caller.tenant, customer_id, &defs)
            .map_err(to_status)?;
        let mut withheld = Vec::new();
        let consent = if policy::check(active, caller, Action::ReadConsent, ctx).is_ok() {
            self.shared
                .ledger
                .consent_state(&subject)
                .map_err(|e| to_status(e.into()))?
        } else {
            withheld.push("consents".to_owned());
            Vec::new()
        };
        let known = policy::customer_attrs(&[], consent.clone());
        let readable: Vec<_> = values
            .into_iter()
            .filter(|v| {
                let may = policy::check_fields(
                    active,
                    caller,
                    Action::Read,
                    &known,
                    &[&v.def.policy],
                    ctx,
                )
                .is_ok();
                if !may {
                    withheld.push(v.def.name.clone());
                }
                may
            })
            .collect();
        Ok((policy::customer_attrs(&readable, consent), withheld))
    }
}

/// The policy attributes a withheld customer field stands for.
fn attributes_of(field: &str) -> Vec<&str> {
    match field {
        CUSTOMER_KIND_FIELD => vec!["kind"],
        CONTRACT_VALUE_FIELD => vec!["contract_value"],
        "consents" => vec!["consents", "withdrawn"],
        other => vec![other],
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
        // The set is shared by every tenant: only the operator tenant's
        // admins may put a new one in force.
        if *p.tenant != *self.shared.operator_tenant {
            return Err(Status::permission_denied(format!(
                "the policy set governs every tenant; only admins of the operator tenant (`[policy] operator_tenant`) may reload it, and `{}` acts for tenant `{}`",
                p.name, p.tenant
            )));
        }
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
        let active = self.shared.gate.current();
        let ctx = policy::context(&r.purpose, i64::from(r.approvals));
        let (customer, withheld) = self.customer(&caller, &r.customer_id, &active, &ctx)?;
        let mut out = policy::explain(&active.policies, &subject, action, field, &customer, &ctx)
            .map_err(to_status)?;
        let mut read_by: Vec<String> = withheld
            .iter()
            .flat_map(|f| attributes_of(f))
            .flat_map(|a| active.policies.policies_reading(a))
            .collect();
        read_by.sort();
        read_by.dedup();
        if !read_by.is_empty() {
            out.summary = format!(
                "{} (decided without {}, which you may not read; {} read them, so the decision for this customer may differ)",
                out.summary,
                withheld.join(", "),
                read_by.join(", ")
            );
        }
        out.withheld = withheld;
        out.withheld_read_by = read_by;
        Ok(Response::new(out))
    }
}
