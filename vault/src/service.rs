//! The gRPC `Vault` service: authentication, the policy check, input
//! validation, and the one place where [`VaultError`] becomes a gRPC status.
//!
//! Guarantees: every RPC authenticates and asks the policy layer
//! ([`crate::policy`]) before it touches data; field reads and writes are
//! decided per field; a write is answered only after it is durable; status
//! messages name the offending input and the determining policies but never
//! contain a value, a token or key material.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use rand::RngCore;
use sovra_proto::vault::v1 as pb;
use sovra_proto::vault::v1::vault_server::Vault;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::{Authenticator, Principal, Role};
use crate::engine::{validate_id, Engine, Source, WriteLineage};
use crate::error::VaultError;
use crate::lineage::{self, Agent};
use crate::policy::{self, PolicyGate};
use crate::rotation::KeyStatus;
use crate::schema::{FieldDef, FieldValue, RawValue};
use sovra_ledger::entry::{
    Decision, Disclosure as LedgerDisclosure, Erasure, FieldAccess, KeyRetirement, KeyRotation,
    Reveal, Write,
};
use sovra_ledger::{Body, ConsentAction, Ledger, LedgerError};
use sovra_policy::{Action, CustomerAttrs, Disclosure, FieldAttrs, PolicyError};
use sovra_proto::lineage::v1 as lpb;

/// Most fields one write may carry.
pub const MAX_FIELDS_PER_WRITE: usize = 64;
/// Most field names one read may ask for.
pub const MAX_FIELDS_PER_READ: usize = 256;
/// Reads for this purpose are recorded as export activities.
const EXPORT_PURPOSE: &str = "export";
/// Items applied per group commit in a BatchPut stream.
const BATCH_CHUNK: usize = 256;
/// Bytes of BatchPut items one stream may have read but not yet written.
const READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;
/// Items one BatchPut stream may have read but not yet written.
const READ_AHEAD_ITEMS: usize = 65_536;

/// Maps a vault error to its gRPC status. Storage and configuration failures
/// are logged in full and reported without internals.
pub fn to_status(e: VaultError) -> Status {
    match &e {
        VaultError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        VaultError::NotFound(_) => Status::not_found(e.to_string()),
        VaultError::Integrity(_) => {
            tracing::error!(error = %e, "integrity failure");
            Status::data_loss(e.to_string())
        }
        VaultError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        VaultError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        VaultError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
        VaultError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
        VaultError::Storage(_) | VaultError::Config(_) => {
            tracing::error!(error = %e, "internal error");
            Status::internal("internal storage error; the server log has details")
        }
        VaultError::Policy(PolicyError::Invalid(_)) => Status::failed_precondition(e.to_string()),
        VaultError::Policy(_) => {
            tracing::error!(error = %e, "policy failure");
            Status::internal("the policy layer could not decide; the request was denied (the server log has details)")
        }
        VaultError::Ledger(l) => match l {
            LedgerError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            LedgerError::OutOfRange(_) => Status::out_of_range(e.to_string()),
            LedgerError::Verification(_) => Status::failed_precondition(e.to_string()),
            LedgerError::Integrity(_) => {
                tracing::error!(error = %e, "ledger integrity failure");
                Status::data_loss(e.to_string())
            }
            LedgerError::Storage(_) | LedgerError::Config(_) => {
                tracing::error!(error = %e, "ledger failure");
                Status::unavailable(
                    "the audit ledger cannot be written; the operation was not performed (the server log has details)",
                )
            }
        },
    }
}

/// Authenticates the bearer token of `req`.
pub(crate) fn authenticate<T>(
    auth: &Authenticator,
    req: &Request<T>,
) -> Result<Arc<Principal>, Status> {
    let header = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    auth.authenticate(header).map_err(to_status)
}

/// Authenticates the bearer token of `req` and asks the policy set in force
/// whether it may do the tenant or customer `action`: the check every RPC
/// without fields makes before it touches data.
pub(crate) fn principal<T>(
    auth: &Authenticator,
    gate: &PolicyGate,
    req: &Request<T>,
    action: Action,
) -> Result<Arc<Principal>, Status> {
    authorized(auth, gate, req, action).map(|(p, _)| p)
}

