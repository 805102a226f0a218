//! Customer records: write (one or a batch), read for a declared purpose,
//! search by blind index, erase by crypto-shredding, and the schema.
//!
//! Guarantees: every write is decided per field (`write`), every read per
//! field (`read`, `reveal`) before and after the customer's attributes are
//! known; a read's ledger entry and lineage are durable before any value is
//! returned; a refused read is recorded too, without showing whether the
//! customer exists when it is refused before the lookup; an erasure is in
//! the ledger, durably, before the data goes.

use std::collections::BTreeSet;
use std::sync::Arc;

use rand::RngCore;
use sovra_ledger::entry::{
    Decision, Disclosure as LedgerDisclosure, Erasure, FieldAccess, Reveal, Write,
};
use sovra_ledger::{Body, ConsentAction, Digest};
use sovra_policy::{Action, CustomerAttrs, Disclosure, FieldAttrs, FieldDecision};
use sovra_proto::lineage::v1 as lpb;
use sovra_wal::Intent;

use super::App;
use crate::access::auth::Principal;
use crate::access::policy;
use crate::engine::{self, validate_id, EraseOutcome, Idempotency, Revealed, Source, WriteLineage};
use crate::error::{Result, VaultError};
use crate::lineage::{self, Agent};
use crate::schema::{FieldDef, FieldValue, RawValue, Schema};

/// Most fields one write may carry.
pub const MAX_FIELDS_PER_WRITE: usize = 64;
/// Most field names one read may ask for.
pub const MAX_FIELDS_PER_READ: usize = 256;
/// Reads for this purpose are recorded as export activities.
const EXPORT_PURPOSE: &str = "export";

/// A write of some fields of one customer (no `Debug`: it holds values).
#[derive(Default)]
pub struct WriteRequest {
    /// The customer.
    pub customer_id: String,
    /// Field name and value, as sent.
    pub fields: Vec<(String, RawValue)>,
    /// Where the values were collected (required).
    pub source: Option<Source>,
    /// The client's idempotency key; empty for none.
    pub idempotency_key: String,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The customer.
    pub customer_id: String,
    /// True if the customer was created by this write.
    pub created: bool,
    /// True if this was a resend of an earlier write with the same
    /// idempotency key (nothing was written).
    pub replayed: bool,
    /// New version per field written, sorted by field name.
    pub versions: Vec<(String, u64)>,
}

/// What a batch of writes did.
#[derive(Debug)]
pub struct BatchOutcome {
    /// One result per write, in order.
    pub items: Vec<Result<Written>>,
    /// Whether the batch's group commit succeeded: items reported `Ok` are
    /// durable only if this is `Ok` too.
    pub durable: Result<()>,
}

/// A read of some fields of one customer for a declared purpose.
#[derive(Debug, Default)]
pub struct ReadRequest {
    /// The customer.
    pub customer_id: String,
    /// Field names; empty for every field the caller may read.
    pub fields: Vec<String>,
    /// The declared purpose.
    pub purpose: String,
    /// Distinct approvers of the read (see [`App::approvals`]).
    pub approvals: i64,
}

/// How a read field is shown.
#[derive(Debug)]
pub enum Shown {
    /// In plaintext.
    Revealed(FieldValue),
    /// Masked.
    Masked(String),
}

/// One field of a read, as the caller may see it.
#[derive(Debug)]
pub struct FieldReading<'s> {
    /// The field.
    pub def: &'s FieldDef,
    /// Its value, revealed or masked.
    pub shown: Shown,
    /// The value's version.
    pub version: u64,
    /// Where it was collected.
    pub source: Source,
    /// When it was written.
    pub collected_at_ms: i64,
}

/// The answer to a read.
#[derive(Debug)]
pub struct Reading<'s> {
    /// The customer.
    pub customer_id: String,
    /// The fields shown, in schema order; withheld ones are absent.
    pub fields: Vec<FieldReading<'s>>,
}

