//! Running an accepted job to its end: its turn in admission, evaluation
//! on the shared pool, then the release through the gate
//! ([`super::release`]) and the ledger.
//!
//! Guarantees: a job evaluates only once admission gives it a running
//! place, and gives the place up as soon as evaluation ends; evaluation sees
//! public material only (the bootstrap key for bootstrapped jobs); before
//! anything is decrypted the release policy is checked again with the
//! policy set then in force, and for an aggregate k is found again and the
//! release recorded against differencing
//! ([`super::releases::Releases::check_and_record`]); the result is stored
//! in the job only after its ledger entry and lineage are durable. A job
//! ends in exactly one of SUCCEEDED, FAILED or CANCELLED; a failure's text
//! is the one the edge would give for the same error (the service's
//! `describe`), so it says no more than a failed call would.
//!
//! Does not: retry, or keep decrypted values beyond the released result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use sovra_ledger::Digest;
use sovra_proto::lineage::v1 as lpb;
use sovra_proto::sandbox::v1 as pb;
use sovra_sandbox::{
    EncryptedOutput, EvalPool, EvaluationMaterial, JobInput, Limits, OutputClass, SandboxError,
    ValidatedSpec,
};

use super::admission::{Admit, Place};
use super::cohort::Selection;
use super::record::Recorder;
use super::release::{self, Released};
use super::release_policy::{check_release, min_cohort, MIN_COHORT_POLICY};
use super::releases::{Releases, NO_DIFFERENCING_POLICY};
use super::table::JobEntry;
use crate::app::App;
use crate::error::{Result, VaultError};
use crate::lineage::{self, Agent, JobRecord};

/// What running jobs share.
pub(crate) struct Runner {
    pub(crate) app: App,
    pub(crate) releases: Releases,
    /// The evaluation threads, or why they could not start (every job then
    /// fails with that reason rather than run unbounded).
    pub(crate) pool: std::result::Result<Arc<EvalPool>, String>,
    pub(crate) limits: Limits,
    /// How a failed release is worded in the job's `error`.
    pub(crate) describe: fn(VaultError) -> String,
}