/// [`principal`], also returning the determining policy ids.
pub(crate) fn authorized<T>(
    auth: &Authenticator,
    gate: &PolicyGate,
    req: &Request<T>,
    action: Action,
) -> Result<(Arc<Principal>, Vec<String>), Status> {
    let p = authenticate(auth, req)?;
    let d =
        policy::check(&gate.current(), &p, action, &policy::context("", 0)).map_err(to_status)?;
    Ok((p, d.policies().to_vec()))
}

/// Most approval tokens one call may carry.
const MAX_APPROVALS: usize = 16;

/// Counts the distinct approvers whose bearer tokens came in the
/// `x-sovra-approvals` metadata (comma-separated): officers or admins of the
/// caller's tenant other than the caller. An unknown token is refused.
pub(crate) fn approvals<T>(
    auth: &Authenticator,
    req: &Request<T>,
    caller: &Principal,
) -> Result<i64, Status> {
    let Some(v) = req.metadata().get("x-sovra-approvals") else {
        return Ok(0);
    };
    let v = v
        .to_str()
        .map_err(|_| Status::invalid_argument("invalid `x-sovra-approvals`: not ASCII"))?;
    let tokens: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.len() > MAX_APPROVALS {
        return Err(Status::invalid_argument(format!(
            "invalid `x-sovra-approvals`: {} tokens; at most {MAX_APPROVALS}",
            tokens.len()
        )));
    }
    let mut names = BTreeSet::new();
    for (i, t) in tokens.iter().enumerate() {
        let a = auth
            .authenticate(Some(&format!("Bearer {t}")))
            .map_err(|_| {
                Status::unauthenticated(format!("approval {} is not a valid token", i + 1))
            })?;
        if a.tenant == caller.tenant
            && a.name != caller.name
            && matches!(a.role, Role::Officer | Role::Admin)
        {
            names.insert(a.name.clone());
        }
    }
    Ok(names.len() as i64)
}

/// What every service shares: the engine, authentication, the audit ledger
/// and the policy gate.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The storage engine.
    pub engine: Arc<Engine>,
    /// Bearer-token authentication.
    pub auth: Arc<Authenticator>,
    /// The consent and audit ledger.
    pub ledger: Arc<Ledger>,
    /// The policy set in force.
    pub gate: Arc<PolicyGate>,
    /// The tenant whose admins manage what every tenant shares (the policy
    /// set): `[policy] operator_tenant`.
    pub operator_tenant: Arc<str>,
}

impl Shared {
    /// [`principal`] for this service set.
    pub(crate) fn principal<T>(
        &self,
        req: &Request<T>,
        action: Action,
    ) -> Result<Arc<Principal>, Status> {
        principal(&self.auth, &self.gate, req, action)
    }
}

/// The `Vault` service.
#[derive(Debug, Clone)]
pub struct VaultService {
    shared: Shared,
}

