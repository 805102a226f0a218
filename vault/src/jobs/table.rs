//! The job table: every accepted job's entry, its state, and who may see
//! or act on it.
//!
//! Guarantees: a job is found only within its submitter's tenant (another
//! tenant's id reads as not found); its state is seen by its submitter and
//! by the tenant's officers and admins, its result taken and its
//! cancellation asked by its submitter only; a job id that is not of the
//! form SubmitJob returns is refused without being echoed. The table holds
//! at most [`MAX_JOBS`] entries: when full, the oldest finished job goes.
//!
//! Does not: persist anything (the table is in memory), or bound the table
//! when every entry is still queued or running (admission does that).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sovra_proto::sandbox::v1 as pb;
use sovra_sandbox::{Progress, ValidatedSpec};

use super::admission::Admission;
use crate::access::auth::{Principal, Role};
use crate::engine::now_ms;
use crate::error::{Result, VaultError};

/// Most jobs kept in the table; the oldest finished ones go first.
const MAX_JOBS: usize = 256;

/// What changes while a job runs.
#[derive(Debug, Default)]
pub(crate) struct JobStatus {
    pub(crate) state: i32,
    pub(crate) error: String,
    pub(crate) blocks_total: u64,
    pub(crate) finished_at_ms: i64,
    pub(crate) eval_micros: u64,
    pub(crate) result: Option<pb::JobResult>,
}

/// One accepted job.
pub(crate) struct JobEntry {
    pub(crate) id: String,
    pub(crate) admission: Admission,
    pub(crate) tenant: String,
    pub(crate) name: String,
    pub(crate) spec: ValidatedSpec,
    pub(crate) receiver: Arc<Principal>,
    pub(crate) submitted_at_ms: i64,
    pub(crate) cohort_size: u64,
    pub(crate) excluded: u64,
    pub(crate) progress: Progress,
    pub(crate) status: Mutex<JobStatus>,
}

impl JobEntry {
    pub(crate) fn status(&self) -> MutexGuard<'_, JobStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job as GetJob reports it.
    pub(crate) fn view(&self) -> pb::Job {
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

    pub(crate) fn finished(&self) -> bool {
        self.status().state > pb::JobState::Running as i32
    }

    pub(crate) fn finish(&self, state: pb::JobState, error: String, result: Option<pb::JobResult>) {
        let mut s = self.status();
        s.state = state as i32;
        s.error = error;
        s.finished_at_ms = now_ms();
        s.result = result;
    }
}

/// What a caller wants to do with a job, and so who may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// See its state (GetJob, WatchJob): the submitter, officers and
    /// admins of its tenant.
    See,
    /// Take its result or cancel it: the submitter only.
    Own,
}

/// The bounded table of jobs, by id.
#[derive(Clone, Default)]
pub(crate) struct JobTable {
    jobs: Arc<Mutex<BTreeMap<String, Arc<JobEntry>>>>,
}

impl JobTable {
    /// The job `id` if `p` may have `access` to it.
    pub(crate) fn find(&self, p: &Principal, id: &str, access: Access) -> Result<Arc<JobEntry>> {
        // Job ids are `job-` and 32 hex digits; anything else is not echoed.
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(VaultError::invalid(
                "job_id",
                "give the id SubmitJob returned (job-<32 hex digits>)",
            ));
        }
        let entry = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .filter(|j| j.tenant == p.tenant)
            .ok_or_else(|| VaultError::not_found_because(format!("job `{id}`")))?;
        let may_see = access == Access::See;
        let own = entry.receiver.name == p.name;
        let oversight = may_see && matches!(p.role, Role::Officer | Role::Admin);
        if own || oversight {
            Ok(entry)
        } else {
            Err(VaultError::denied_because(format!(
                "job `{id}` belongs to `{}`; only its submitter{} may do this",
                entry.receiver.name,
                if may_see { ", officers and admins" } else { "" }
            )))
        }
    }

    /// Adds `entry`, making room by dropping the oldest finished job if
    /// the table is full.
    pub(crate) fn insert(&self, entry: Arc<JobEntry>) {
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
