//! The policy set in force: its status, reloads, and explanations of a
//! decision.
//!
//! Guarantees: each use case is itself authorised by the set in force
//! (`read_audit` for status and explanations, `manage_policies` for
//! reloads, and only admins of the operator tenant may reload the set every
//! tenant shares); an explanation about a real customer decides with only
//! the attributes the caller may read itself and says which it withheld; it
//! returns the decision, never a value.

use std::sync::Arc;

use sovra_policy::{Action, CustomerAttrs, FieldAttrs, Target};
use sovra_proto::policy::v1 as pb;

use super::App;
use crate::access::auth::Principal;
use crate::access::policy::{self, Active, Reloaded, CONTRACT_VALUE_FIELD, CUSTOMER_KIND_FIELD};
use crate::engine::{validate_id, MAX_CUSTOMER_ID_LEN};
use crate::error::{Result, VaultError};

/// A question: would `principal` be allowed `action`?
#[derive(Debug, Clone, Default)]
pub struct Question {
    /// The principal asked about, by name, in the caller's tenant.
    pub principal: String,
    /// The action's name.
    pub action: String,
    /// The field, for field actions.
    pub field: String,
    /// A real customer, or empty for a customer with no attributes.
    pub customer_id: String,
    /// The declared purpose, or empty.
    pub purpose: String,
    /// Distinct approvers assumed.
    pub approvals: u32,
}

impl App {
    /// The policy set in force.
    pub fn policy_status(&self, p: &Principal) -> Result<Arc<Active>> {
        self.authorize(p, Action::ReadAudit)?;
        Ok(self.policies.current())
    }

    /// Re-reads the policy directory and puts a valid new set in force
    /// (recorded in the ledger first).
    pub async fn reload_policies(&self, p: &Principal) -> Result<Reloaded> {
        self.authorize(p, Action::ManagePolicies)?;
        // The set is shared by every tenant: only the operator tenant's
        // admins may put a new one in force.
        if *p.tenant != *self.operator_tenant {
            return Err(VaultError::denied_because(format!(
                "the policy set governs every tenant; only admins of the operator tenant (`[policy] operator_tenant`) may reload it, and `{}` acts for tenant `{}`",
                p.name, p.tenant
            )));
        }
        self.policies
            .reload(&p.name, &self.engine.store().meta)
            .await
    }

    /// Explains what the set in force decides for a question.
    pub fn explain(&self, caller: &Principal, q: Question) -> Result<pb::Explanation> {
        self.authorize(caller, Action::ReadAudit)?;
        let shown = |s: &str| s.chars().take(64).collect::<String>();
        let subject = self
            .auth
            .by_name(&q.principal)
            .filter(|s| s.tenant == caller.tenant)
            .ok_or_else(|| {
                VaultError::not_found_because(format!(
                    "no principal named `{}` in tenant `{}`",
                    shown(&q.principal),
                    caller.tenant
                ))
            })?;
        let action = Action::from_name(&q.action).ok_or_else(|| {
            VaultError::invalid(
                "action",
                format!(
                    "unknown action `{}`; one of {}",
                    shown(&q.action),
                    Action::ALL.map(Action::name).join(", ")
                ),
            )
        })?;
        let schema = self.engine.schema();
        if !q.purpose.is_empty() {
            schema.check_purpose(&q.purpose)?;
        }
        let field: Option<&FieldAttrs> = match action.target() {
            Target::Field => Some(&schema.field(&q.field)?.policy),
            _ if !q.field.is_empty() => {
                return Err(VaultError::invalid(
                    "field",
                    format!("action `{}` is not a field action", action.name()),
                ))
            }
            _ => None,
        };
        let active = self.policies.current();
        let ctx = policy::context(&q.purpose, i64::from(q.approvals));
        let (customer, withheld) = self.readable_attrs(caller, &q.customer_id, &active, &ctx)?;
        let mut out = policy::explain(&active.policies, &subject, action, field, &customer, &ctx)?;
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
        Ok(out)
    }

    /// The customer's policy attributes, as far as `caller` may read them
    /// itself: consents from the ledger if it may read consent state, kind
    /// and contract value from the record if it may read those fields (for
    /// the question's purpose). Returns what was withheld, by field name.
    // INVARIANT: an attribute the caller may not read never reaches the
    // decision, so no answer (allowed, policy ids, summary) depends on it.
    fn readable_attrs(
        &self,
        caller: &Principal,
        customer_id: &str,
        active: &Active,
        ctx: &sovra_policy::Context,
    ) -> Result<(CustomerAttrs, Vec<String>)> {
        if customer_id.is_empty() {
            return Ok((CustomerAttrs::default(), Vec::new()));
        }
        validate_id("customer_id", customer_id, MAX_CUSTOMER_ID_LEN)?;
        let defs = policy::attribute_fields(self.engine.schema());
        let (subject, values) = self.engine.get(&caller.tenant, customer_id, &defs)?;
        let mut withheld = Vec::new();
        let consent = if policy::check(active, caller, Action::ReadConsent, ctx).is_ok() {
            self.ledger.consent_state(&subject)?
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