/// How an evaluation ended.
enum Outcome {
    Done(EncryptedOutput),
    Cancelled,
    Failed(String),
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

/// Waits for the job's turn: its running place, or None if it was cancelled
/// while queued.
async fn turn(admitted: Admit) -> Option<Place> {
    match admitted {
        Admit::Run(place) => Some(place),
        Admit::Wait(place, turn) => turn.await.ok().map(|()| place),
    }
}

/// Runs an accepted job to the end: evaluation, the gate, the ledger.
pub(crate) async fn execute(
    runner: Arc<Runner>,
    entry: Arc<JobEntry>,
    selection: Selection,
    admitted: Admit,
) {
    let Some(place) = turn(admitted).await else {
        // Cancelled while queued: CancelJob already finished it.
        return;
    };
    entry.status().state = pb::JobState::Running as i32;
    let pool = match &runner.pool {
        Ok(p) => p.clone(),
        Err(e) => {
            entry.finish(pb::JobState::Failed, e.clone(), None);
            return;
        }
    };
    let started = Instant::now();
    let outcome = evaluate(&runner, &entry, pool, selection.input).await;
    // The next queued job may start: what is left (decryption, the ledger)
    // is light.
    drop(place);
    entry.status().eval_micros = started.elapsed().as_micros() as u64;
    let output = match outcome {
        Outcome::Done(o) => o,
        Outcome::Cancelled => {
            entry.finish(pb::JobState::Cancelled, String::new(), None);
            return;
        }
        Outcome::Failed(e) => {
            entry.finish(pb::JobState::Failed, e, None);
            return;
        }
    };
    let cohort = Cohort {
        customers: selection.customers,
        subjects: selection.subjects,
        compute_policies: selection.policies,
    };
    match release_job(&runner, &entry, &output, cohort).await {
        Ok(result) => entry.finish(pb::JobState::Succeeded, String::new(), Some(result)),
        Err(e) => entry.finish(pb::JobState::Failed, (runner.describe)(e), None),
    }
}

/// Evaluates the job on the pool, off the async threads.
async fn evaluate(
    runner: &Runner,
    entry: &Arc<JobEntry>,
    pool: Arc<EvalPool>,
    input: JobInput,
) -> Outcome {
    let spec = entry.spec.clone();
    let e2 = entry.clone();
    let engine = runner.app.engine.clone();
    let limits = runner.limits;
    tokio::task::spawn_blocking(move || {
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
    .await
    .unwrap_or_else(|_| Outcome::Failed("the evaluation task failed".into()))
}

/// Who a job computed on, and under which `compute` decisions.
struct Cohort {
    /// Global place to customer id.
    customers: HashMap<u32, String>,
    /// The cohort's pseudonyms, sorted.
    subjects: Vec<Digest>,
    compute_policies: Vec<String>,
}

/// The gate: re-checks the release policy, decrypts, anchors, returns.
async fn release_job(
    runner: &Runner,
    entry: &JobEntry,
    output: &EncryptedOutput,
    cohort: Cohort,
) -> Result<pb::JobResult> {
    let (mut policies, k) = authorize_release(runner, entry, &cohort.subjects).await?;
    policies.extend(cohort.compute_policies);
    let released = decrypt(
        runner,
        entry,
        output,
        &cohort.customers,
        &cohort.subjects,
        k,
    )?;
    anchor(runner, entry, released, cohort.customers, policies).await
}

/// The release policy again, with the set now in force; for an aggregate,
/// k and the record against differencing. Returns the determining policies
/// and k (1 for per-customer output).
async fn authorize_release(
    runner: &Runner,
    entry: &JobEntry,
    subjects: &[Digest],
) -> Result<(Vec<String>, u64)> {
    let spec = &entry.spec;
    let active = runner.app.policies.current();
    let mut policies = check_release(&active, &entry.receiver, spec, entry.cohort_size)?;
    if spec.output() != OutputClass::Aggregate {
        return Ok((policies, 1));
    }
    let k = min_cohort(&active, &entry.receiver, spec, entry.cohort_size)?;
    // INVARIANT: the record is written before anything is decrypted and
    // kept even if the release fails later: a job that was perhaps
    // released counts against differencing (conservative).
    runner
        .releases
        .check_and_record(
            runner.app.engine.clone(),
            &entry.receiver,
            &entry.id,
            subjects.to_vec(),
            k,
        )
        .await?;
    policies.push(NO_DIFFERENCING_POLICY.to_owned());
    Ok((policies, k))
}

/// Decrypts the cohort's output; an aggregate is protected (k, withheld
/// buckets, the cohort digest) and completes the job's release record.
fn decrypt(
    runner: &Runner,
    entry: &JobEntry,
    output: &EncryptedOutput,
    customers: &HashMap<u32, String>,
    subjects: &[Digest],
    k: u64,
) -> Result<Released> {
    let spec = &entry.spec;
    let secret = runner.app.engine.fhe_secret(&entry.tenant)?;
    let mut released = release::open(&secret, spec, output, customers);
    drop(secret);
    if spec.output() == OutputClass::Aggregate {
        let digest = release::cohort_digest(&entry.id, subjects);
        release::protect(&mut released, k, &digest).map_err(|release::Unreleasable(why)| {
            VaultError::precondition(format!(
                "policy `{MIN_COHORT_POLICY}`: nothing released: {why}"
            ))
        })?;
        let encoded = released
            .aggregate
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default();
        Releases::complete(
            &runner.app.engine,
            &entry.receiver,
            &entry.id,
            subjects,
            &encoded,
        )?;
    }
    Ok(released)
}

/// Anchors the release in the ledger and the lineage (durable when this
/// returns) and builds the result.
async fn anchor(
    runner: &Runner,
    entry: &JobEntry,
    released: Released,
    customers: HashMap<u32, String>,
    policies: Vec<String>,
) -> Result<pb::JobResult> {
    let spec = &entry.spec;
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
    let recorder = Recorder::new(runner.app.engine.clone(), runner.app.ledger.clone());
    let index = recorder.record_job(&record).await?;
    Ok(pb::JobResult {
        job: None,
        scores: released.scores,
        aggregate: released.aggregate,
        output_sha256: hex::encode(hash),
        ledger_index: index,
        released_to: entry.receiver.name.clone(),
    })
}
