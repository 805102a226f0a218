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
//! - admission is bounded ([`AdmissionConfig`]): at most `max_running` jobs
//!   evaluate at once, on a dedicated pool of `eval_threads` threads (fewer
//!   than the cores, so the vault's request handlers keep a core); the rest
//!   wait in one FIFO queue of at most `max_queued`, and a principal has at
//!   most `max_jobs_per_principal` queued or running (RESOURCE_EXHAUSTED
//!   beyond either); GetJob and WatchJob report a queued job's position, and
//!   cancelling a queued job takes it out of the queue;
//! - every released number that counts or sums customers covers at least k
//!   of them (histogram buckets below k are withheld, see
//!   [`release::suppression`]), and no aggregate is released to a receiver
//!   whose cohort differs from one released to it before by 1..k-1
//!   customers (policy `release-aggregate-no-differencing`, enforced from a
//!   durable record of each released cohort's pseudonyms).
//!
//! Does not: persist jobs across restarts (the job table and the queue are
//! in memory; what was released stays in the ledger, the lineage and the
//! release record), or stop differencing by colluding receivers (see
//! SECURITY.md, "Release privacy").

use crate::access::auth::{Principal, Role};
use crate::access::policy;
use crate::app::App;
use crate::engine::features;
use crate::engine::{now_ms, Engine};
use crate::error::VaultError;
use crate::jobs::release;
use crate::lineage::{self, Agent, JobRecord, Recorder};
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

/// The rule that refuses an aggregate whose cohort differs from one already
/// released to the same receiver by 1..k-1 customers. The vault enforces it
/// (it needs the set of earlier cohorts, which Cedar does not see); k is
/// that of [`MIN_COHORT_POLICY`].
const NO_DIFFERENCING_POLICY: &str = "release-aggregate-no-differencing";

/// The sled tree of released aggregates: key `tenant 0 receiver 0 job_id`,
/// value [`ReleaseRecord`]. Never holds a customer id, only pseudonyms.
const RELEASES_TREE: &str = "sandbox_releases";

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
    admission: Admission,
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
            queue_position: if s.state == pb::JobState::Queued as i32 {
                self.admission.position(&self.id)
            } else {
                0
            },
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

/// Admission limits of the sandbox: how much of the machine jobs may take.
/// The defaults suit a small server (2 cores: one job at a time on one
/// thread, so one core stays with the vault's request handlers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Jobs evaluated at the same time. Default: half the cores, at least 1.
    pub max_running: usize,
    /// Threads of the evaluation pool all running jobs share. Default: half
    /// the cores, at least 1.
    pub eval_threads: usize,
    /// Jobs waiting to run, all principals together. Default 32.
    pub max_queued: usize,
    /// Jobs one principal (of a tenant) may have queued or running. Default 4.
    pub max_jobs_per_principal: usize,
}

impl Default for AdmissionConfig {
    fn default() -> AdmissionConfig {
        let half = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1);
        AdmissionConfig {
            max_running: half,
            eval_threads: half,
            max_queued: 32,
            max_jobs_per_principal: 4,
        }
    }
}

#[derive(Debug)]
struct Admitted {
    owner: String,
    running: bool,
}

#[derive(Debug, Default)]
struct AdmissionState {
    running: usize,
    /// Waiting jobs, first to start first, each with the sender that starts
    /// it.
    queue: std::collections::VecDeque<(String, tokio::sync::oneshot::Sender<()>)>,
    /// Every queued or running job, by id.
    jobs: HashMap<String, Admitted>,
    /// Queued or running jobs per owner.
    per_owner: HashMap<String, usize>,
}

/// The admission queue: a counting semaphore of running jobs with a FIFO
/// queue in front of it, and per-owner counts.
#[derive(Debug, Clone)]
struct Admission {
    cfg: AdmissionConfig,
    state: Arc<Mutex<AdmissionState>>,
}

/// What admission decided for a job.
enum Admit {
    /// It may run now.
    Run(Slot),
    /// It waits; the receiver fires when it may run, and errs if it was
    /// cancelled while waiting.
    Wait(Slot, tokio::sync::oneshot::Receiver<()>),
}

/// A job's place in admission; dropping it gives the place up (hands a
/// running slot to the next queued job, or leaves the queue).
struct Slot {
    admission: Admission,
    job: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.leave(&self.job);
    }
}

