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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use cedar_policy::{
    Authorizer, Context as CedarContext, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Request, RestrictedExpression,
};

use crate::error::{BadRequestError, Result};
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
        .map_err(|e| BadRequestError::new(format!("entity type `{ty}`: {e}")))?;
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

/// Most principals, fields or tenants whose entities are kept.
const CACHE_LIMIT: usize = 4096;
/// Most customer-attribute sets that are given a scope id.
const SCOPE_LIMIT: usize = 16_384;
/// Most decisions kept; the cache is emptied when it is full.
const DECISION_LIMIT: usize = 65_536;

/// A cached entity: its uid, the entity, and a number that names it in
/// decision keys (never reused within one policy set).
type CachedEntity = (EntityUid, Arc<Entity>, u64);

/// Principal and field entities, built once: they depend only on the
/// configuration and the schema (a field's `customer` is always the one
/// fixed customer id), and building one costs several microseconds.
///
/// Decisions are cached too. A decision reads nothing but the request's
/// entities, its action, resource and context, and the policy set; the key
/// is all of them (the set by being this cache's owner: a reload builds a
/// new [`Policies`] and so a new, empty cache). The context's `time_ms` is
/// left out of the key only when no policy text mentions it.
#[derive(Default)]
pub(crate) struct EntityCache {
    principals: RwLock<HashMap<Principal, CachedEntity>>,
    fields: RwLock<HashMap<FieldAttrs, CachedEntity>>,
    tenants: RwLock<HashMap<String, CachedEntity>>,
    customer: OnceLock<EntityUid>,
    /// (principal, tenant, customer attributes) → scope number.
    scopes: RwLock<HashMap<(u64, u64, CustomerAttrs), u64>>,
    decisions: RwLock<HashMap<DecisionKey, Decision>>,
    next_id: AtomicU64,
    /// Whether `time_ms` is part of a decision's key.
    pub(crate) reads_time: bool,
}

/// Everything a cached decision depends on besides the policy set.
#[derive(Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    scope: u64,
    field: u64,
    action: usize,
    purpose: String,
    time_ms: i64,
    approvals: i64,
    cohort_size: i64,
}

impl std::fmt::Debug for EntityCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntityCache")
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A poisoned lock still holds whole entries: only whole inserts and
    // clears happen under it.
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl EntityCache {
    pub(crate) fn new(reads_time: bool) -> Self {
        Self {
            reads_time,
            ..Self::default()
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn cached<K: std::hash::Hash + Eq + Clone>(
        &self,
        map: &RwLock<HashMap<K, CachedEntity>>,
        key: &K,
        build: impl FnOnce() -> Result<(EntityUid, Entity)>,
    ) -> Result<CachedEntity> {
        if let Some(e) = read(map).get(key).cloned() {
            return Ok(e);
        }
        let (u, e) = build()?;
        let mut g = write(map);
        if let Some(e) = g.get(key) {
            return Ok(e.clone());
        }
        let built = (u, Arc::new(e), self.id());
        if g.len() < CACHE_LIMIT {
            g.insert(key.clone(), built.clone());
        }
        Ok(built)
    }

    fn tenant(&self, tenant: &str) -> Result<CachedEntity> {
        self.cached(&self.tenants, &tenant.to_owned(), || {
            let u = uid("Tenant", tenant)?;
            Ok((u.clone(), Entity::new_no_attrs(u, HashSet::new())))
        })
    }

    fn customer(&self) -> Result<EntityUid> {
        if let Some(u) = self.customer.get() {
            return Ok(u.clone());
        }
        let u = uid("Customer", CUSTOMER_ID)?;
        Ok(self.customer.get_or_init(|| u).clone())
    }

    fn principal(&self, p: &Principal) -> Result<CachedEntity> {
        self.cached(&self.principals, p, || {
            let u = uid(p.kind.type_name(), &p.name)?;
            let e = Entity::new(
                u.clone(),
                HashMap::from([
                    (
                        "department".to_owned(),
                        RestrictedExpression::new_string(p.department.clone()),
                    ),
                    ("purposes".to_owned(), strings(&p.purposes)),
                ]),
                HashSet::new(),
            )
            .map_err(BadRequestError::new)?;
            Ok((u, e))
        })
    }

    fn field(&self, f: &FieldAttrs) -> Result<CachedEntity> {
        self.cached(&self.fields, f, || {
            let u = uid("Field", &f.name)?;
            let c = self.customer()?;
            let e = Entity::new(
                u.clone(),
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
                        RestrictedExpression::new_entity_uid(c),
                    ),
                ]),
                HashSet::new(),
            )
            .map_err(BadRequestError::new)?;
            Ok((u, e))
        })
    }

    /// The number of the scope (principal, tenant, customer attributes).
    fn scope_id(&self, principal: u64, tenant: u64, customer: &CustomerAttrs) -> u64 {
        let key = (principal, tenant, customer.clone());
        if let Some(id) = read(&self.scopes).get(&key) {
            return *id;
        }
        let mut g = write(&self.scopes);
        if let Some(id) = g.get(&key) {
            return *id;
        }
        // INVARIANT: numbers are never reused, so emptying this map can only
        // orphan cached decisions, never give one to another scope.
        if g.len() >= SCOPE_LIMIT {
            g.clear();
        }
        let id = self.id();
        g.insert(key, id);
        id
    }

    fn decision(&self, key: &DecisionKey) -> Option<Decision> {
        read(&self.decisions).get(key).cloned()
    }

    fn keep(&self, key: DecisionKey, d: &Decision) {
        let mut g = write(&self.decisions);
        if g.len() >= DECISION_LIMIT {
            g.clear();
        }
        g.insert(key, d.clone());
    }
}

