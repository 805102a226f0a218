//! Sandbox jobs on the vault's side: submission, cohort selection, the job
//! table, progress, cancellation and the release of results through the
//! gate. `Jobs` has one function per use case (submit, get, watch,
//! cancel, result, list_workloads), each taking the authenticated
//! [`Principal`] and returning a domain value or a [`VaultError`]; the
//! gRPC `Sandbox` service ([`crate::grpc::sandbox`]) only decodes, calls
//! one of them and encodes.
//!
//! Guarantees:
//! - every job is checked before it runs: `submit_job` for the caller, the
//!   spec's bounds, the receiver's right to the output class
//!   (`release_scores` at submission, `release_aggregate` once the cohort
//!   size is known), and `compute` on every feature the job uses for every
//!   customer: the cohort is exactly the customers for whom all of these
//!   `compute` decisions allow it (consent in force, no withdrawal, purpose
//!   allowed for the field and the principal) (`cohort`);
//! - a registered workload runs as its own `Workload` principal (its
//!   department and purpose), on the same path as a partner's job;
//! - the sandbox evaluates with public material only; the gate
//!   (`release`) decrypts after re-checking the release policy
//!   (`release_policy`), and the release is anchored in the ledger (job
//!   id, spec hash, purpose, cohort size, output hash, releasing principal)
//!   with the job's lineage before anyone can fetch it (`runner`, which
//!   anchors through `record`);
//! - only the submitter receives a result; the submitter, officers and
//!   admins of the tenant see a job's state (`table`);
//! - admission is bounded ([`AdmissionConfig`]): at most `max_running` jobs
//!   evaluate at once, on a dedicated pool of `eval_threads` threads (fewer
//!   than the cores, so the vault's request handlers keep a core); the rest
//!   wait in one FIFO queue of at most `max_queued`, and a principal has at
//!   most `max_jobs_per_principal` queued or running (RESOURCE_EXHAUSTED
//!   beyond either); GetJob and WatchJob report a queued job's position, and
//!   cancelling a queued job takes it out of the queue (`admission`);
//! - every released number that counts or sums customers covers at least k
//!   of them (histogram buckets below k are withheld, see
//!   `release::suppression`), and no aggregate is released to a receiver
//!   whose cohort differs from one released to it before by 1..k-1
//!   customers (policy `release-aggregate-no-differencing`, enforced from a
//!   durable record of each released cohort's pseudonyms, `releases`).
//!
//! Does not: persist jobs across restarts (the job table and the queue are
//! in memory; what was released stays in the ledger, the lineage and the
//! release record), or stop differencing by colluding receivers (see
//! SECURITY.md, "Release privacy").
//!
//! Who holds `Jobs`: the gRPC `Sandbox` service, one per server, made in
//! `server.rs` with the `[sandbox]` admission config. [`App`] is shared by
//! every service and cloned freely; the job table, the admission queue and
//! the evaluation pool are state with the server's lifetime that only the
//! sandbox uses, so they live here, next to the App they use, rather than
//! in it. The service also hands in `describe`: how a failure of a job's
//! release is worded in the job's `error` (the edge's wording for the same
//! error, so a job's error says no more than a failed call would).

pub(crate) mod admission;
pub(crate) mod cohort;
pub mod record;
pub(crate) mod release;
pub(crate) mod release_policy;
pub(crate) mod releases;
pub(crate) mod runner;
pub(crate) mod table;
pub mod view;

pub use admission::AdmissionConfig;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use sovra_policy::Action;
use sovra_proto::sandbox::v1 as pb;
use sovra_sandbox::workload::{self, Workload};
use sovra_sandbox::{Limits, OutputClass, Progress, ValidatedSpec};

use crate::access::auth::Principal;
use crate::access::policy;
use crate::app::App;
use crate::engine::now_ms;
use crate::error::{Result, VaultError};
use admission::{Admission, Admit};
use cohort::Selection;
use release_policy::{check_release, min_cohort};
use releases::Releases;
use runner::Runner;
use table::{Access, JobEntry, JobStatus, JobTable};

/// How often WatchJob looks at a job's state.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// A job to submit: the text of its spec, or the id of a registered
/// workload.
#[derive(Debug, Clone)]
pub(crate) enum JobSource {
    /// A spec in TOML (docs/sandbox.md), run as the caller.
    Spec(String),
    /// A registered workload, run as its own principal.
    Workload(String),
}