impl Admission {
    fn new(cfg: AdmissionConfig) -> Admission {
        Admission {
            cfg,
            state: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `job` of `owner`, or refuses it with RESOURCE_EXHAUSTED.
    fn admit(&self, job: &str, owner: &str) -> Result<Admit, Status> {
        let mut s = self.state();
        let mine = s.per_owner.get(owner).copied().unwrap_or(0);
        if mine >= self.cfg.max_jobs_per_principal {
            return Err(Status::resource_exhausted(format!(
                "you have {mine} sandbox jobs queued or running, the most one principal may have (max_jobs_per_principal = {}); wait for one to finish (WatchJob) or cancel one (CancelJob), then submit again",
                self.cfg.max_jobs_per_principal
            )));
        }
        let run = s.running < self.cfg.max_running.max(1);
        if !run && s.queue.len() >= self.cfg.max_queued {
            return Err(Status::resource_exhausted(format!(
                "the sandbox queue is full ({} jobs waiting, max_queued = {}); submit again once jobs have finished",
                s.queue.len(),
                self.cfg.max_queued
            )));
        }
        *s.per_owner.entry(owner.to_owned()).or_default() += 1;
        s.jobs.insert(
            job.to_owned(),
            Admitted {
                owner: owner.to_owned(),
                running: run,
            },
        );
        let slot = Slot {
            admission: self.clone(),
            job: job.to_owned(),
        };
        if run {
            s.running += 1;
            Ok(Admit::Run(slot))
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.queue.push_back((job.to_owned(), tx));
            Ok(Admit::Wait(slot, rx))
        }
    }

    /// 1-based place of a queued job (0 if it is not queued).
    fn position(&self, job: &str) -> u64 {
        self.state()
            .queue
            .iter()
            .position(|(j, _)| j == job)
            .map_or(0, |i| i as u64 + 1)
    }

    /// Takes a queued job out of the queue (its waiter then errs). False if
    /// it is not queued (running, finished or unknown).
    fn cancel_queued(&self, job: &str) -> bool {
        let mut s = self.state();
        if s.jobs.get(job).is_none_or(|a| a.running) {
            return false;
        }
        Self::forget(&mut s, job);
        true
    }

    /// Removes `job` wherever it is; a running job's slot goes to the next
    /// queued job.
    fn leave(&self, job: &str) {
        let mut s = self.state();
        if let Some(true) = Self::forget(&mut s, job) {
            // Hand the slot on, skipping waiters that are gone.
            while let Some((next, tx)) = s.queue.pop_front() {
                if let Some(a) = s.jobs.get_mut(&next) {
                    a.running = true;
                }
                if tx.send(()).is_ok() {
                    return;
                }
                // Its task is gone (its Slot, when it drops, finds nothing
                // left to give up): forget it and offer the slot on.
                let _ = Self::forget(&mut s, &next);
            }
            s.running = s.running.saturating_sub(1);
        }
    }

    /// Drops `job`'s bookkeeping: Some(was running), None if unknown.
    fn forget(s: &mut AdmissionState, job: &str) -> Option<bool> {
        let a = s.jobs.remove(job)?;
        if let Some(n) = s.per_owner.get_mut(&a.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_owner.remove(&a.owner);
            }
        }
        if !a.running {
            s.queue.retain(|(j, _)| j != job);
        }
        Some(a.running)
    }
}

/// The customers a job may compute on, and its encrypted input.
struct Selection {
    input: JobInput,
    customers: HashMap<u32, String>,
    /// The cohort's pseudonyms, sorted: what the release record keeps.
    subjects: Vec<Digest>,
    excluded: u64,
    policies: Vec<String>,
    /// Policies that refused `compute` for excluded customers, with counts.
    denied_by: BTreeMap<String, u64>,
}

/// The `Sandbox` service.
#[derive(Clone)]
pub struct SandboxService {
    app: App,
    jobs: Arc<Mutex<BTreeMap<String, Arc<JobEntry>>>>,
    workloads: Arc<Vec<Workload>>,
    limits: Limits,
    releases: Releases,
    admission: Admission,
    /// The evaluation threads, or why they could not start (every job then
    /// fails with that reason rather than run unbounded).
    pool: Result<Arc<sovra_sandbox::EvalPool>, String>,
}

impl std::fmt::Debug for SandboxService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxService")
    }
}

