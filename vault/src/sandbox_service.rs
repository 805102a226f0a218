//! The `Sandbox` gRPC service: job submission, cohort selection, the job
//! table, progress, cancellation and the release of results through the
//! gate.
//!
//! Guarantees:
//! - every job is checked before it runs: `submit_job` for the caller, the
//!   spec's bounds, the receiver's right to the output class
//!   (`release_scores` at submission, `release_aggregate` once the cohort
//!   size is known), and `compute` on every feature the job uses for every
//!   customer: the cohort is exactly the customers for whom all of these
//!   `compute` decisions allow it (consent in force, no withdrawal, purpose
//!   allowed for the field and the principal);
//! - a registered workload runs as its own `Workload` principal (its
//!   department and purpose), on the same path as a partner's job;
//! - the sandbox evaluates with public material only; the gate decrypts
//!   after re-checking the release policy, and the release is anchored in
//!   the ledger (job id, spec hash, purpose, cohort size, output hash,
//!   releasing principal) with the job's lineage before anyone can fetch it;
//! - only the submitter receives a result; the submitter, officers and
//!   admins of the tenant see a job's state.
//!
//! Does not: persist jobs across restarts (the job table is in memory; what
//! was released stays in the ledger and the lineage), or queue jobs: each
//! runs as soon as it is accepted, on the blocking pool, its blocks spread
//! over the cores.

use crate::auth::{Principal, Role};
use crate::engine::{now_ms, Engine};
use crate::error::VaultError;
use crate::features;
use crate::gate;
use crate::lineage::{self, Agent, JobRecord, Recorder};
use crate::policy;
use crate::service::{to_status, Shared};
use sovra_ledger::Digest;
use sovra_policy::Action;
use sovra_proto::lineage::v1 as lpb;
use sovra_proto::sandbox::v1 as pb;
use sovra_proto::sandbox::v1::sandbox_server::Sandbox;
use sovra_sandbox::params::SLOTS;
use sovra_sandbox::workload::{self, Workload};
use sovra_sandbox::{
    EvaluationMaterial, JobInput, Limits, OutputClass, Progress, SandboxError, ValidatedSpec,
};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// Most jobs kept in the table; the oldest finished ones go first.
const MAX_JOBS: usize = 256;

/// The policy whose refusal means "cohort below k".
const MIN_COHORT_POLICY: &str = "release-aggregate-min-cohort";

/// Maps a sandbox error to its gRPC status (the service edge).
fn sandbox_status(e: &SandboxError) -> Status {
    match e {
        SandboxError::InvalidSpec(_) => Status::invalid_argument(e.to_string()),
        SandboxError::BadCiphertext(_) => {
            tracing::error!(error = %e, "a stored feature block was rejected");
            Status::data_loss(e.to_string())
        }
        SandboxError::LimitExceeded(_) => Status::resource_exhausted(e.to_string()),
        SandboxError::Cancelled => Status::cancelled(e.to_string()),
        SandboxError::NoBootstrapKey => Status::internal(e.to_string()),
    }
}

#[derive(Debug, Default)]
struct JobStatus {
    state: i32,
    error: String,
    blocks_total: u64,
    finished_at_ms: i64,
    eval_micros: u64,
    result: Option<pb::JobResult>,
}

struct JobEntry {
    id: String,
    tenant: String,
    name: String,
    spec: ValidatedSpec,
    receiver: Arc<Principal>,
    submitted_at_ms: i64,
    cohort_size: u64,
    excluded: u64,
    progress: Progress,
    status: Mutex<JobStatus>,
}