/// The entities of one request: the principal, the tenant, the customer and
/// any fields. The Cedar entity store is built at most once, on the first
/// decision the cache does not hold, and shared by every per-field
/// evaluation.
pub struct Scope {
    kind: crate::PrincipalKind,
    principal: EntityUid,
    tenant: EntityUid,
    customer: EntityUid,
    fields: HashMap<String, (EntityUid, u64)>,
    id: u64,
    parts: Vec<Arc<Entity>>,
    customer_attrs: CustomerAttrs,
    entities: OnceLock<Entities>,
    validate: bool,
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
        self.scope_checked(principal, tenant, customer, fields, false)
    }

    /// Per request the entities and the request are not re-validated
    /// against the schema (it costs more than the decision); their shape is
    /// fixed by this module and checked once per load by [`Self::self_check`].
    fn scope_checked(
        &self,
        principal: &Principal,
        tenant: &str,
        customer: &CustomerAttrs,
        fields: &[&FieldAttrs],
        validate: bool,
    ) -> Result<Scope> {
        let (p_uid, p_entity, p_id) = self.cache.principal(principal)?;
        let (t_uid, t_entity, t_id) = self.cache.tenant(tenant)?;
        let c_uid = self.cache.customer()?;
        let mut parts = Vec::with_capacity(2 + fields.len());
        parts.push(p_entity);
        parts.push(t_entity);
        let mut field_uids = HashMap::with_capacity(fields.len());
        for f in fields {
            let (f_uid, f_entity, f_id) = self.cache.field(f)?;
            parts.push(f_entity);
            field_uids.insert(f.name.clone(), (f_uid, f_id));
        }
        Ok(Scope {
            kind: principal.kind,
            principal: p_uid,
            tenant: t_uid,
            customer: c_uid,
            fields: field_uids,
            id: self.cache.scope_id(p_id, t_id, customer),
            parts,
            customer_attrs: customer.clone(),
            entities: OnceLock::new(),
            validate,
        })
    }

    /// The scope's Cedar entity store, built on first use.
    fn entities<'s>(&self, scope: &'s Scope) -> Result<&'s Entities> {
        if let Some(e) = scope.entities.get() {
            return Ok(e);
        }
        let bad = |e: &dyn std::fmt::Display| BadRequestError::new(e);
        let c = &scope.customer_attrs;
        let mut entities: Vec<Entity> = scope.parts.iter().map(|e| (**e).clone()).collect();
        entities.push(
            Entity::new(
                scope.customer.clone(),
                HashMap::from([
                    ("consents".to_owned(), strings(&c.consents)),
                    ("withdrawn".to_owned(), strings(&c.withdrawn)),
                    (
                        "kind".to_owned(),
                        RestrictedExpression::new_string(c.kind.clone()),
                    ),
                    (
                        "contract_value".to_owned(),
                        RestrictedExpression::new_long(c.contract_value),
                    ),
                ]),
                HashSet::new(),
            )
            .map_err(|e| bad(&e))?,
        );
        let built = Entities::from_entities(entities, scope.validate.then_some(&self.schema))
            .map_err(|e| bad(&e))?;
        Ok(scope.entities.get_or_init(|| built))
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
        self.decide_in(scope, action, field, ctx, None)
    }

    /// [`Self::decide`], against the whole set and with schema validation
    /// of the request when `whole` is given (self-check and tests).
    fn decide_in(
        &self,
        scope: &Scope,
        action: Action,
        field: Option<&str>,
        ctx: &Context,
        whole: Option<&cedar_policy::PolicySet>,
    ) -> Result<Decision> {
        let (resource, resource_id) = match action.target() {
            Target::Tenant => (scope.tenant.clone(), 0),
            Target::Customer => (scope.customer.clone(), 0),
            Target::Field => {
                let name = field.ok_or_else(|| {
                    BadRequestError::new(format!("action `{}` needs a field", action.name()))
                })?;
                scope.fields.get(name).cloned().ok_or_else(|| {
                    BadRequestError::new("the field is not in the request's scope")
                })?
            }
        };
        let key = whole.is_none().then(|| DecisionKey {
            scope: scope.id,
            field: resource_id,
            action: action.index(),
            purpose: ctx.purpose.clone(),
            time_ms: if self.cache.reads_time {
                ctx.time_ms
            } else {
                0
            },
            approvals: ctx.approvals,
            cohort_size: ctx.cohort_size,
        });
        if let Some(d) = key.as_ref().and_then(|k| self.cache.decision(k)) {
            return Ok(d);
        }
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
        .map_err(BadRequestError::new)?;
        let action_uid = self
            .actions
            .get(action.index())
            .cloned()
            .ok_or_else(|| BadRequestError::new("unknown action"))?;
        let req = Request::new(
            scope.principal.clone(),
            action_uid,
            resource,
            context,
            whole.map(|_| &self.schema),
        )
        .map_err(BadRequestError::new)?;
        let set = match whole {
            Some(w) => w,
            None => self
                .sliced
                .get(crate::set::slice_index(action, scope.kind))
                .ok_or_else(|| BadRequestError::new("no policy slice for the request"))?,
        };
        let resp = Authorizer::new().is_authorized(&req, set, self.entities(scope)?);
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
        let d = Decision {
            allowed,
            policies,
            errors,
        };
        if let Some(k) = key {
            self.cache.keep(k, &d);
        }
        Ok(d)
    }

    /// Checks, once per load, that the entities and requests this module
    /// builds conform to the schema for every principal kind and action.
    pub(crate) fn self_check(&self) -> Result<()> {
        let field = FieldAttrs {
            name: "f".into(),
            sensitivity: "personal".into(),
            department: "d".into(),
            purposes: ["p".to_owned()].into(),
        };
        let customer = CustomerAttrs {
            consents: ["p".to_owned()].into(),
            withdrawn: ["q".to_owned()].into(),
            kind: "k".into(),
            contract_value: 1,
        };
        let ctx = Context {
            purpose: "p".into(),
            ..Context::default()
        };
        for kind in crate::PrincipalKind::ALL {
            let p = Principal {
                kind,
                name: "n".into(),
                department: "d".into(),
                purposes: ["p".to_owned()].into(),
            };
            let scope = self.scope_checked(&p, "t", &customer, &[&field], true)?;
            for a in Action::ALL {
                self.decide_in(&scope, a, Some("f"), &ctx, Some(&self.set))?;
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrincipalKind;

    /// Every slice decides exactly as the whole set, across principal
    /// kinds, actions, sensitivities, departments, purposes and consents.
    #[test]
    fn slices_decide_as_the_whole_set() {
        let pol = Policies::embedded().unwrap();
        let mut n = 0;
        for kind in PrincipalKind::ALL {
            for dept in ["sales", "legal", ""] {
                let p = Principal {
                    kind,
                    name: "n".into(),
                    department: dept.into(),
                    purposes: ["marketing".to_owned(), "billing".to_owned()].into(),
                };
                for sens in ["internal", "personal", "sensitive"] {
                    let f = FieldAttrs {
                        name: "f".into(),
                        sensitivity: sens.into(),
                        department: "legal".into(),
                        purposes: ["marketing".to_owned(), "billing".to_owned()].into(),
                    };
                    for (consents, withdrawn, kind_s, value) in [
                        (vec![], vec![], "", 0),
                        (vec!["marketing"], vec![], "government", 9_000_000),
                        (vec![], vec!["billing"], "government", 9_000_000),
                    ] {
                        let c = CustomerAttrs {
                            consents: consents.iter().map(|s| (*s).to_owned()).collect(),
                            withdrawn: withdrawn.iter().map(|s| (*s).to_owned()).collect(),
                            kind: kind_s.into(),
                            contract_value: value,
                        };
                        let scope = pol.scope(&p, "t", &c, &[&f]).unwrap();
                        for purpose in ["marketing", "billing", "export", ""] {
                            for approvals in [0, 3] {
                                let ctx = Context {
                                    purpose: purpose.into(),
                                    approvals,
                                    cohort_size: 5,
                                    ..Context::default()
                                };
                                for a in Action::ALL {
                                    let sliced = pol.decide(&scope, a, Some("f"), &ctx).unwrap();
                                    // The second answer comes from the cache.
                                    let again = pol.decide(&scope, a, Some("f"), &ctx).unwrap();
                                    assert_eq!(sliced, again);
                                    let whole = pol
                                        .decide_in(&scope, a, Some("f"), &ctx, Some(&pol.set))
                                        .unwrap();
                                    assert_eq!(sliced, whole, "{kind:?} {a:?} {sens} {purpose}");
                                    n += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(n > 5000, "{n}");
    }

    /// A policy that reads the time is decided per time, not from a cached
    /// answer for another instant; one that does not is cached across times.
    #[test]
    fn cached_decisions_key_on_the_time_only_when_a_policy_reads_it() {
        let mut files: Vec<(String, String)> = crate::set::DEFAULT_FILES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        let plain = Policies::from_files(files.clone()).unwrap();
        assert!(!plain.cache.reads_time);
        files.push((
            "99-hours.cedar".into(),
            "@id(\"no-reveal-after-time\")\nforbid(principal, action == Sovra::Action::\"reveal\", resource is Sovra::Field)\nwhen { context.time_ms > 1000 };\n".into(),
        ));
        let timed = Policies::from_files(files).unwrap();
        assert!(timed.cache.reads_time);
        let p = Principal {
            kind: PrincipalKind::Service,
            name: "crm".into(),
            department: "sales".into(),
            purposes: ["marketing".to_owned()].into(),
        };
        let f = FieldAttrs {
            name: "f".into(),
            sensitivity: "internal".into(),
            department: String::new(),
            purposes: ["marketing".to_owned()].into(),
        };
        let c = CustomerAttrs {
            consents: ["marketing".to_owned()].into(),
            ..CustomerAttrs::default()
        };
        let at = |t: i64| Context {
            purpose: "marketing".into(),
            time_ms: t,
            ..Context::default()
        };
        let scope = timed.scope(&p, "t", &c, &[&f]).unwrap();
        let early = timed
            .decide(&scope, Action::Reveal, Some("f"), &at(10))
            .unwrap();
        let late = timed
            .decide(&scope, Action::Reveal, Some("f"), &at(5000))
            .unwrap();
        assert!(early.allowed(), "{}", early.summary());
        assert!(!late.allowed());
        assert_eq!(late.policies(), ["no-reveal-after-time".to_owned()]);
        // A changed customer attribute is another scope, never a stale hit.
        let withdrawn = CustomerAttrs {
            withdrawn: ["marketing".to_owned()].into(),
            ..CustomerAttrs::default()
        };
        let s2 = timed.scope(&p, "t", &withdrawn, &[&f]).unwrap();
        assert!(!timed
            .decide(&s2, Action::Reveal, Some("f"), &at(10))
            .unwrap()
            .allowed());
        assert!(timed
            .decide(&scope, Action::Reveal, Some("f"), &at(10))
            .unwrap()
            .allowed());
    }
}
