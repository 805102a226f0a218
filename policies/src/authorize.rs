//! Evaluation: one Cedar request per (principal, action, resource), and the
//! per-field disclosure rule built on it.
//!
//! Guarantees: deny by default. A request that cannot be built, or whose
//! evaluation raised any error (for example a policy reading an attribute
//! that is not there), is a deny: Cedar skips policies that error, which
//! would let an erroring `forbid` turn into an allow, so an error is never
//! trusted. Every decision carries the ids of the policies that determined
//! it; a default deny says so.
//!
//! Does not guarantee: that the attributes the caller supplies are true;
//! the vault fills them from its schema, configuration and ledger.

use std::collections::HashMap;
use std::collections::HashSet;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context as CedarContext, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Request, RestrictedExpression,
};

use crate::error::{BadRequest, Result};
use crate::model::{Action, Context, CustomerAttrs, FieldAttrs, Principal, Target};
use crate::set::Policies;

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    allowed: bool,
    policies: Vec<String>,
    errors: Vec<String>,
}

impl Decision {
    /// Whether the action is allowed.
    pub fn allowed(&self) -> bool {
        self.allowed
    }
    /// The determining policies: the permits that allowed it, or the
    /// forbids that denied it (empty for a default deny).
    pub fn policies(&self) -> &[String] {
        &self.policies
    }
    /// Evaluation errors (each forces a deny).
    pub fn errors(&self) -> &[String] {
        &self.errors
    }
    /// A short account for messages and the ledger: `permit: a, b`,
    /// `forbid: c`, or `default deny (no policy permits it)`.
    pub fn summary(&self) -> String {
        if !self.errors.is_empty() {
            return format!(
                "deny (policy evaluation error in {})",
                self.errors.join(", ")
            );
        }
        match (self.allowed, self.policies.is_empty()) {
            (true, _) => format!("permit: {}", self.policies.join(", ")),
            (false, true) => "default deny (no policy permits it)".into(),
            (false, false) => format!("forbid: {}", self.policies.join(", ")),
        }
    }
}

/// How a permitted field read discloses the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure {
    /// Plaintext (`reveal` allowed).
    Plaintext,
    /// The field's mask (`read` allowed, `reveal` not).
    Masked,
    /// Nothing (`read` denied).
    Denied,
}

/// The decision on reading one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDecision {
    /// The field.
    pub field: String,
    /// How it is disclosed.
    pub disclosure: Disclosure,
    /// The `reveal` decision.
    pub reveal: Decision,
    /// The `read` decision (evaluated only when `reveal` was denied).
    pub read: Option<Decision>,
}

impl FieldDecision {
    /// The policies that determined the outcome.
    pub fn determining(&self) -> Vec<String> {
        let mut out = self.reveal.policies.clone();
        if let Some(r) = &self.read {
            out.extend(r.policies.iter().cloned());
        }
        out
    }
    /// `reveal: ...; read: ...`, for messages and the ledger.
    pub fn summary(&self) -> String {
        match &self.read {
            None => format!("reveal {}", self.reveal.summary()),
            Some(r) => format!("reveal {}; read {}", self.reveal.summary(), r.summary()),
        }
    }
}

pub(crate) fn action_uid(a: Action) -> Result<EntityUid> {
    uid("Action", a.name())
}