impl SandboxService {
    /// The service with the default [`AdmissionConfig`].
    pub fn new(app: App) -> Self {
        Self::with_admission(app, AdmissionConfig::default())
    }

    /// The service, with the shipped workloads validated against the
    /// schema's features, admitting jobs under `admission`.
    pub fn with_admission(app: App, admission: AdmissionConfig) -> Self {
        let catalog = app.engine.schema().feature_catalog();
        // A schema without the features a shipped workload uses simply has
        // no such workload.
        let workloads = workload::builtin(&catalog).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "built-in workloads not available with this schema");
            Vec::new()
        });
        Self {
            app,
            jobs: Arc::default(),
            workloads: Arc::new(workloads),
            limits: Limits::default(),
            releases: Releases::default(),
            admission: Admission::new(admission),
            pool: sovra_sandbox::EvalPool::new(admission.eval_threads)
                .map(Arc::new)
                .map_err(|e| {
                    tracing::error!(error = %e, "sandbox evaluation pool");
                    e.to_string()
                }),
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
    let d = policy::decide_tenant(active, p, action, &ctx).map_err(Status::from)?;
    if d.allowed() {
        return Ok(d.policies().to_vec());
    }
    if d.policies().iter().any(|id| id == MIN_COHORT_POLICY) {
        return Err(Status::failed_precondition(format!(
            "the cohort has {cohort} customers whose consent and policy allow purpose `{}`; policy `{MIN_COHORT_POLICY}` releases aggregates only over larger cohorts",
            spec.purpose()
        )));
    }
    Err(Status::from(policy::denied(p, action, None, &ctx, &d)))
}

/// k: the smallest cohort the release policy in force lets `p` have an
/// aggregate of `spec` over, found by bisection on `cohort_size` between 1
/// and `cohort` (which the caller checked is allowed). The policy's
/// `cohort_size < k` rule is monotone; k = 1 when nothing forbids small
/// cohorts.
fn min_cohort(
    active: &policy::Active,
    p: &Principal,
    spec: &ValidatedSpec,
    cohort: u64,
) -> Result<u64, Status> {
    let allowed = |n: u64| -> Result<bool, Status> {
        let mut ctx = policy::context(spec.purpose(), 0);
        ctx.cohort_size = i64::try_from(n).unwrap_or(i64::MAX);
        let d = policy::decide_tenant(active, p, Action::ReleaseAggregate, &ctx)
            .map_err(Status::from)?;
        Ok(d.allowed())
    };
    // INVARIANT: allowed(hi) holds (checked by the caller); lo is the
    // largest size known refused (0: none yet).
    let (mut lo, mut hi) = (0u64, cohort.max(1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if allowed(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// What the vault keeps of an aggregate it released: the cohort's sorted
/// pseudonyms (never customer ids) and, once decrypted, the released
/// aggregate as encoded in the anchored hash. Durable with the ledger entry
/// of the release (the recorder's commit flushes both).
struct ReleaseRecord {
    job_id: String,
    subjects: Vec<Digest>,
}

const RECORD_VERSION: u8 = 1;

fn release_key(tenant: &str, receiver: &str, job_id: &str) -> Vec<u8> {
    let mut k = release_prefix(tenant, receiver);
    k.extend_from_slice(job_id.as_bytes());
    k
}

fn release_prefix(tenant: &str, receiver: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + receiver.len() + 2);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(receiver.as_bytes());
    k.push(0);
    k
}

/// `version, u32 count, count × 32-byte pseudonym, [released aggregate]`.
fn encode_record(subjects: &[Digest], aggregate: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + 32 * subjects.len() + aggregate.len());
    v.push(RECORD_VERSION);
    // INVARIANT: a cohort has at most Limits::max_customers (10^6) members.
    v.extend_from_slice(&(subjects.len() as u32).to_be_bytes());
    for s in subjects {
        v.extend_from_slice(&s.0);
    }
    v.extend_from_slice(aggregate);
    v
}

fn decode_record(key: &[u8], value: &[u8]) -> crate::Result<ReleaseRecord> {
    let bad = || {
        VaultError::integrity(format!(
            "tree `{RELEASES_TREE}`: a release record is malformed"
        ))
    };
    let job_id = key
        .rsplit(|b| *b == 0)
        .next()
        .and_then(|j| std::str::from_utf8(j).ok())
        .ok_or_else(bad)?
        .to_owned();
    let (&version, rest) = value.split_first().ok_or_else(bad)?;
    if version != RECORD_VERSION || rest.len() < 4 {
        return Err(bad());
    }
    let (n, rest) = rest.split_at(4);
    let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
    let body = rest
        .get(..n.checked_mul(32).ok_or_else(bad)?)
        .ok_or_else(bad)?;
    let subjects = body
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            Digest(d)
        })
        .collect();
    Ok(ReleaseRecord { job_id, subjects })
}