impl VaultService {
    /// A service over the shared engine, authentication, ledger and gate.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn principal<T>(&self, req: &Request<T>, action: Action) -> Result<Arc<Principal>, Status> {
        self.shared.principal(req, action)
    }

    /// Waits until the engine's and the ledger's writes are durable (both
    /// flushes run at once).
    async fn commit_both(&self) -> Result<(), Status> {
        let (e, l) = tokio::join!(self.shared.engine.commit(), self.shared.ledger.commit());
        e.map_err(to_status)?;
        l.map_err(|e| to_status(e.into()))?;
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
    ) -> Result<u64, Status> {
        let kind = if reveal.purpose == EXPORT_PURPOSE {
            lpb::ActivityKind::Export
        } else {
            lpb::ActivityKind::Reveal
        };
        let agent = Agent {
            name: p.name.clone(),
            role: p.role.as_str().to_owned(),
            purpose: reveal.purpose.clone(),
            policies,
        };
        let mut activity = agent.activity(kind, &p.tenant);
        if reveal.decision == Decision::Denied {
            activity.decision = lpb::Decision::Denied as i32;
        }
        activity.used = reveal
            .fields
            .iter()
            .zip(versions.iter().chain(std::iter::repeat(&0)))
            .map(|(f, version)| {
                let (masking, disclosure) = match f.disclosure {
                    LedgerDisclosure::Plaintext => (false, "plaintext"),
                    LedgerDisclosure::Masked => (true, "masked"),
                    LedgerDisclosure::Withheld => (true, "withheld"),
                };
                lpb::Usage {
                    field: f.field.clone(),
                    version: *version,
                    transformation: Some(lineage::transformation(
                        lpb::TransformationType::Direct,
                        lpb::TransformationSubtype::Identity,
                        masking,
                        "",
                    )),
                    disclosure: disclosure.to_owned(),
                }
            })
            .collect();
        let ledger = &self.shared.ledger;
        let index = self
            .shared
            .engine
            .record_access(&p.tenant, customer, activity, |_, hash| {
                reveal.lineage = *hash;
                lineage::appended_index(ledger.append(&[Body::FieldRevealed(reveal)])?)
            })
            .map_err(to_status)?;
        self.commit_both().await?;
        Ok(index)
    }

    /// Appends one entry and waits until it is durable; returns its index.
    async fn audit(&self, body: Body) -> Result<u64, Status> {
        let a = self
            .shared
            .ledger
            .append_durable(std::slice::from_ref(&body))
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(a.first().map_or(0, |a| a.index))
    }

    fn parse_put(&self, req: pb::PutRecordRequest) -> Result<ParsedPut<'_>, VaultError> {
        let schema = self.shared.engine.schema();
        validate_id(
            "customer_id",
            &req.customer_id,
            crate::engine::MAX_CUSTOMER_ID_LEN,
        )?;
        if req.fields.is_empty() {
            return Err(VaultError::invalid(
                "fields",
                "at least one field is required",
            ));
        }
        if req.fields.len() > MAX_FIELDS_PER_WRITE {
            return Err(VaultError::invalid(
                "fields",
                format!(
                    "{} fields in one write; the limit is {MAX_FIELDS_PER_WRITE}",
                    req.fields.len()
                ),
            ));
        }
        let source = req
            .source
            .ok_or_else(|| VaultError::invalid("source", "the collection source is required"))?;
        validate_id("source.channel", &source.channel, 64)?;
        validate_id("source.collector", &source.collector, 64)?;
        if !source.consent_ref.is_empty() {
            validate_id("source.consent_ref", &source.consent_ref, 128)?;
        }
        let mut values = Vec::with_capacity(req.fields.len());
        let mut transformed = Vec::new();
        for (name, value) in req.fields {
            let def = schema.field(&name)?;
            let raw = raw_value(value);
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
        Ok((
            req.customer_id,
            values,
            transformed,
            Source {
                channel: source.channel,
                collector: source.collector,
                consent_ref: source.consent_ref,
            },
        ))
    }

    /// Applies one BatchPut chunk across the cores. Items of one customer go
    /// to the same worker, in stream order, so per-customer order holds.
    async fn apply_chunk(
        &self,
        p: &Arc<Principal>,
        first: u64,
        chunk: Vec<pb::PutRecordRequest>,
    ) -> Vec<pb::BatchPutResult> {
        let n = chunk.len();
        let workers = std::thread::available_parallelism()
            .map_or(1, |w| w.get())
            .clamp(1, n.max(1));
        let mut groups: Vec<Vec<(u64, pb::PutRecordRequest)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (i, m) in chunk.into_iter().enumerate() {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            m.customer_id.hash(&mut h);
            groups[(h.finish() as usize) % workers].push((first + i as u64, m));
        }
        let tasks: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let this = self.clone();
                let p = p.clone();
                tokio::task::spawn_blocking(move || {
                    g.into_iter()
                        .map(|(index, m)| this.item_result(&p, index, m))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut out: Vec<pb::BatchPutResult> = Vec::with_capacity(n);
        for t in futures::future::join_all(tasks).await {
            match t {
                Ok(rs) => out.extend(rs),
                Err(e) => tracing::error!(error = %e, "a BatchPut worker failed"),
            }
        }
        out.sort_by_key(|r| r.index);
        // A worker that died leaves holes: report those items as failed.
        let mut full = Vec::with_capacity(n);
        let mut it = out.into_iter().peekable();
        for index in first..first + n as u64 {
            match it.next_if(|r| r.index == index) {
                Some(r) => full.push(r),
                None => full.push(pb::BatchPutResult {
                    index,
                    customer_id: String::new(),
                    code: Code::Internal as i32,
                    message: "internal error while writing this item; the server log has details"
                        .into(),
                    versions: Vec::new(),
                    replayed: false,
                }),
            }
        }
        full
    }

    fn item_result(
        &self,
        p: &Principal,
        index: u64,
        m: pb::PutRecordRequest,
    ) -> pb::BatchPutResult {
        let customer_id = m.customer_id.clone();
        match self.apply_put(p, m) {
            Ok(resp) => pb::BatchPutResult {
                index,
                customer_id,
                code: Code::Ok as i32,
                message: String::new(),
                versions: resp.versions,
                replayed: resp.replayed,
            },
            Err(e) => {
                let s = to_status(e);
                pb::BatchPutResult {
                    index,
                    customer_id,
                    code: s.code() as i32,
                    message: s.message().to_owned(),
                    versions: Vec::new(),
                    replayed: false,
                }
            }
        }
    }

    /// Validates a write, asks the policy layer about each field (`write`),
    /// then stores it.
    fn apply_put(
        &self,
        p: &Principal,
        mut req: pb::PutRecordRequest,
    ) -> Result<pb::PutRecordResponse, VaultError> {
        let idempotency_key = std::mem::take(&mut req.idempotency_key);
        let (customer, values, transformed, source) = self.parse_put(req)?;
        let attrs: Vec<&FieldAttrs> = values.iter().map(|(d, _)| &d.policy).collect();
        let policies = policy::check_fields(
            &self.shared.gate.current(),
            p,
            Action::Write,
            &CustomerAttrs::default(),
            &attrs,
            &policy::context("", 0),
        )?;
        let agent = Agent {
            name: p.name.clone(),
            role: p.role.as_str().to_owned(),
            purpose: String::new(),
            policies,
        };
        let ledger = &self.shared.ledger;
        let (tenant, channel, actor) = (&p.tenant, &source.channel, &p.name);
        let out = self.shared.engine.put(
            &p.tenant,
            &customer,
            &values,
            &source,
            WriteLineage {
                agent: &agent,
                transformed: &transformed,
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
            (!idempotency_key.is_empty()).then_some(crate::engine::Idempotency {
                principal: &p.name,
                key: &idempotency_key,
            }),
        )?;
        Ok(pb::PutRecordResponse {
            customer_id: customer,
            created: out.created,
            replayed: out.replayed,
            versions: out
                .versions
                .into_iter()
                .map(|(field, version)| pb::FieldVersion { field, version })
                .collect(),
        })
    }
}

fn raw_value(v: pb::Value) -> RawValue {
    match v.kind {
        Some(pb::value::Kind::Text(s)) => RawValue::Text(s),
        Some(pb::value::Kind::Integer(i)) => RawValue::Integer(i),
        Some(pb::value::Kind::TimestampMs(t)) => RawValue::Timestamp(t),
        None => RawValue::Missing,
    }
}

fn proto_value(v: &FieldValue) -> pb::Value {
    let kind = match v {
        // The copy into the response leaves zeroizing custody here: prost
        // owns it until it is encoded and dropped.
        FieldValue::Text(s) => pb::value::Kind::Text(s.clone()),
        FieldValue::Integer(i) => pb::value::Kind::Integer(*i),
        FieldValue::Timestamp(t) => pb::value::Kind::TimestampMs(*t),
    };
    pb::Value { kind: Some(kind) }
}

fn key_status(tenant: &str, s: KeyStatus) -> pb::KeyStatus {
    pb::KeyStatus {
        tenant: tenant.to_owned(),
        active_version: s.state.active_version,
        min_version: s.state.min_version,
        data_keys_by_version: s.by_version.into_iter().collect(),
        job: s.state.job.map(|j| pb::RotationJob {
            target_version: j.target_version,
            rewrapped: j.rewrapped,
            total: j.total,
            done: j.done,
            started_at_ms: j.started_at_ms,
            finished_at_ms: j.finished_at_ms,
        }),
    }
}

/// A validated write: customer id, normalised values, the fields whose input
/// normalisation changed, source.
type ParsedPut<'s> = (
    String,
    Vec<(&'s FieldDef, FieldValue)>,
    Vec<&'s str>,
    Source,
);

type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::BatchPutResult, Status>> + Send>>;

#[tonic::async_trait]
impl Vault for VaultService {
    async fn put_record(
        &self,
        req: Request<pb::PutRecordRequest>,
    ) -> Result<Response<pb::PutRecordResponse>, Status> {
        let p = authenticate(&self.shared.auth, &req)?;
        let resp = self.apply_put(&p, req.into_inner()).map_err(to_status)?;
        self.commit_both().await?;
        Ok(Response::new(resp))
    }

    type BatchPutStream = BatchStream;

    async fn batch_put(
        &self,
        req: Request<Streaming<pb::PutRecordRequest>>,
    ) -> Result<Response<Self::BatchPutStream>, Status> {
        // Each item's fields are authorised as it is applied.
        let p = authenticate(&self.shared.auth, &req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(BATCH_CHUNK);
        // The reader drains the request stream as fast as it arrives, into
        // a queue bounded by bytes: the transport never holds a backlog of
        // small DATA frames (which h2 answers with GOAWAY ENHANCE_YOUR_CALM
        // `too_many_data_frames`), and a client that outruns the writes is
        // held back by flow control once READ_AHEAD_BYTES are queued.
        let (items_tx, mut items) = mpsc::channel(READ_AHEAD_ITEMS);
        let budget = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES));
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(m)) => {
                        // INVARIANT: a message is at most max_request_bytes,
                        // below READ_AHEAD_BYTES; clamped all the same so an
                        // acquire can always succeed.
                        let n = m.encoded_len().clamp(1, READ_AHEAD_BYTES) as u32;
                        let Ok(permit) = budget.clone().acquire_many_owned(n).await else {
                            return;
                        };
                        Ok((m, permit))
                    }
                    Ok(None) => return,
                    Err(s) => Err(s),
                };
                let failed = next.is_err();
                if items_tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let mut index = 0u64;
            loop {
                let mut chunk = Vec::new();
                let mut failure = None;
                match items.recv().await {
                    Some(Ok((m, _permit))) => chunk.push(m),
                    Some(Err(s)) => failure = Some(s),
                    None => return,
                }
                // Take whatever else is queued, so one commit covers it all.
                while failure.is_none() && chunk.len() < BATCH_CHUNK {
                    match items.try_recv() {
                        Ok(Ok((m, _permit))) => chunk.push(m),
                        Ok(Err(s)) => failure = Some(s),
                        Err(_) => break,
                    }
                }
                if !chunk.is_empty() {
                    let n = chunk.len() as u64;
                    let mut results = this.apply_chunk(&p, index, chunk).await;
                    index += n;
                    if results
                        .iter()
                        .any(|r| r.code == Code::Ok as i32 && !r.replayed)
                    {
                        if let Err(s) = this.commit_both().await {
                            for r in results.iter_mut().filter(|r| r.code == Code::Ok as i32) {
                                r.code = s.code() as i32;
                                r.message = s.message().to_owned();
                                r.versions.clear();
                            }
                        }
                    }
                    for r in results {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                }
                if let Some(s) = failure {
                    // Every item read before the break was answered above.
                    tracing::warn!(principal = %p.name, items = index, error = %s, "a BatchPut stream broke");
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_fields(
        &self,
        req: Request<pb::GetFieldsRequest>,
    ) -> Result<Response<pb::GetFieldsResponse>, Status> {
        let p = authenticate(&self.shared.auth, &req)?;
        let approvals = approvals(&self.shared.auth, &req, &p)?;
        let req = req.into_inner();
        let schema = self.shared.engine.schema();
        validate_id(
            "customer_id",
            &req.customer_id,
            crate::engine::MAX_CUSTOMER_ID_LEN,
        )
        .map_err(to_status)?;
        schema.check_purpose(&req.purpose).map_err(to_status)?;
        if req.fields.len() > MAX_FIELDS_PER_READ {
            return Err(Status::invalid_argument(format!(
                "invalid `fields`: {} names; the limit is {MAX_FIELDS_PER_READ}",
                req.fields.len()
            )));
        }
        // No names: every field the caller may read for the purpose; the
        // others are withheld rather than failing the whole read.
        let all = req.fields.is_empty();
        let mut wanted = BTreeSet::new();
        for name in &req.fields {
            wanted.insert(schema.field(name).map_err(to_status)?.name.as_str());
        }
        // Schema order, duplicates collapsed.
        let defs: Vec<&FieldDef> = schema
            .fields()
            .iter()
            .filter(|f| all || wanted.contains(f.name.as_str()))
            .collect();
        let attrs: Vec<&FieldAttrs> = defs.iter().map(|d| &d.policy).collect();
        let active = self.shared.gate.current();
        let pol = &active.policies;
        let ctx = policy::context(&req.purpose, approvals);
        let refuse = |decisions: &[sovra_policy::FieldDecision]| {
            if all {
                decisions.iter().all(|d| d.disclosure == Disclosure::Denied)
            } else {
                decisions.iter().any(|d| d.disclosure == Disclosure::Denied)
            }
        };
        let first_denial = |decisions: &[sovra_policy::FieldDecision]| {
            decisions
                .iter()
                .find(|d| d.disclosure == Disclosure::Denied)
                .map(|d| {
                    policy::denied(
                        &p,
                        Action::Read,
                        Some(&d.field),
                        &ctx,
                        d.read.as_ref().unwrap_or(&d.reveal),
                    )
                })
                .unwrap_or_else(|| {
                    VaultError::denied(&p.name, p.role.as_str(), "read these fields")
                })
        };
        // Before touching data: would the read be allowed even for a
        // customer who consented to the purpose? Principals that may never
        // read (officers, partners, admins) stop here, and learn nothing
        // about whether the customer exists.
        let optimistic = CustomerAttrs {
            consents: [req.purpose.clone()].into(),
            ..CustomerAttrs::default()
        };
        let pre = pol
            .scope(&p.policy, &p.tenant, &optimistic, &attrs)
            .and_then(|s| pol.read_fields(&s, &attrs, &ctx))
            .map_err(|e| to_status(e.into()))?;
        if defs.is_empty() || refuse(&pre) {
            return Err(to_status(first_denial(&pre)));
        }
        // The customer's kind and contract value are policy attributes:
        // read them with the fields, never return them unless asked.
        let mut fetch = defs.clone();
        for name in [policy::CUSTOMER_KIND_FIELD, policy::CONTRACT_VALUE_FIELD] {
            if let Ok(d) = schema.field(name) {
                if !fetch.iter().any(|f| f.name == d.name) {
                    fetch.push(d);
                }
            }
        }
        let (subject, revealed) = self
            .shared
            .engine
            .get(&p.tenant, &req.customer_id, &fetch)
            .map_err(to_status)?;
        let consent = self
            .shared
            .ledger
            .consent_state(&subject)
            .map_err(|e| to_status(e.into()))?;
        let withdrawn_at = consent
            .iter()
            .find(|c| c.purpose == req.purpose && c.action == ConsentAction::Withdraw)
            .map(|c| c.index);
        let customer = policy::customer_attrs(&revealed, consent);
        let decisions = pol
            .scope(&p.policy, &p.tenant, &customer, &attrs)
            .and_then(|s| pol.read_fields(&s, &attrs, &ctx))
            .map_err(|e| to_status(e.into()))?;
        let decision_of = |name: &str| decisions.iter().find(|d| d.field == name);
        // Only asked-for fields the record holds are read or withheld.
        let present: Vec<_> = revealed
            .into_iter()
            .filter(|r| decision_of(&r.def.name).is_some())
            .collect();
        let mut reveal = Reveal {
            tenant: p.tenant.clone(),
            subject,
            actor: p.name.clone(),
            role: p.role.as_str().to_owned(),
            purpose: req.purpose.clone(),
            decision: Decision::Allowed,
            reason: String::new(),
            fields: Vec::with_capacity(present.len()),
            lineage: sovra_ledger::Digest::default(),
        };
        let versions: Vec<u64> = present.iter().map(|r| r.version).collect();
        if refuse(&decisions) {
            reveal.decision = Decision::Denied;
            let ids: Vec<String> = decisions
                .iter()
                .filter(|d| d.disclosure == Disclosure::Denied)
                .flat_map(|d| d.determining())
                .collect();
            reveal.reason = policy::reason(ids.iter().cloned());
            reveal.fields = present
                .iter()
                .map(|r| FieldAccess {
                    field: r.def.name.clone(),
                    disclosure: LedgerDisclosure::Withheld,
                })
                .collect();
            self.record_read(&p, &req.customer_id, reveal, &versions, ids)
                .await?;
            let e = match (withdrawn_at, first_denial(&decisions)) {
                (Some(index), VaultError::PermissionDenied(d)) => d
                    .noted(&format!(
                        "; the customer withdrew consent for it (ledger entry {index})"
                    ))
                    .into(),
                (_, e) => e,
            };
            return Err(to_status(e));
        }
        let ids: Vec<String> = present
            .iter()
            .filter_map(|r| decision_of(&r.def.name))
            .flat_map(|d| d.determining())
            .collect();
        reveal.reason = policy::reason(ids.iter().cloned());
        for r in &present {
            let d = decision_of(&r.def.name).map_or(Disclosure::Denied, |d| d.disclosure);
            reveal.fields.push(FieldAccess {
                field: r.def.name.clone(),
                disclosure: match d {
                    Disclosure::Plaintext => LedgerDisclosure::Plaintext,
                    Disclosure::Masked => LedgerDisclosure::Masked,
                    Disclosure::Denied => LedgerDisclosure::Withheld,
                },
            });
        }
        // INVARIANT: the reveal is durable in the ledger and the lineage
        // before any value leaves the server; if either fails, nothing is
        // returned.
        self.record_read(&p, &req.customer_id, reveal, &versions, ids)
            .await?;
        let fields = present
            .into_iter()
            .filter_map(|r| {
                let shown = match decision_of(&r.def.name)?.disclosure {
                    Disclosure::Plaintext => {
                        pb::field_reading::Disclosure::Revealed(proto_value(&r.value))
                    }
                    Disclosure::Masked => {
                        pb::field_reading::Disclosure::Masked(r.def.mask.apply(&r.value))
                    }
                    Disclosure::Denied => return None,
                };
                Some(pb::FieldReading {
                    field: r.def.name.clone(),
                    disclosure: Some(shown),
                    version: r.version,
                    source: Some(pb::CollectionSource {
                        channel: r.source.channel,
                        collector: r.source.collector,
                        consent_ref: r.source.consent_ref,
                    }),
                    collected_at_ms: r.collected_at_ms,
                })
            })
            .collect();
        tracing::debug!(principal = %p.name, purpose = %req.purpose, "fields read");
        Ok(Response::new(pb::GetFieldsResponse {
            customer_id: req.customer_id,
            fields,
        }))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let p = authenticate(&self.shared.auth, &req)?;
        let req = req.into_inner();
        let schema = self.shared.engine.schema();
        let def = schema.field(&req.field).map_err(|_| {
            let shown: String = req.field.chars().take(64).collect();
            Status::invalid_argument(format!("invalid `field`: unknown field `{shown}`"))
        })?;
        schema.check_purpose(&req.purpose).map_err(to_status)?;
        // A search spans customers, so no one customer's consents apply:
        // consent-based purposes cannot search personal fields.
        policy::check_fields(
            &self.shared.gate.current(),
            &p,
            Action::Search,
            &CustomerAttrs::default(),
            &[&def.policy],
            &policy::context(&req.purpose, 0),
        )
        .map_err(to_status)?;
        let value = req
            .value
            .ok_or_else(|| Status::invalid_argument("invalid `value`: required"))?;
        let value = schema.normalise(def, raw_value(value)).map_err(to_status)?;
        let (customer_ids, truncated) = self
            .shared
            .engine
            .search(&p.tenant, def, &value, req.limit)
            .map_err(to_status)?;
        Ok(Response::new(pb::SearchResponse {
            customer_ids,
            truncated,
        }))
    }

    async fn erase_customer(
        &self,
        req: Request<pb::EraseCustomerRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        let (p, policies) = authorized(&self.shared.auth, &self.shared.gate, &req, Action::Erase)?;
        let req = req.into_inner();
        validate_id("reason", &req.reason, 64).map_err(to_status)?;
        // The pseudonym must be taken before the erasure destroys its salt.
        let subject = self
            .shared
            .engine
            .pseudonym(&p.tenant, &req.customer_id, false)
            .map_err(to_status)?;
        // The erasure's own lineage names the fields erased, never the
        // customer: it outlives them.
        let agent = Agent {
            name: p.name.clone(),
            role: p.role.as_str().to_owned(),
            purpose: req.reason.clone(),
            policies,
        };
        let mut activity = agent.activity(lpb::ActivityKind::Erase, &p.tenant);
        let fields = self
            .shared
            .engine
            .fields_held(&p.tenant, &req.customer_id)
            .map_err(to_status)?;
        activity.count = fields.len() as u64;
        activity.used = fields
            .into_iter()
            .map(|field| lpb::Usage {
                field,
                version: 0,
                transformation: Some(lineage::transformation(
                    lpb::TransformationType::Indirect,
                    lpb::TransformationSubtype::Filter,
                    false,
                    "erased",
                )),
                disclosure: String::new(),
            })
            .collect();
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
        let out = self
            .shared
            .engine
            .erase(&p.tenant, &req.customer_id, &activity, ledger_index)
            .map_err(to_status)?;
        self.shared.engine.commit().await.map_err(to_status)?;
        let mut id = [0u8; 16];
        aes_gcm::aead::OsRng.fill_bytes(&mut id);
        let receipt_id = hex::encode(id);
        tracing::info!(principal = %p.name, receipt = %receipt_id, reason = %req.reason, "customer erased");
        Ok(Response::new(pb::ErasureReceipt {
            receipt_id,
            customer_id: req.customer_id,
            reason: req.reason,
            erased_at_ms: out.erased_at_ms,
            fields_erased: out.fields_erased,
            index_entries_removed: out.index_entries_removed,
            data_key_wrap_version: out.wrap_version,
            ledger_index,
            subject: subject.to_hex(),
        }))
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let p = self.principal(&req, Action::ManageKeys)?;
        let ledger = self.shared.ledger.clone();
        let (tenant, actor) = (p.tenant.clone(), p.name.clone());
        // Write-ahead: the rotation's entry is durable before the new version
        // is stored; if the ledger fails, the key does not change.
        let st = self
            .shared
            .engine
            .rotate(&p.tenant, |from_version, to_version| async move {
                ledger
                    .append_durable(&[Body::TenantKeyRotated(KeyRotation {
                        tenant,
                        actor,
                        from_version,
                        to_version,
                    })])
                    .await?;
                Ok(())
            })
            .await
            .map_err(to_status)?;
        tracing::info!(principal = %p.name, version = st.active_version, "tenant key rotated");
        self.shared.engine.spawn_rotation(p.tenant.clone());
        let s = self
            .shared
            .engine
            .key_status(&p.tenant)
            .map_err(to_status)?;
        Ok(Response::new(key_status(&p.tenant, s)))
    }

    async fn get_key_status(
        &self,
        req: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let p = self.principal(&req, Action::ManageKeys)?;
        let s = self
            .shared
            .engine
            .key_status(&p.tenant)
            .map_err(to_status)?;
        Ok(Response::new(key_status(&p.tenant, s)))
    }

    async fn retire_tenant_key_versions(
        &self,
        req: Request<pb::RetireTenantKeyVersionsRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let p = self.principal(&req, Action::ManageKeys)?;
        let r = req.into_inner();
        let ledger = self.shared.ledger.clone();
        let (tenant, actor) = (p.tenant.clone(), p.name.clone());
        // Write-ahead, as rotation: retirement can make data unreadable, so
        // it is in the ledger, durably, before it takes effect.
        let s = self
            .shared
            .engine
            .retire(&p.tenant, r.min_version, r.force, |x| async move {
                ledger
                    .append_durable(&[Body::TenantKeyRetired(KeyRetirement {
                        tenant,
                        actor,
                        from_min_version: x.from_min_version,
                        to_min_version: x.to_min_version,
                        forced: x.forced,
                        data_keys_lost: x.data_keys_lost,
                    })])
                    .await?;
                Ok(())
            })
            .await
            .map_err(to_status)?;
        tracing::info!(principal = %p.name, min_version = r.min_version, force = r.force, "tenant key versions retired");
        Ok(Response::new(key_status(&p.tenant, s)))
    }

    async fn describe_schema(
        &self,
        req: Request<pb::DescribeSchemaRequest>,
    ) -> Result<Response<pb::DescribeSchemaResponse>, Status> {
        self.principal(&req, Action::DescribeSchema)?;
        let s = self.shared.engine.schema();
        Ok(Response::new(pb::DescribeSchemaResponse {
            name: s.name().to_owned(),
            version: s.version(),
            fields: s
                .fields()
                .iter()
                .map(|f| pb::FieldSpec {
                    name: f.name.clone(),
                    r#type: f.ty.as_str().into(),
                    sensitivity: f.sensitivity.as_str().into(),
                    indexed: f.indexed,
                    mask: f.mask.name(),
                    max_len: f.max_len,
                    format: f.format_name().into(),
                    min: f.min,
                    max: f.max,
                    description: f.description.clone(),
                })
                .collect(),
            purposes: s.purposes().map(str::to_owned).collect(),
        }))
    }
}