fn uid(ty: &str, id: &str) -> Result<EntityUid> {
    let t = EntityTypeName::from_str(&format!("Sovra::{ty}"))
        .map_err(|e| BadRequest::new(format!("entity type `{ty}`: {e}")))?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn strings<'a>(it: impl IntoIterator<Item = &'a String>) -> RestrictedExpression {
    RestrictedExpression::new_set(
        it.into_iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

/// The fixed id of the one customer in a request's entity store.
const CUSTOMER_ID: &str = "customer";

/// The entities of one request: the principal, the tenant, the customer and
/// any fields. Built once and shared by every per-field evaluation.
pub struct Scope {
    principal: EntityUid,
    tenant: EntityUid,
    customer: EntityUid,
    fields: HashMap<String, EntityUid>,
    entities: Entities,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Attributes may describe a customer: never print them.
        write!(f, "Scope({} fields)", self.fields.len())
    }
}

impl Policies {
    /// Builds the entity store for one request.
    pub fn scope(
        &self,
        principal: &Principal,
        tenant: &str,
        customer: &CustomerAttrs,
        fields: &[&FieldAttrs],
    ) -> Result<Scope> {
        let p_uid = uid(principal.kind.type_name(), &principal.name)?;
        let t_uid = uid("Tenant", tenant)?;
        let c_uid = uid("Customer", CUSTOMER_ID)?;
        let mut entities = Vec::with_capacity(3 + fields.len());
        let bad = |e: &dyn std::fmt::Display| BadRequest::new(e);
        entities.push(
            Entity::new(
                p_uid.clone(),
                HashMap::from([
                    (
                        "department".to_owned(),
                        RestrictedExpression::new_string(principal.department.clone()),
                    ),
                    ("purposes".to_owned(), strings(&principal.purposes)),
                ]),
                HashSet::new(),
            )
            .map_err(|e| bad(&e))?,
        );
        entities.push(Entity::new_no_attrs(t_uid.clone(), HashSet::new()));
        entities.push(
            Entity::new(
                c_uid.clone(),
                HashMap::from([
                    ("consents".to_owned(), strings(&customer.consents)),
                    ("withdrawn".to_owned(), strings(&customer.withdrawn)),
                    (
                        "kind".to_owned(),
                        RestrictedExpression::new_string(customer.kind.clone()),
                    ),
                    (
                        "contract_value".to_owned(),
                        RestrictedExpression::new_long(customer.contract_value),
                    ),
                ]),
                HashSet::new(),
            )
            .map_err(|e| bad(&e))?,
        );
        let mut field_uids = HashMap::with_capacity(fields.len());
        for f in fields {
            let f_uid = uid("Field", &f.name)?;
            entities.push(
                Entity::new(
                    f_uid.clone(),
                    HashMap::from([
                        (
                            "name".to_owned(),
                            RestrictedExpression::new_string(f.name.clone()),
                        ),
                        (
                            "sensitivity".to_owned(),
                            RestrictedExpression::new_string(f.sensitivity.clone()),
                        ),
                        (
                            "department".to_owned(),
                            RestrictedExpression::new_string(f.department.clone()),
                        ),
                        ("purposes".to_owned(), strings(&f.purposes)),
                        (
                            "customer".to_owned(),
                            RestrictedExpression::new_entity_uid(c_uid.clone()),
                        ),
                    ]),
                    HashSet::new(),
                )
                .map_err(|e| bad(&e))?,
            );
            field_uids.insert(f.name.clone(), f_uid);
        }
        let entities =
            Entities::from_entities(entities, Some(&self.schema)).map_err(|e| bad(&e))?;
        Ok(Scope {
            principal: p_uid,
            tenant: t_uid,
            customer: c_uid,
            fields: field_uids,
            entities,
        })
    }

    /// Decides `action` in `scope`. `field` names the resource of a field
    /// action and is ignored otherwise. Errors (an unknown field, a context
    /// the schema refuses) are returned, never turned into an allow.
    pub fn decide(
        &self,
        scope: &Scope,
        action: Action,
        field: Option<&str>,
        ctx: &Context,
    ) -> Result<Decision> {
        let resource = match action.target() {
            Target::Tenant => scope.tenant.clone(),
            Target::Customer => scope.customer.clone(),
            Target::Field => {
                let name = field.ok_or_else(|| {
                    BadRequest::new(format!("action `{}` needs a field", action.name()))
                })?;
                scope
                    .fields
                    .get(name)
                    .cloned()
                    .ok_or_else(|| BadRequest::new("the field is not in the request's scope"))?
            }
        };
        let context = CedarContext::from_pairs([
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(ctx.purpose.clone()),
            ),
            (
                "time_ms".to_owned(),
                RestrictedExpression::new_long(ctx.time_ms),
            ),
            (
                "approvals".to_owned(),
                RestrictedExpression::new_long(ctx.approvals),
            ),
            (
                "cohort_size".to_owned(),
                RestrictedExpression::new_long(ctx.cohort_size),
            ),
        ])
        .map_err(BadRequest::new)?;
        let action_uid = self
            .actions
            .get(action.index())
            .cloned()
            .ok_or_else(|| BadRequest::new("unknown action"))?;
        let req = Request::new(
            scope.principal.clone(),
            action_uid,
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(BadRequest::new)?;
        let resp = Authorizer::new().is_authorized(&req, &self.set, &scope.entities);
        let mut policies: Vec<String> = resp
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policies.sort();
        let errors: Vec<String> = resp
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                    e.policy_id().to_string()
                }
            })
            .collect();
        // INVARIANT: any evaluation error is a deny (see the module docs).
        let allowed = resp.decision() == CedarDecision::Allow && errors.is_empty();
        Ok(Decision {
            allowed,
            policies,
            errors,
        })
    }

    /// Decides how a read discloses each field of `scope`: plaintext if
    /// `reveal` is allowed, the mask if only `read` is, otherwise denied.
    pub fn read_fields(
        &self,
        scope: &Scope,
        fields: &[&FieldAttrs],
        ctx: &Context,
    ) -> Result<Vec<FieldDecision>> {
        let mut out = Vec::with_capacity(fields.len());
        for f in fields {
            let reveal = self.decide(scope, Action::Reveal, Some(&f.name), ctx)?;
            if reveal.allowed {
                out.push(FieldDecision {
                    field: f.name.clone(),
                    disclosure: Disclosure::Plaintext,
                    reveal,
                    read: None,
                });
                continue;
            }
            let read = self.decide(scope, Action::Read, Some(&f.name), ctx)?;
            out.push(FieldDecision {
                field: f.name.clone(),
                disclosure: if read.allowed {
                    Disclosure::Masked
                } else {
                    Disclosure::Denied
                },
                reveal,
                read: Some(read),
            });
        }
        Ok(out)
    }
}