impl JobEntry {
    fn status(&self) -> std::sync::MutexGuard<'_, JobStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self) -> pb::Job {
        let s = self.status();
        let (done, total) = self.progress.get();
        pb::Job {
            job_id: self.id.clone(),
            name: self.name.clone(),
            spec_sha256: hex::encode(self.spec.sha256()),
            purpose: self.spec.purpose().to_owned(),
            output_class: self.spec.output().as_str().to_owned(),
            submitted_by: self.receiver.name.clone(),
            state: s.state,
            cohort_size: self.cohort_size,
            excluded: self.excluded,
            blocks_done: done,
            blocks_total: total.max(s.blocks_total),
            error: s.error.clone(),
            submitted_at_ms: self.submitted_at_ms,
            finished_at_ms: s.finished_at_ms,
            eval_micros: s.eval_micros,
            progress_unit: if self.spec.needs_bootstrap() {
                "customers".into()
            } else {
                self.progress.unit().into()
            },
            bootstraps_per_customer: self.spec.bootstraps_per_customer(),
        }
    }

    fn finished(&self) -> bool {
        self.status().state > pb::JobState::Running as i32
    }

    fn finish(&self, state: pb::JobState, error: String, result: Option<pb::JobResult>) {
        let mut s = self.status();
        s.state = state as i32;
        s.error = error;
        s.finished_at_ms = now_ms();
        s.result = result;
    }
}

/// The customers a job may compute on, and its encrypted input.
struct Selection {
    input: JobInput,
    customers: HashMap<u32, String>,
    excluded: u64,
    policies: Vec<String>,
    /// Policies that refused `compute` for excluded customers, with counts.
    denied_by: BTreeMap<String, u64>,
}

/// The `Sandbox` service.
#[derive(Clone)]
pub struct SandboxService {
    shared: Shared,
    jobs: Arc<Mutex<BTreeMap<String, Arc<JobEntry>>>>,
    workloads: Arc<Vec<Workload>>,
    limits: Limits,
}

impl std::fmt::Debug for SandboxService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxService")
    }
}

impl SandboxService {
    /// The service, with the shipped workloads validated against the
    /// schema's features.
    pub fn new(shared: Shared) -> Self {
        let catalog = shared.engine.schema().feature_catalog();
        // A schema without the features a shipped workload uses simply has
        // no such workload.
        let workloads = workload::builtin(&catalog).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "built-in workloads not available with this schema");
            Vec::new()
        });
        Self {
            shared,
            jobs: Arc::default(),
            workloads: Arc::new(workloads),
            limits: Limits::default(),
        }
    }

    fn job(&self, p: &Principal, id: &str, may_see: bool) -> Result<Arc<JobEntry>, Status> {
        // Job ids are `job-` and 32 hex digits; anything else is not echoed.
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Status::invalid_argument(
                "invalid `job_id`: give the id SubmitJob returned (job-<32 hex digits>)",
            ));
        }
        let entry = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .filter(|j| j.tenant == p.tenant)
            .ok_or_else(|| Status::not_found(format!("job `{id}`")))?;
        let own = entry.receiver.name == p.name;
        let oversight = may_see && matches!(p.role, Role::Officer | Role::Admin);
        if own || oversight {
            Ok(entry)
        } else {
            Err(Status::permission_denied(format!(
                "job `{id}` belongs to `{}`; only its submitter{} may do this",
                entry.receiver.name,
                if may_see { ", officers and admins" } else { "" }
            )))
        }
    }

    fn insert(&self, entry: Arc<JobEntry>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= MAX_JOBS {
            let oldest = jobs
                .values()
                .filter(|j| j.finished())
                .min_by_key(|j| j.submitted_at_ms)
                .map(|j| j.id.clone());
            if let Some(id) = oldest {
                jobs.remove(&id);
            }
        }
        jobs.insert(entry.id.clone(), entry);
    }
}

