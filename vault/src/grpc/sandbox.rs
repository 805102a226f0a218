//! The gRPC `Sandbox` service: decode, call the sandbox's use cases
//! (`crate::jobs::Jobs`), encode. What is guaranteed about jobs is
//! documented in [`crate::jobs`].
//!
//! The one thing decided here is the wording of a failed job's `error`:
//! the message the edge gives for the same error (`describe`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use sovra_proto::sandbox::v1 as pb;
use sovra_proto::sandbox::v1::sandbox_server::Sandbox;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::error::VaultError;
use crate::grpc::authn::caller;
use crate::jobs::{JobSource, Jobs};

/// The `[sandbox]` admission limits, where they were before the jobs layer.
pub use crate::jobs::AdmissionConfig;

/// The `Sandbox` service.
#[derive(Debug, Clone)]
pub struct SandboxService {
    jobs: Jobs,
}

impl SandboxService {
    /// The service with the default [`AdmissionConfig`].
    pub fn new(app: App) -> Self {
        Self::with_admission(app, AdmissionConfig::default())
    }

    /// The service, with the shipped workloads validated against the
    /// schema's features, admitting jobs under `admission`.
    pub fn with_admission(app: App, admission: AdmissionConfig) -> Self {
        Self {
            jobs: Jobs::new(app, admission, describe),
        }
    }
}

/// A failed job's `error`: the message a call failing with `e` would carry
/// (storage and other internal failures are logged, not shown).
fn describe(e: VaultError) -> String {
    Status::from(e).message().to_owned()
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl Sandbox for SandboxService {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let p = caller(&req)?;
        let source = match req.into_inner().job {
            Some(pb::submit_job_request::Job::SpecToml(text)) => JobSource::Spec(text),
            Some(pb::submit_job_request::Job::WorkloadId(id)) => JobSource::Workload(id),
            None => {
                return Err(Status::invalid_argument(
                    "give the job as `spec_toml` or `workload_id`",
                ))
            }
        };
        Ok(Response::new(self.jobs.submit(&p, source).await?))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let p = caller(&req)?;
        Ok(Response::new(self.jobs.get(&p, &req.get_ref().job_id)?))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let p = caller(&req)?;
        let views = self.jobs.watch(&p, &req.get_ref().job_id)?;
        Ok(Response::new(Box::pin(views.map(Ok))))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let p = caller(&req)?;
        Ok(Response::new(self.jobs.cancel(&p, &req.get_ref().job_id)?))
    }

    async fn get_result(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        let p = caller(&req)?;
        Ok(Response::new(self.jobs.result(&p, &req.get_ref().job_id)?))
    }

    async fn list_workloads(
        &self,
        req: Request<pb::ListWorkloadsRequest>,
    ) -> Result<Response<pb::ListWorkloadsResponse>, Status> {
        let p = caller(&req)?;
        let workloads = self.jobs.list_workloads(&p);
        Ok(Response::new(pb::ListWorkloadsResponse { workloads }))
    }
}