/// |a △ b| for sorted sets, counting no further than `stop`.
fn symmetric_difference(a: &[Digest], b: &[Digest], stop: u64) -> u64 {
    let (mut i, mut j, mut d) = (0, 0, 0u64);
    while (i < a.len() || j < b.len()) && d < stop {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                i += 1;
                d += 1;
            }
            (Some(_), Some(_)) | (None, Some(_)) => {
                j += 1;
                d += 1;
            }
            (Some(_), None) => {
                i += 1;
                d += 1;
            }
            (None, None) => break,
        }
    }
    d
}

/// The earlier release to `receiver` in `tenant` whose cohort differs from
/// `subjects` by 1..k-1 customers, if any: releasing both would let the
/// receiver subtract one aggregate from the other and learn about fewer
/// than k customers. Every earlier aggregate counts, whatever its spec: a
/// count, sum or histogram over nearly the same cohort differences as well
/// as the same spec does.
fn differencing_conflict(
    tree: &sled::Tree,
    tenant: &str,
    receiver: &str,
    subjects: &[Digest],
    k: u64,
) -> crate::Result<Option<String>> {
    if k <= 1 {
        return Ok(None);
    }
    for item in tree.scan_prefix(release_prefix(tenant, receiver)) {
        let (key, value) = item?;
        let r = decode_record(&key, &value)?;
        // Sizes that far apart differ by at least k anyway.
        if (r.subjects.len() as u64).abs_diff(subjects.len() as u64) >= k {
            continue;
        }
        let d = symmetric_difference(&r.subjects, subjects, k);
        if (1..k).contains(&d) {
            return Ok(Some(r.job_id));
        }
    }
    Ok(None)
}

fn differencing_status(k: u64, earlier: &str) -> Status {
    Status::failed_precondition(format!(
        "policy `{NO_DIFFERENCING_POLICY}`: this aggregate's cohort differs by fewer than {k} customers from the cohort of aggregate job `{earlier}` already released to you, so the two results together would single those customers out; it is released once the cohorts differ by at least {k} customers (or are the same)"
    ))
}

/// The release log: durable records of released aggregates, and the lock
/// that makes "check for differencing, then record" one step.
#[derive(Clone, Default)]
struct Releases {
    lock: Arc<Mutex<()>>,
}

impl Releases {
    fn tree(engine: &Engine) -> crate::Result<sled::Tree> {
        Ok(engine.store().db.open_tree(RELEASES_TREE)?)
    }

    /// Refuses if the cohort would difference an earlier release.
    async fn check(
        &self,
        engine: Arc<Engine>,
        p: &Principal,
        subjects: Vec<Digest>,
        k: u64,
    ) -> Result<(), Status> {
        let (tenant, name) = (p.tenant.clone(), p.name.clone());
        let found = tokio::task::spawn_blocking(move || {
            differencing_conflict(&Self::tree(&engine)?, &tenant, &name, &subjects, k)
        })
        .await
        .map_err(|_| Status::internal("the release check task failed"))?
        .map_err(Status::from)?;
        match found {
            Some(earlier) => Err(differencing_status(k, &earlier)),
            None => Ok(()),
        }
    }