/// The fields a read fetches: those asked for, and the customer's kind and
/// contract value, which are policy attributes (read with the fields,
/// never returned unless asked for).
fn with_attribute_fields<'s>(schema: &'s Schema, defs: &[&'s FieldDef]) -> Vec<&'s FieldDef> {
    let mut fetch = defs.to_vec();
    for d in policy::attribute_fields(schema) {
        if !fetch.iter().any(|f| f.name == d.name) {
            fetch.push(d);
        }
    }
    fetch
}

/// A blind-index search (no `Debug`: it holds a value).
pub struct SearchRequest {
    /// The indexed field.
    pub field: String,
    /// The value to look for, as sent.
    pub value: Option<RawValue>,
    /// The declared purpose.
    pub purpose: String,
    /// Most ids to return.
    pub limit: u32,
}

/// An erasure's receipt.
#[derive(Debug, Clone)]
pub struct ErasureReceipt {
    /// Random id of this receipt.
    pub receipt_id: String,
    /// The customer.
    pub customer_id: String,
    /// Why.
    pub reason: String,
    /// What the engine did.
    pub outcome: EraseOutcome,
    /// The erasure's ledger entry.
    pub ledger_index: u64,
    /// The erased customer's (now unlinkable) pseudonym.
    pub subject: Digest,
}

/// A validated write: normalised values, the fields whose input
/// normalisation changed, and the source.
struct ParsedWrite<'s> {
    customer_id: String,
    values: Vec<(&'s FieldDef, FieldValue)>,
    transformed: Vec<&'s str>,
    source: Source,
}

impl App {
    /// Writes some fields of one customer, durably.
    pub async fn put(&self, p: &Principal, w: WriteRequest) -> Result<Written> {
        let intent = self.engine.intent();
        let out = self.apply_put(p, w);
        drop(intent);
        let out = out?;
        self.commit().await?;
        Ok(out)
    }

    /// Writes a batch across the cores, then commits once. Writes of one
    /// customer go to the same worker, in order, so per-customer order
    /// holds.
    pub async fn put_batch(&self, p: &Arc<Principal>, writes: Vec<WriteRequest>) -> BatchOutcome {
        let n = writes.len();
        let workers = std::thread::available_parallelism()
            .map_or(1, |w| w.get())
            .clamp(1, n.max(1));
        let mut groups: Vec<Vec<(usize, WriteRequest)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (i, w) in writes.into_iter().enumerate() {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            w.customer_id.hash(&mut h);
            groups[(h.finish() as usize) % workers].push((i, w));
        }
        let tasks: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let (app, p) = (self.clone(), p.clone());
                tokio::task::spawn_blocking(move || {
                    g.into_iter()
                        .map(|(i, w)| (i, app.apply_put(&p, w)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut items: Vec<Option<Result<Written>>> = (0..n).map(|_| None).collect();
        for t in futures::future::join_all(tasks).await {
            match t {
                Ok(rs) => {
                    for (i, r) in rs {
                        items[i] = Some(r);
                    }
                }
                Err(e) => tracing::error!(error = %e, "a BatchPut worker failed"),
            }
        }
        // A worker that died leaves holes: those items failed.
        let items: Vec<Result<Written>> = items
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(VaultError::internal("writing this item"))))
            .collect();
        let durable = if items.iter().any(|r| matches!(r, Ok(w) if !w.replayed)) {
            self.commit().await
        } else {
            Ok(())
        };
        BatchOutcome { items, durable }
    }

    /// Validates a write, asks the policy layer about each field (`write`),
    /// then stores it (not yet durable: see [`App::commit`]).
    fn apply_put(&self, p: &Principal, mut w: WriteRequest) -> Result<Written> {
        let idempotency_key = std::mem::take(&mut w.idempotency_key);
        let schema = self.engine.schema();
        let put = parse_write(schema, w)?;
        let attrs: Vec<&FieldAttrs> = put.values.iter().map(|(d, _)| &d.policy).collect();
        let policies = policy::check_fields(
            &self.policies.current(),
            p,
            Action::Write,
            &CustomerAttrs::default(),
            &attrs,
            &policy::context("", 0),
        )?;
        let agent = Agent::of(&p.name, p.role.as_str(), String::new(), policies);
        let ledger = &self.ledger;
        let (tenant, channel, actor) = (&p.tenant, &put.source.channel, &p.name);
        let out = self.engine.put(
            &p.tenant,
            &put.customer_id,
            &put.values,
            &put.source,
            WriteLineage {
                agent: &agent,
                transformed: &put.transformed,
                anchor: Box::new(move |subject, hash, fields| {
                    lineage::appended_index(ledger.append(&[Body::FieldsWritten(Write {
                        tenant: tenant.clone(),
                        subject: *subject,
                        actor: actor.clone(),
                        channel: channel.clone(),
                        fields,
                        lineage: *hash,
                    })])?)
                }),
            },
            (!idempotency_key.is_empty()).then_some(Idempotency {
                principal: &p.name,
                key: &idempotency_key,
            }),
        )?;
        if !out.replayed
            && self
                .engine
                .contract_hooks()
                .listens(&p.tenant, "field_written")
        {
            let subject = self.engine.pseudonym(&p.tenant, &put.customer_id, false)?;
            for (def, _) in &put.values {
                self.engine.contract_inbox(
                    &p.tenant,
                    "field_written",
                    &def.name,
                    &put.customer_id,
                    &subject,
                )?;
            }
        }
        Ok(Written {
            customer_id: put.customer_id,
            created: out.created,
            replayed: out.replayed,
            versions: out.versions,
        })
    }

    /// Reads fields of one customer for a declared purpose.
    ///
    /// INVARIANT (the order of a read): validate; decide with the most the
    /// customer could have consented to (the pre-check: principals that may
    /// never read stop here, recorded, before the customer is looked up);
    /// fetch; decide again with the customer's attributes; record the read
    /// durably (allowed or refused); only then return values.
    pub async fn read<'s>(&'s self, p: &Principal, r: ReadRequest) -> Result<Reading<'s>> {
        // Every read that gets past validation appends (its reveal, or its
        // refusal) and waits: announce it, so that it can share a sync.
        let intent = self.engine.intent();
        let schema = self.engine.schema();
        validate_id("customer_id", &r.customer_id, engine::MAX_CUSTOMER_ID_LEN)?;
        schema.check_purpose(&r.purpose)?;
        let defs = wanted_fields(schema, &r.fields)?;
        let all = r.fields.is_empty();
        let attrs: Vec<&FieldAttrs> = defs.iter().map(|d| &d.policy).collect();
        let active = self.policies.current();
        let pol = &active.policies;
        let ctx = policy::context(&r.purpose, r.approvals);
        // Would the read be allowed even for a customer who consented to
        // the purpose?
        let optimistic = CustomerAttrs {
            consents: [r.purpose.clone()].into(),
            ..CustomerAttrs::default()
        };
        let pre = pol
            .scope(&p.policy, &p.tenant, &optimistic, &attrs)
            .and_then(|s| pol.read_fields(&s, &attrs, &ctx))?;
        if defs.is_empty() || refused(all, &pre) {
            self.record_refused_before_lookup(p, &r.purpose, &defs, &pre, intent)
                .await?;
            return Err(first_denial(p, &ctx, &pre));
        }
        let fetch = with_attribute_fields(schema, &defs);
        let (subject, revealed) = self.engine.get(&p.tenant, &r.customer_id, &fetch)?;
        let consent = self.ledger.consent_state(&subject)?;
        let withdrawn_at = consent
            .iter()
            .find(|c| c.purpose == r.purpose && c.action == ConsentAction::Withdraw)
            .map(|c| c.index);
        let customer = policy::customer_attrs(&revealed, consent);
        let decisions = pol
            .scope(&p.policy, &p.tenant, &customer, &attrs)
            .and_then(|s| pol.read_fields(&s, &attrs, &ctx))?;
        let decision_of = |name: &str| decisions.iter().find(|d| d.field == name);
        // Only asked-for fields the record holds are read or withheld.
        let present: Vec<Revealed<'s>> = revealed
            .into_iter()
            .filter(|f| decision_of(&f.def.name).is_some())
            .collect();
        let versions: Vec<u64> = present.iter().map(|f| f.version).collect();
        let mut reveal = Reveal {
            tenant: p.tenant.clone(),
            subject,
            actor: p.name.clone(),
            role: p.role.as_str().to_owned(),
            purpose: r.purpose.clone(),
            decision: Decision::Allowed,
            reason: String::new(),
            fields: Vec::with_capacity(present.len()),
            lineage: Digest::default(),
        };
        if refused(all, &decisions) {
            let ids = denying_policies(&decisions);
            reveal.decision = Decision::Denied;
            reveal.reason = policy::reason(ids.iter().cloned());
            reveal.fields = present
                .iter()
                .map(|f| access(&f.def.name, Disclosure::Denied))
                .collect();
            self.record_read(p, &r.customer_id, reveal, &versions, ids, intent)
                .await?;
            return Err(match (withdrawn_at, first_denial(p, &ctx, &decisions)) {
                (Some(index), VaultError::PermissionDenied(d)) => d
                    .noted(&format!(
                        "; the customer withdrew consent for it (ledger entry {index})"
                    ))
                    .into(),
                (_, e) => e,
            });
        }
        let ids: Vec<String> = present
            .iter()
            .filter_map(|f| decision_of(&f.def.name))
            .flat_map(|d| d.determining())
            .collect();
        reveal.reason = policy::reason(ids.iter().cloned());
        let disclosure_of =
            |name: &str| decision_of(name).map_or(Disclosure::Denied, |d| d.disclosure);
        reveal.fields = present
            .iter()
            .map(|f| access(&f.def.name, disclosure_of(&f.def.name)))
            .collect();
        // INVARIANT: the reveal is durable in the ledger and the lineage
        // before any value leaves the server; if either fails, nothing is
        // returned.
        self.record_read(p, &r.customer_id, reveal, &versions, ids, intent)
            .await?;
        let fields = present
            .into_iter()
            .filter_map(|f| {
                let shown = match disclosure_of(&f.def.name) {
                    Disclosure::Plaintext => Shown::Revealed(f.value),
                    Disclosure::Masked => Shown::Masked(f.def.mask.apply(&f.value)),
                    Disclosure::Denied => return None,
                };
                Some(FieldReading {
                    def: f.def,
                    shown,
                    version: f.version,
                    source: f.source,
                    collected_at_ms: f.collected_at_ms,
                })
            })
            .collect();
        tracing::debug!(principal = %p.name, purpose = %r.purpose, "fields read");
        Ok(Reading {
            customer_id: r.customer_id,
            fields,
        })
    }

    /// Records a read refused before the customer was looked up: the
    /// entry's subject is all zero and it has no lineage, so it says
    /// nothing of whether the customer exists, to the caller or to whoever
    /// reads the ledger.
    async fn record_refused_before_lookup(
        &self,
        p: &Principal,
        purpose: &str,
        defs: &[&FieldDef],
        pre: &[FieldDecision],
        intent: Intent,
    ) -> Result<()> {
        self.audit_announced(
            Body::FieldRevealed(Reveal {
                tenant: p.tenant.clone(),
                subject: Digest::default(),
                actor: p.name.clone(),
                role: p.role.as_str().to_owned(),
                purpose: purpose.to_owned(),
                decision: Decision::Denied,
                reason: policy::reason(denying_policies(pre)),
                fields: defs
                    .iter()
                    .map(|d| access(&d.name, Disclosure::Denied))
                    .collect(),
                lineage: Digest::default(),
            }),
            intent,
        )
        .await?;
        Ok(())
    }

    /// Records a read of `customer` in the lineage and the ledger (the
    /// reveal entry carries the activity's hash), durably.
    async fn record_read(
        &self,
        p: &Principal,
        customer: &str,
        mut reveal: Reveal,
        versions: &[u64],
        policies: Vec<String>,
        intent: Intent,
    ) -> Result<u64> {
        let kind = if reveal.purpose == EXPORT_PURPOSE {
            lpb::ActivityKind::Export
        } else {
            lpb::ActivityKind::Reveal
        };
        let mut activity = Agent::of(&p.name, p.role.as_str(), reveal.purpose.clone(), policies)
            .activity(kind, &p.tenant);
        if reveal.decision == Decision::Denied {
            activity.decision = lpb::Decision::Denied as i32;
        }
        activity.used = reveal
            .fields
            .iter()
            .zip(versions.iter().chain(std::iter::repeat(&0)))
            .map(|(f, version)| lineage::read_usage(&f.field, *version, f.disclosure))
            .collect();
        let ledger = &self.ledger;
        let index = self
            .engine
            .record_access(&p.tenant, customer, activity, |_, hash| {
                reveal.lineage = *hash;
                lineage::appended_index(ledger.append(&[Body::FieldRevealed(reveal)])?)
            });
        drop(intent);
        let index = index?;
        self.commit().await?;
        Ok(index)
    }

    /// Finds customers whose indexed field equals a value, by blind index.
    pub fn search(&self, p: &Principal, s: SearchRequest) -> Result<(Vec<String>, bool)> {
        let schema = self.engine.schema();
        let def = schema.field(&s.field).map_err(|_| {
            let shown: String = s.field.chars().take(64).collect();
            VaultError::invalid("field", format!("unknown field `{shown}`"))
        })?;
        schema.check_purpose(&s.purpose)?;
        // A search spans customers, so no one customer's consents apply:
        // consent-based purposes cannot search personal fields.
        policy::check_fields(
            &self.policies.current(),
            p,
            Action::Search,
            &CustomerAttrs::default(),
            &[&def.policy],
            &policy::context(&s.purpose, 0),
        )?;
        let value = s
            .value
            .ok_or_else(|| VaultError::invalid("value", "required"))?;
        let value = schema.normalise(def, value)?;
        self.engine.search(&p.tenant, def, &value, s.limit)
    }

    /// Erases a customer by crypto-shredding.
    pub async fn erase(
        &self,
        p: &Principal,
        customer_id: String,
        reason: String,
    ) -> Result<ErasureReceipt> {
        let policies = self.authorize(p, Action::Erase)?;
        validate_id("reason", &reason, 64)?;
        // The pseudonym must be taken before the erasure destroys its salt.
        let subject = self.engine.pseudonym(&p.tenant, &customer_id, false)?;
        // The erasure's own lineage names the fields erased, never the
        // customer: it outlives them.
        let mut activity = Agent::of(&p.name, p.role.as_str(), reason.clone(), policies)
            .activity(lpb::ActivityKind::Erase, &p.tenant);
        let fields = self.engine.fields_held(&p.tenant, &customer_id)?;
        activity.count = fields.len() as u64;
        activity.used = fields.into_iter().map(lineage::erased_usage).collect();
        let activity = lineage::Pending::new(activity);
        // Write-ahead: the erasure is in the ledger, durably, before the data
        // goes; if the ledger fails, nothing is erased.
        let ledger_index = self
            .audit(Body::CustomerErased(Erasure {
                tenant: p.tenant.clone(),
                subject,
                actor: p.name.clone(),
                lineage: activity.hash,
            }))
            .await?;
        let outcome = self
            .engine
            .erase(&p.tenant, &customer_id, &activity, ledger_index)?;
        // The contracts' inbox: its open actions are cancelled.
        self.engine
            .contract_inbox(&p.tenant, "customer_erased", "", &customer_id, &subject)?;
        self.engine.commit().await?;
        let mut id = [0u8; 16];
        aes_gcm::aead::OsRng.fill_bytes(&mut id);
        let receipt_id = hex::encode(id);
        tracing::info!(principal = %p.name, receipt = %receipt_id, reason = %reason, "customer erased");
        Ok(ErasureReceipt {
            receipt_id,
            customer_id,
            reason,
            outcome,
            ledger_index,
            subject,
        })
    }

    /// The schema, for a principal allowed to see it.
    pub fn schema(&self, p: &Principal) -> Result<&Schema> {
        self.authorize(p, Action::DescribeSchema)?;
        Ok(self.engine.schema())
    }
}

/// Validates a write and normalises its values.
fn parse_write(schema: &Schema, w: WriteRequest) -> Result<ParsedWrite<'_>> {
    validate_id("customer_id", &w.customer_id, engine::MAX_CUSTOMER_ID_LEN)?;
    if w.fields.is_empty() {
        return Err(VaultError::invalid(
            "fields",
            "at least one field is required",
        ));
    }
    if w.fields.len() > MAX_FIELDS_PER_WRITE {
        return Err(VaultError::invalid(
            "fields",
            format!(
                "{} fields in one write; the limit is {MAX_FIELDS_PER_WRITE}",
                w.fields.len()
            ),
        ));
    }
    let source = w
        .source
        .ok_or_else(|| VaultError::invalid("source", "the collection source is required"))?;
    validate_id("source.channel", &source.channel, 64)?;
    validate_id("source.collector", &source.collector, 64)?;
    if !source.consent_ref.is_empty() {
        validate_id("source.consent_ref", &source.consent_ref, 128)?;
    }
    let mut values = Vec::with_capacity(w.fields.len());
    let mut transformed = Vec::new();
    for (name, raw) in w.fields {
        let def = schema.field(&name)?;
        let v = schema.normalise_ref(def, &raw)?;
        // The vault changed the input (trimmed, E.164, lower case): the
        // stored value is a transformation of what was collected.
        if let (RawValue::Text(r), FieldValue::Text(n)) = (&raw, &v) {
            if r.as_str() != n.as_str() {
                transformed.push(def.name.as_str());
            }
        }
        values.push((def, v));
    }
    values.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(ParsedWrite {
        customer_id: w.customer_id,
        values,
        transformed,
        source,
    })
}