/// Checks the receiver may get the output class of `spec` over `cohort`
/// customers; FAILED_PRECONDITION for a cohort below k.
fn check_release(
    active: &policy::Active,
    p: &Principal,
    spec: &ValidatedSpec,
    cohort: u64,
) -> Result<Vec<String>, Status> {
    let action = match spec.output() {
        OutputClass::PerCustomer => Action::ReleaseScores,
        OutputClass::Aggregate => Action::ReleaseAggregate,
    };
    let mut ctx = policy::context(spec.purpose(), 0);
    ctx.cohort_size = i64::try_from(cohort).unwrap_or(i64::MAX);
    let d = policy::decide_tenant(active, p, action, &ctx).map_err(to_status)?;
    if d.allowed() {
        return Ok(d.policies().to_vec());
    }
    if d.policies().iter().any(|id| id == MIN_COHORT_POLICY) {
        return Err(Status::failed_precondition(format!(
            "the cohort has {cohort} customers whose consent and policy allow purpose `{}`; policy `{MIN_COHORT_POLICY}` releases aggregates only over larger cohorts",
            spec.purpose()
        )));
    }
    Err(to_status(policy::denied(p, action, None, &ctx, &d)))
}

/// Picks the cohort: every customer with encrypted features for whom
/// `compute` is allowed on every feature the job uses.
fn select(
    engine: &Engine,
    ledger: &sovra_ledger::Ledger,
    active: &policy::Active,
    run_as: &Principal,
    spec: &ValidatedSpec,
) -> crate::Result<Selection> {
    let tenant = &run_as.tenant;
    let schema = engine.schema();
    let feature_defs: Vec<&crate::schema::FieldDef> = spec
        .features()
        .iter()
        .map(|f| schema.field(f))
        .collect::<crate::Result<_>>()?;
    let attrs: Vec<&sovra_policy::FieldAttrs> = feature_defs.iter().map(|d| &d.policy).collect();
    let fetch: Vec<&crate::schema::FieldDef> =
        [policy::CUSTOMER_KIND_FIELD, policy::CONTRACT_VALUE_FIELD]
            .iter()
            .filter_map(|n| schema.field(n).ok())
            .collect();
    let ctx = policy::context(spec.purpose(), 0);
    let mut customers = HashMap::new();
    let mut excluded = 0u64;
    let mut policies = std::collections::BTreeSet::new();
    let mut max_slot = None;
    let mut denied_by: BTreeMap<String, u64> = BTreeMap::new();
    for (customer, slot) in features::slots(&engine.store().features, tenant)? {
        let (subject, revealed) = if fetch.is_empty() {
            (engine.pseudonym(tenant, &customer, false)?, Vec::new())
        } else {
            match engine.get(tenant, &customer, &fetch) {
                Ok(x) => x,
                Err(VaultError::NotFound(_)) => {
                    excluded += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        let consent = ledger.consent_state(&subject)?;
        let attrs_c = policy::customer_attrs(&revealed, consent);
        let scope = active
            .policies
            .scope(&run_as.policy, tenant, &attrs_c, &attrs)?;
        let mut allowed = true;
        let mut ids = Vec::new();
        for f in &feature_defs {
            let d = active
                .policies
                .decide(&scope, Action::Compute, Some(&f.name), &ctx)?;
            if !d.allowed() {
                allowed = false;
                for id in d.policies() {
                    *denied_by.entry(id.clone()).or_default() += 1;
                }
                break;
            }
            ids.extend(d.policies().iter().cloned());
        }
        if allowed {
            policies.extend(ids);
            max_slot = max_slot.max(Some(slot));
            customers.insert(slot, customer);
        } else {
            excluded += 1;
        }
    }
    let blocks = max_slot.map_or(0, |s| s as usize / SLOTS + 1);
    let mut cohort = vec![Vec::new(); blocks];
    let mut slots: Vec<u32> = customers.keys().copied().collect();
    slots.sort_unstable();
    for s in slots {
        // INVARIANT: s % SLOTS < 2048 fits u16.
        cohort[s as usize / SLOTS].push((s as usize % SLOTS) as u16);
    }
    let mut columns = BTreeMap::new();
    for f in spec.features() {
        columns.insert(
            f.clone(),
            features::column(&engine.store().features, tenant, &f, blocks)?,
        );
    }
    Ok(Selection {
        input: JobInput { columns, cohort },
        customers,
        excluded,
        policies: policies.into_iter().collect(),
        denied_by,
    })
}

/// The name a job's output goes by in the lineage.
fn output_name(spec: &ValidatedSpec) -> String {
    let base: String = spec
        .name()
        .chars()
        .map(|c| if c == '-' { '_' } else { c })
        .collect();
    let what = match spec.model() {
        sovra_sandbox::spec::Model::Aggregate { op, .. } => op.as_str(),
        sovra_sandbox::spec::Model::Tree(_) => "leaf",
        _ => "score",
    };
    format!("{base}_{what}")
}

/// How an evaluation ended.
enum Outcome {
    Done(sovra_sandbox::EncryptedOutput),
    Cancelled,
    Failed(String),
}

/// Runs an accepted job to the end: evaluation, the gate, the ledger.
async fn execute(shared: Shared, entry: Arc<JobEntry>, selection: Selection, limits: Limits) {
    entry.status().state = pb::JobState::Running as i32;
    let started = Instant::now();
    let spec = entry.spec.clone();
    let input = selection.input;
    let e2 = entry.clone();
    let engine = shared.engine.clone();
    let evaluated = tokio::task::spawn_blocking(move || {
        let material = if spec.needs_bootstrap() {
            match engine.fhe_bootstrap_key(&e2.tenant) {
                Ok(k) => EvaluationMaterial::with_bootstrap(k),
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        } else {
            EvaluationMaterial::new()
        };
        match sovra_sandbox::run(&material, &spec, &input, &e2.progress, &limits) {
            Ok(o) => Outcome::Done(o),
            Err(SandboxError::Cancelled) => Outcome::Cancelled,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    })
    .await;
    entry.status().eval_micros = started.elapsed().as_micros() as u64;
    let output = match evaluated {
        Ok(Outcome::Done(o)) => o,
        Ok(Outcome::Cancelled) => {
            entry.finish(pb::JobState::Cancelled, String::new(), None);
            return;
        }
        Ok(Outcome::Failed(e)) => {
            entry.finish(pb::JobState::Failed, e, None);
            return;
        }
        Err(_) => {
            entry.finish(
                pb::JobState::Failed,
                "the evaluation task failed".into(),
                None,
            );
            return;
        }
    };
    match release(
        &shared,
        &entry,
        &output,
        selection.customers,
        selection.policies,
    )
    .await
    {
        Ok(result) => entry.finish(pb::JobState::Succeeded, String::new(), Some(result)),
        Err(s) => entry.finish(pb::JobState::Failed, s.message().to_owned(), None),
    }
}

/// The gate: re-checks the release policy, decrypts, anchors, returns.
async fn release(
    shared: &Shared,
    entry: &JobEntry,
    output: &sovra_sandbox::EncryptedOutput,
    customers: HashMap<u32, String>,
    compute_policies: Vec<String>,
) -> Result<pb::JobResult, Status> {
    let spec = &entry.spec;
    let mut policies = check_release(
        &shared.gate.current(),
        &entry.receiver,
        spec,
        entry.cohort_size,
    )?;
    policies.extend(compute_policies);
    let secret = shared.engine.fhe_secret(&entry.tenant).map_err(to_status)?;
    let released = gate::open(&secret, spec, output, &customers);
    drop(secret);
    let hash = released.sha256();
    let (ty, sub, what) = match spec.output() {
        OutputClass::PerCustomer => (
            lpb::TransformationType::Direct,
            lpb::TransformationSubtype::Transformation,
            "score computed on TFHE ciphertexts",
        ),
        OutputClass::Aggregate => (
            lpb::TransformationType::Indirect,
            lpb::TransformationSubtype::Aggregation,
            "aggregate computed on TFHE ciphertexts",
        ),
    };
    let mut cohort: Vec<String> = customers.into_values().collect();
    cohort.sort();
    let record = JobRecord {
        tenant: entry.tenant.clone(),
        job_id: entry.id.clone(),
        spec_sha256: Digest(spec.sha256()),
        agent: Agent {
            name: entry.receiver.name.clone(),
            role: entry.receiver.role.as_str().to_owned(),
            purpose: spec.purpose().to_owned(),
            policies,
        },
        features: spec.features(),
        output: output_name(spec),
        transformation: lineage::transformation(ty, sub, false, what),
        cohort,
        per_customer: released
            .scores
            .iter()
            .map(|s| (s.customer_id.clone(), s.score.to_be_bytes().to_vec()))
            .collect(),
        output_sha256: Digest(hash),
    };
    let recorder = Recorder::new(shared.engine.clone(), shared.ledger.clone());
    let index = recorder.record_job(&record).await.map_err(to_status)?;
    Ok(pb::JobResult {
        job: None,
        scores: released.scores,
        aggregate: released.aggregate,
        output_sha256: hex::encode(hash),
        ledger_index: index,
        released_to: entry.receiver.name.clone(),
    })
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl Sandbox for SandboxService {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let p = self.shared.principal(&req, Action::SubmitJob)?;
        let catalog = self.shared.engine.schema().feature_catalog();
        let (name, spec, run_as) = match req.into_inner().job {
            Some(pb::submit_job_request::Job::SpecToml(text)) => {
                let spec =
                    sovra_sandbox::spec::parse(&text, &catalog).map_err(|e| sandbox_status(&e))?;
                (spec.name().to_owned(), spec, (*p).clone())
            }
            Some(pb::submit_job_request::Job::WorkloadId(id)) => {
                let w = self.workloads.iter().find(|w| w.id == id).ok_or_else(|| {
                    let known: Vec<&str> = self.workloads.iter().map(|w| w.id.as_str()).collect();
                    Status::not_found(format!(
                        "workload `{}` (registered: {})",
                        id.chars().take(64).collect::<String>(),
                        known.join(", ")
                    ))
                })?;
                let mut run_as = (*p).clone();
                run_as.name = w.id.clone();
                run_as.policy = sovra_policy::Principal {
                    kind: sovra_policy::PrincipalKind::Workload,
                    name: w.id.clone(),
                    department: w.department.clone(),
                    purposes: [w.spec.purpose().to_owned()].into_iter().collect(),
                };
                (w.id.clone(), w.spec.clone(), run_as)
            }
            None => {
                return Err(Status::invalid_argument(
                    "give the job as `spec_toml` or `workload_id`",
                ))
            }
        };
        let active = self.shared.gate.current();
        if spec.output() == OutputClass::PerCustomer {
            // Refused up front: nothing is computed for a receiver who could
            // never get the result.
            check_release(&active, &p, &spec, 0)?;
        }
        let (engine, ledger, spec2, run_as2, active2) = (
            self.shared.engine.clone(),
            self.shared.ledger.clone(),
            spec.clone(),
            run_as.clone(),
            active.clone(),
        );
        let selection = tokio::task::spawn_blocking(move || {
            select(&engine, &ledger, &active2, &run_as2, &spec2)
        })
        .await
        .map_err(|_| Status::internal("the cohort selection task failed"))?
        .map_err(to_status)?;
        let cohort_size = selection.input.cohort_size();
        if cohort_size == 0 {
            let why = if selection.denied_by.is_empty() {
                "no customer has encrypted features yet".to_owned()
            } else {
                format!(
                    "policy refuses `compute` on {} for purpose `{}` for all {} customers with features (refused by: {})",
                    spec.features().join(", "),
                    spec.purpose(),
                    selection.excluded,
                    selection
                        .denied_by
                        .iter()
                        .map(|(id, n)| format!("{id} ×{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(Status::failed_precondition(format!(
                "the job's cohort is empty: {why}"
            )));
        }
        if spec.output() == OutputClass::Aggregate {
            check_release(&active, &p, &spec, cohort_size)?;
        }
        if cohort_size > self.limits.max_customers {
            return Err(Status::resource_exhausted(format!(
                "the cohort has {cohort_size} customers; this server runs jobs over at most {}",
                self.limits.max_customers
            )));
        }
        let spec_needs_bootstrap = spec.needs_bootstrap();
        let entry = Arc::new(JobEntry {
            id: format!("job-{}", uuid::Uuid::new_v4().simple()),
            tenant: p.tenant.clone(),
            name,
            spec,
            receiver: p.clone(),
            submitted_at_ms: now_ms(),
            cohort_size,
            excluded: selection.excluded,
            progress: Progress::default(),
            status: Mutex::new(JobStatus {
                state: pb::JobState::Queued as i32,
                blocks_total: if spec_needs_bootstrap {
                    cohort_size
                } else {
                    selection
                        .input
                        .cohort
                        .iter()
                        .filter(|c| !c.is_empty())
                        .count() as u64
                },
                ..JobStatus::default()
            }),
        });
        self.insert(entry.clone());
        tracing::info!(job = %entry.id, name = %entry.name, submitted_by = %p.name, cohort = cohort_size, excluded = selection.excluded, "sandbox job accepted");
        tokio::spawn(execute(
            self.shared.clone(),
            entry.clone(),
            selection,
            self.limits,
        ));
        Ok(Response::new(entry.view()))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let p = crate::service::authenticate(&self.shared.auth, &req)?;
        let j = self.job(&p, &req.get_ref().job_id, true)?;
        Ok(Response::new(j.view()))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let p = crate::service::authenticate(&self.shared.auth, &req)?;
        let j = self.job(&p, &req.get_ref().job_id, true)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let v = j.view();
                let done = v.state > pb::JobState::Running as i32;
                let key = (v.state, v.blocks_done);
                if last != Some(key) {
                    last = Some(key);
                    if tx.send(Ok(v)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let p = crate::service::authenticate(&self.shared.auth, &req)?;
        let j = self.job(&p, &req.get_ref().job_id, false)?;
        if !j.finished() {
            j.progress.cancel();
            tracing::info!(job = %j.id, by = %p.name, "sandbox job cancellation asked");
        }
        Ok(Response::new(j.view()))
    }

    async fn get_result(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        let p = crate::service::authenticate(&self.shared.auth, &req)?;
        let j = self.job(&p, &req.get_ref().job_id, false)?;
        let view = j.view();
        let result = j.status().result.clone();
        let Some(mut result) = result else {
            let state = pb::JobState::try_from(view.state)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            return Err(Status::failed_precondition(format!(
                "job `{}` has no result: it is {state}{}",
                j.id,
                if view.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", view.error)
                }
            )));
        };
        // The policy may have changed since the release: check again.
        check_release(&self.shared.gate.current(), &p, &j.spec, j.cohort_size)?;
        result.job = Some(view);
        Ok(Response::new(result))
    }

    async fn list_workloads(
        &self,
        req: Request<pb::ListWorkloadsRequest>,
    ) -> Result<Response<pb::ListWorkloadsResponse>, Status> {
        crate::service::authenticate(&self.shared.auth, &req)?;
        let mut workloads: Vec<pb::Workload> = self
            .workloads
            .iter()
            .map(|w| pb::Workload {
                id: w.id.clone(),
                description: w.description.clone(),
                purpose: w.spec.purpose().to_owned(),
                output_class: w.spec.output().as_str().to_owned(),
                department: w.department.clone(),
                features: w.spec.features(),
                spec_sha256: hex::encode(w.spec.sha256()),
            })
            .collect();
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::ListWorkloadsResponse { workloads }))
    }
}