/// The sandbox's use cases, with the state they share.
#[derive(Clone)]
pub(crate) struct Jobs {
    runner: Arc<Runner>,
    table: JobTable,
    workloads: Arc<Vec<Workload>>,
    admission: Admission,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jobs")
    }
}

impl Jobs {
    /// The jobs of `app`, with the shipped workloads validated against the
    /// schema's features, admitting jobs under `admission`; `describe`
    /// words a failed release for the job's `error`.
    pub(crate) fn new(
        app: App,
        admission: AdmissionConfig,
        describe: fn(VaultError) -> String,
    ) -> Jobs {
        let catalog = app.engine.schema().feature_catalog();
        // A schema without the features a shipped workload uses simply has
        // no such workload.
        let workloads = workload::builtin(&catalog).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "built-in workloads not available with this schema");
            Vec::new()
        });
        let pool = sovra_sandbox::EvalPool::new(admission.eval_threads)
            .map(Arc::new)
            .map_err(|e| {
                tracing::error!(error = %e, "sandbox evaluation pool");
                e.to_string()
            });
        Jobs {
            runner: Arc::new(Runner {
                app,
                releases: Releases::default(),
                pool,
                limits: Limits::default(),
                describe,
            }),
            table: JobTable::default(),
            workloads: Arc::new(workloads),
            admission: Admission::new(admission),
        }
    }

    fn app(&self) -> &App {
        &self.runner.app
    }

    /// SubmitJob: checks the job, selects its cohort, admits it and starts
    /// it; returns the job as accepted (QUEUED).
    pub(crate) async fn submit(&self, p: &Arc<Principal>, source: JobSource) -> Result<pb::Job> {
        self.app().authorize(p, Action::SubmitJob)?;
        let (name, spec, run_as) = self.resolve(p, source)?;
        let active = self.app().policies.current();
        if spec.output() == OutputClass::PerCustomer {
            // Refused up front: nothing is computed for a receiver who could
            // never get the result.
            check_release(&active, p, &spec, 0)?;
        }
        let selection = self.select(&active, &run_as, &spec).await?;
        let cohort_size = selection.input.cohort_size();
        if cohort_size == 0 {
            return Err(VaultError::precondition(format!(
                "the job's cohort is empty: {}",
                selection.empty_reason(&spec)
            )));
        }
        if spec.output() == OutputClass::Aggregate {
            check_release(&active, p, &spec, cohort_size)?;
            // Refused up front too (the gate checks again, under its lock,
            // before it decrypts): nothing runs that could not be released.
            let k = min_cohort(&active, p, &spec, cohort_size)?;
            self.runner
                .releases
                .check(self.app().engine.clone(), p, selection.subjects.clone(), k)
                .await?;
        }
        let max = self.runner.limits.max_customers;
        if cohort_size > max {
            return Err(VaultError::exhausted(format!(
                "the cohort has {cohort_size} customers; this server runs jobs over at most {max}"
            )));
        }
        self.start(p, name, spec, selection)
    }

    /// The job's name, its spec, and the principal it runs as.
    fn resolve(
        &self,
        p: &Principal,
        source: JobSource,
    ) -> Result<(String, ValidatedSpec, Principal)> {
        match source {
            JobSource::Spec(text) => {
                let catalog = self.app().engine.schema().feature_catalog();
                let spec = sovra_sandbox::spec::parse(&text, &catalog)?;
                Ok((spec.name().to_owned(), spec, p.clone()))
            }
            JobSource::Workload(id) => {
                let w = self.workloads.iter().find(|w| w.id == id).ok_or_else(|| {
                    let known: Vec<&str> = self.workloads.iter().map(|w| w.id.as_str()).collect();
                    VaultError::not_found_because(format!(
                        "workload `{}` (registered: {})",
                        id.chars().take(64).collect::<String>(),
                        known.join(", ")
                    ))
                })?;
                let mut run_as = p.clone();
                run_as.name = w.id.clone();
                run_as.policy = sovra_policy::Principal {
                    kind: sovra_policy::PrincipalKind::Workload,
                    name: w.id.clone(),
                    department: w.department.clone(),
                    purposes: [w.spec.purpose().to_owned()].into_iter().collect(),
                };
                Ok((w.id.clone(), w.spec.clone(), run_as))
            }
        }
    }

    /// The cohort, selected off the async threads.
    async fn select(
        &self,
        active: &Arc<policy::Active>,
        run_as: &Principal,
        spec: &ValidatedSpec,
    ) -> Result<Selection> {
        let (engine, ledger, spec, run_as, active) = (
            self.app().engine.clone(),
            self.app().ledger.clone(),
            spec.clone(),
            run_as.clone(),
            active.clone(),
        );
        tokio::task::spawn_blocking(move || {
            cohort::select(&engine, &ledger, &active, &run_as, &spec)
        })
        .await
        .map_err(|_| VaultError::internal("the cohort selection task"))?
    }

    /// Admits a checked job, enters it in the table and spawns its run.
    fn start(
        &self,
        p: &Arc<Principal>,
        name: String,
        spec: ValidatedSpec,
        selection: Selection,
    ) -> Result<pb::Job> {
        let cohort_size = selection.input.cohort_size();
        let id = format!("job-{}", uuid::Uuid::new_v4().simple());
        // Last: a job refused for any other reason takes no place.
        let admitted: Admit = self
            .admission
            .admit(&id, &format!("{}\0{}", p.tenant, p.name))?;
        let blocks_total = if spec.needs_bootstrap() {
            cohort_size
        } else {
            selection.blocks()
        };
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
                blocks_total,
                ..JobStatus::default()
            }),
        });
        self.table.insert(entry.clone());
        tracing::info!(job = %entry.id, name = %entry.name, submitted_by = %p.name, cohort = cohort_size, excluded = selection.excluded, "sandbox job accepted");
        tokio::spawn(runner::execute(
            self.runner.clone(),
            entry.clone(),
            selection,
            admitted,
        ));
        Ok(entry.view())
    }

    /// GetJob: the job's state, for its submitter, officers and admins.
    pub(crate) fn get(&self, p: &Principal, id: &str) -> Result<pb::Job> {
        Ok(self.table.find(p, id, Access::See)?.view())
    }

    /// WatchJob: the job's state now and at every change (state, blocks
    /// done, queue position), ending with its final state; for its
    /// submitter, officers and admins. The stream ends early if its reader
    /// goes away.
    pub(crate) fn watch(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<impl Stream<Item = pb::Job> + Send + 'static> {
        let j = self.table.find(p, id, Access::See)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let v = j.view();
                let done = v.state > pb::JobState::Running as i32;
                let key = (v.state, v.blocks_done, v.queue_position);
                if last != Some(key) {
                    last = Some(key);
                    if tx.send(v).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// CancelJob, for the submitter: a queued job leaves the queue and is
    /// cancelled now; a running one is asked to stop (it ends CANCELLED at
    /// its next check); a finished one is left as it is.
    pub(crate) fn cancel(&self, p: &Principal, id: &str) -> Result<pb::Job> {
        let j = self.table.find(p, id, Access::Own)?;
        if self.admission.cancel_queued(&j.id) {
            // It never ran: out of the queue, cancelled now.
            j.finish(pb::JobState::Cancelled, String::new(), None);
            tracing::info!(job = %j.id, by = %p.name, "queued sandbox job cancelled");
        } else if !j.finished() {
            j.progress.cancel();
            tracing::info!(job = %j.id, by = %p.name, "sandbox job cancellation asked");
        }
        Ok(j.view())
    }

    /// GetResult, for the submitter: the released result with the job's
    /// state, if the release policy in force still allows it.
    pub(crate) fn result(&self, p: &Principal, id: &str) -> Result<pb::JobResult> {
        let j = self.table.find(p, id, Access::Own)?;
        let view = j.view();
        let result = j.status().result.clone();
        let Some(mut result) = result else {
            let state = pb::JobState::try_from(view.state)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            return Err(VaultError::precondition(format!(
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
        check_release(&self.app().policies.current(), p, &j.spec, j.cohort_size)?;
        result.job = Some(view);
        Ok(result)
    }

    /// ListWorkloads: the registered workloads, by id, for any
    /// authenticated caller.
    pub(crate) fn list_workloads(&self, _p: &Principal) -> Vec<pb::Workload> {
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
        workloads
    }
}