/// The fields a read asks for, in schema order, duplicates collapsed; no
/// names means every field.
fn wanted_fields<'s>(schema: &'s Schema, names: &[String]) -> Result<Vec<&'s FieldDef>> {
    if names.len() > MAX_FIELDS_PER_READ {
        return Err(VaultError::invalid(
            "fields",
            format!("{} names; the limit is {MAX_FIELDS_PER_READ}", names.len()),
        ));
    }
    let mut wanted = BTreeSet::new();
    for name in names {
        wanted.insert(schema.field(name)?.name.as_str());
    }
    Ok(schema
        .fields()
        .iter()
        .filter(|f| names.is_empty() || wanted.contains(f.name.as_str()))
        .collect())
}

/// Whether a read is refused: with no names asked, when every field is
/// withheld (the others are withheld rather than failing the whole read);
/// with names, when any is.
fn refused(all: bool, decisions: &[FieldDecision]) -> bool {
    if all {
        decisions.iter().all(|d| d.disclosure == Disclosure::Denied)
    } else {
        decisions.iter().any(|d| d.disclosure == Disclosure::Denied)
    }
}

/// The policies that withheld fields.
fn denying_policies(decisions: &[FieldDecision]) -> Vec<String> {
    decisions
        .iter()
        .filter(|d| d.disclosure == Disclosure::Denied)
        .flat_map(|d| d.determining())
        .collect()
}

/// The error for the first withheld field.
fn first_denial(
    p: &Principal,
    ctx: &sovra_policy::Context,
    decisions: &[FieldDecision],
) -> VaultError {
    decisions
        .iter()
        .find(|d| d.disclosure == Disclosure::Denied)
        .map(|d| {
            policy::denied(
                p,
                Action::Read,
                Some(&d.field),
                ctx,
                d.read.as_ref().unwrap_or(&d.reveal),
            )
        })
        .unwrap_or_else(|| VaultError::denied(&p.name, p.role.as_str(), "read these fields"))
}

/// A field's entry in a reveal.
fn access(field: &str, d: Disclosure) -> FieldAccess {
    FieldAccess {
        field: field.to_owned(),
        disclosure: match d {
            Disclosure::Plaintext => LedgerDisclosure::Plaintext,
            Disclosure::Masked => LedgerDisclosure::Masked,
            Disclosure::Denied => LedgerDisclosure::Withheld,
        },
    }
}