    /// Checks, and if no earlier release conflicts, records this one (under
    /// the lock, so two concurrent jobs cannot both pass).
    async fn check_and_record(
        &self,
        engine: Arc<Engine>,
        p: &Principal,
        job_id: &str,
        subjects: Vec<Digest>,
        k: u64,
    ) -> Result<(), Status> {
        let lock = self.lock.clone();
        let (tenant, name, job) = (p.tenant.clone(), p.name.clone(), job_id.to_owned());
        let found = tokio::task::spawn_blocking(move || {
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            let tree = Self::tree(&engine)?;
            if let Some(earlier) = differencing_conflict(&tree, &tenant, &name, &subjects, k)? {
                return Ok(Some(earlier));
            }
            tree.insert(
                release_key(&tenant, &name, &job),
                encode_record(&subjects, &[]),
            )?;
            Ok::<_, VaultError>(None)
        })
        .await
        .map_err(|_| Status::internal("the release record task failed"))?
        .map_err(Status::from)?;
        match found {
            Some(earlier) => Err(differencing_status(k, &earlier)),
            None => Ok(()),
        }
    }

    /// Adds the released aggregate to the job's record, so the record alone
    /// reproduces the anchored output hash.
    fn complete(
        engine: &Engine,
        p: &Principal,
        job_id: &str,
        subjects: &[Digest],
        aggregate: &[u8],
    ) -> crate::Result<()> {
        Self::tree(engine)?.insert(
            release_key(&p.tenant, &p.name, job_id),
            encode_record(subjects, aggregate),
        )?;
        Ok(())
    }
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
    let mut subjects = Vec::new();
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
            subjects.push(subject);
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
    subjects.sort_unstable();
    subjects.dedup();
    Ok(Selection {
        input: JobInput { columns, cohort },
        customers,
        subjects,
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
#[allow(clippy::too_many_arguments)]
async fn execute(
    app: App,
    releases: Releases,
    pool: Result<Arc<sovra_sandbox::EvalPool>, String>,
    entry: Arc<JobEntry>,
    selection: Selection,
    limits: Limits,
    admitted: Admit,
) {
    let slot = match admitted {
        Admit::Run(slot) => slot,
        Admit::Wait(slot, turn) => {
            if turn.await.is_err() {
                // Cancelled while queued: CancelJob already finished it.
                return;
            }
            slot
        }
    };
    entry.status().state = pb::JobState::Running as i32;
    let pool = match pool {
        Ok(p) => p,
        Err(e) => {
            entry.finish(pb::JobState::Failed, e, None);
            return;
        }
    };
    let started = Instant::now();
    let spec = entry.spec.clone();
    let input = selection.input;
    let e2 = entry.clone();
    let engine = app.engine.clone();
    let evaluated = tokio::task::spawn_blocking(move || {
        let material = if spec.needs_bootstrap() {
            match engine.fhe_bootstrap_key(&e2.tenant) {
                Ok(k) => EvaluationMaterial::with_bootstrap(k),
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        } else {
            EvaluationMaterial::new()
        };
        match pool.run(&material, &spec, &input, &e2.progress, &limits) {
            Ok(o) => Outcome::Done(o),
            Err(SandboxError::Cancelled) => Outcome::Cancelled,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    })
    .await;
    // The next queued job may start: what is left (decryption, the ledger)
    // is light.
    drop(slot);
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
        &app,
        &releases,
        &entry,
        &output,
        selection.customers,
        selection.subjects,
        selection.policies,
    )
    .await
    {
        Ok(result) => entry.finish(pb::JobState::Succeeded, String::new(), Some(result)),
        Err(s) => entry.finish(pb::JobState::Failed, s.message().to_owned(), None),
    }
}

/// The gate: re-checks the release policy, decrypts, anchors, returns.
#[allow(clippy::too_many_arguments)]
async fn release(
    app: &App,
    releases: &Releases,
    entry: &JobEntry,
    output: &sovra_sandbox::EncryptedOutput,
    customers: HashMap<u32, String>,
    subjects: Vec<Digest>,
    compute_policies: Vec<String>,
) -> Result<pb::JobResult, Status> {
    let spec = &entry.spec;
    let active = app.policies.current();
    let mut policies = check_release(&active, &entry.receiver, spec, entry.cohort_size)?;
    let aggregate = spec.output() == OutputClass::Aggregate;
    let k = if aggregate {
        let k = min_cohort(&active, &entry.receiver, spec, entry.cohort_size)?;
        // INVARIANT: the record is written before anything is decrypted and
        // kept even if the release fails later: a job that was perhaps
        // released counts against differencing (conservative).
        releases
            .check_and_record(
                app.engine.clone(),
                &entry.receiver,
                &entry.id,
                subjects.clone(),
                k,
            )
            .await?;
        policies.push(NO_DIFFERENCING_POLICY.to_owned());
        k
    } else {
        1
    };
    policies.extend(compute_policies);
    let secret = app.engine.fhe_secret(&entry.tenant).map_err(Status::from)?;
    let mut released = release::open(&secret, spec, output, &customers);
    drop(secret);
    if aggregate {
        let digest = release::cohort_digest(&entry.id, &subjects);
        release::protect(&mut released, k, &digest).map_err(|release::Unreleasable(why)| {
            Status::failed_precondition(format!(
                "policy `{MIN_COHORT_POLICY}`: nothing released: {why}"
            ))
        })?;
        let encoded = released
            .aggregate
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default();
        Releases::complete(&app.engine, &entry.receiver, &entry.id, &subjects, &encoded)
            .map_err(Status::from)?;
    }
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
    let recorder = Recorder::new(app.engine.clone(), app.ledger.clone());
    let index = recorder.record_job(&record).await.map_err(Status::from)?;
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
        let p = crate::grpc::authn::authorized(&self.app, &req, Action::SubmitJob)?;
        let catalog = self.app.engine.schema().feature_catalog();
        let (name, spec, run_as) = match req.into_inner().job {
            Some(pb::submit_job_request::Job::SpecToml(text)) => {
                let spec = sovra_sandbox::spec::parse(&text, &catalog)
                    .map_err(|e| Status::from(VaultError::from(e)))?;
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
        let active = self.app.policies.current();
        if spec.output() == OutputClass::PerCustomer {
            // Refused up front: nothing is computed for a receiver who could
            // never get the result.
            check_release(&active, &p, &spec, 0)?;
        }
        let (engine, ledger, spec2, run_as2, active2) = (
            self.app.engine.clone(),
            self.app.ledger.clone(),
            spec.clone(),
            run_as.clone(),
            active.clone(),
        );
        let selection = tokio::task::spawn_blocking(move || {
            select(&engine, &ledger, &active2, &run_as2, &spec2)
        })
        .await
        .map_err(|_| Status::internal("the cohort selection task failed"))?
        .map_err(Status::from)?;
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
            // Refused up front too (the gate checks again, under its lock,
            // before it decrypts): nothing runs that could not be released.
            let k = min_cohort(&active, &p, &spec, cohort_size)?;
            self.releases
                .check(self.app.engine.clone(), &p, selection.subjects.clone(), k)
                .await?;
        }
        if cohort_size > self.limits.max_customers {
            return Err(Status::resource_exhausted(format!(
                "the cohort has {cohort_size} customers; this server runs jobs over at most {}",
                self.limits.max_customers
            )));
        }
        let spec_needs_bootstrap = spec.needs_bootstrap();
        let id = format!("job-{}", uuid::Uuid::new_v4().simple());
        // Last: a job refused for any other reason takes no place.
        let admitted = self
            .admission
            .admit(&id, &format!("{}\0{}", p.tenant, p.name))?;
        let entry = Arc::new(JobEntry {
            id,
            admission: self.admission.clone(),
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
            self.app.clone(),
            self.releases.clone(),
            self.pool.clone(),
            entry.clone(),
            selection,
            self.limits,
            admitted,
        ));
        Ok(Response::new(entry.view()))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let p = crate::grpc::authn::caller(&req)?;
        let j = self.job(&p, &req.get_ref().job_id, true)?;
        Ok(Response::new(j.view()))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let p = crate::grpc::authn::caller(&req)?;
        let j = self.job(&p, &req.get_ref().job_id, true)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let v = j.view();
                let done = v.state > pb::JobState::Running as i32;
                let key = (v.state, v.blocks_done, v.queue_position);
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
        let p = crate::grpc::authn::caller(&req)?;
        let j = self.job(&p, &req.get_ref().job_id, false)?;
        if self.admission.cancel_queued(&j.id) {
            // It never ran: out of the queue, cancelled now.
            j.finish(pb::JobState::Cancelled, String::new(), None);
            tracing::info!(job = %j.id, by = %p.name, "queued sandbox job cancelled");
        } else if !j.finished() {
            j.progress.cancel();
            tracing::info!(job = %j.id, by = %p.name, "sandbox job cancellation asked");
        }
        Ok(Response::new(j.view()))
    }

    async fn get_result(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        let p = crate::grpc::authn::caller(&req)?;
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
        check_release(&self.app.policies.current(), &p, &j.spec, j.cohort_size)?;
        result.job = Some(view);
        Ok(Response::new(result))
    }

    async fn list_workloads(
        &self,
        req: Request<pb::ListWorkloadsRequest>,
    ) -> Result<Response<pb::ListWorkloadsResponse>, Status> {
        crate::grpc::authn::caller(&req)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(running: usize, queued: usize, per: usize) -> Admission {
        Admission::new(AdmissionConfig {
            max_running: running,
            eval_threads: 1,
            max_queued: queued,
            max_jobs_per_principal: per,
        })
    }

    fn waits(a: Admit) -> (Slot, tokio::sync::oneshot::Receiver<()>) {
        match a {
            Admit::Wait(s, r) => (s, r),
            Admit::Run(_) => panic!("expected to wait"),
        }
    }

    #[test]
    fn admission_is_fifo_bounded_and_per_principal() {
        let a = adm(1, 2, 3);
        let Admit::Run(first) = a.admit("j1", "alice").unwrap() else {
            panic!("the first job runs")
        };
        let (s2, mut r2) = waits(a.admit("j2", "alice").unwrap());
        let (s3, mut r3) = waits(a.admit("j3", "bob").unwrap());
        assert_eq!(
            (a.position("j1"), a.position("j2"), a.position("j3")),
            (0, 1, 2)
        );
        // Alice's fourth: her limit (3 queued or running) is not reached
        // yet, but the queue (2) is full.
        let e = a.admit("j4", "alice").err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("queue is full"), "{}", e.message());
        // Cancelling a queued job frees its place: j3 moves up.
        assert!(a.cancel_queued("j2"));
        assert!(!a.cancel_queued("j1"), "a running job is not in the queue");
        assert!(r2.try_recv().is_err());
        drop(s2);
        assert_eq!(a.position("j3"), 1);
        // The running job ends: j3 starts.
        drop(first);
        assert!(r3.try_recv().is_ok());
        assert_eq!(a.position("j3"), 0);
        assert_eq!(a.state().running, 1);
        drop(s3);
        assert_eq!(a.state().running, 0);
        assert!(a.state().jobs.is_empty() && a.state().per_owner.is_empty());
    }

    #[test]
    fn a_principal_is_limited_to_its_queued_and_running_jobs() {
        let a = adm(1, 10, 2);
        let _j1 = a.admit("j1", "alice").unwrap();
        let _j2 = a.admit("j2", "alice").unwrap();
        let e = a.admit("j3", "alice").err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("max_jobs_per_principal = 2"),
            "{}",
            e.message()
        );
        // Another principal is not affected.
        let _b = a.admit("j4", "bob").unwrap();
        assert_eq!(a.position("j4"), 2);
    }

    #[test]
    fn a_waiter_whose_task_is_gone_is_skipped() {
        let a = adm(1, 10, 10);
        let Admit::Run(first) = a.admit("j1", "x").unwrap() else {
            panic!("runs")
        };
        let (s2, r2) = waits(a.admit("j2", "x").unwrap());
        let (_s3, mut r3) = waits(a.admit("j3", "x").unwrap());
        drop(r2); // j2's task went away before its Slot.
        drop(first);
        assert!(r3.try_recv().is_ok(), "the slot went to j3");
        drop(s2);
        assert_eq!(a.state().running, 1);
    }

    #[test]
    fn symmetric_differences_and_records() {
        let d = |b: u8| Digest([b; 32]);
        let a = vec![d(1), d(2), d(3), d(5)];
        let b = vec![d(2), d(3), d(4)];
        assert_eq!(symmetric_difference(&a, &b, 100), 3);
        assert_eq!(symmetric_difference(&a, &b, 2), 2);
        assert_eq!(symmetric_difference(&a, &a, 100), 0);
        assert_eq!(symmetric_difference(&[], &a, 100), 4);
        let key = release_key("default", "partner", "job-1");
        let r = decode_record(&key, &encode_record(&a, b"tail")).unwrap();
        assert_eq!((r.job_id.as_str(), r.subjects), ("job-1", a));
        assert!(decode_record(&key, &[1, 0, 0, 0, 9]).is_err());
        assert!(decode_record(&key, &[]).is_err());
        assert!(decode_record(&key, &[2, 0, 0, 0, 0]).is_err());
    }
}
