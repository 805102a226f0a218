//! The gRPC `Contracts` service: decode, call the registry and the runtime
//! ([`crate::contracts`]), encode.

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use sovra_contracts::Scalar;
use sovra_proto::contracts::v1 as pb;
use sovra_proto::contracts::v1::contracts_server::Contracts;
use tonic::{Request, Response, Status};

use crate::contracts::runtime::{Runtime, SignalRequest};
use crate::contracts::{evidence, Registration, Registry};
use crate::error::VaultError;
use crate::grpc::authn::caller;

/// The `Contracts` service.
#[derive(Debug, Clone)]
pub struct ContractsService {
    registry: Registry,
    runtime: Runtime,
}

impl ContractsService {
    /// A service over the registry and the runtime.
    pub fn new(registry: Registry, runtime: Runtime) -> Self {
        Self { registry, runtime }
    }
}

type ActionStream = Pin<Box<dyn Stream<Item = Result<pb::ActionDelivery, Status>> + Send>>;

fn attrs(
    m: std::collections::HashMap<String, pb::Value>,
) -> Result<BTreeMap<String, Scalar>, Status> {
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let s = match v.kind {
            Some(pb::value::Kind::Text(t)) => Scalar::Str(t),
            Some(pb::value::Kind::Integer(i)) => Scalar::Int(i),
            Some(pb::value::Kind::Boolean(b)) => Scalar::Bool(b),
            None => {
                let shown: String = k.chars().take(64).collect();
                return Err(VaultError::invalid(
                    "attrs",
                    format!("attribute `{shown}` has no value (set text, integer or boolean)"),
                )
                .into());
            }
        };
        out.insert(k, s);
    }
    Ok(out)
}

#[tonic::async_trait]
impl Contracts for ContractsService {
    async fn register_contract(
        &self,
        req: Request<pb::RegisterContractRequest>,
    ) -> Result<Response<pb::Contract>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let reg = Registration {
            manifest: r.manifest,
            guest: r.guest,
            file_name: r.file_name,
        };
        Ok(Response::new(self.registry.register(&p, reg).await?))
    }

    async fn list_contracts(
        &self,
        req: Request<pb::ListContractsRequest>,
    ) -> Result<Response<pb::ListContractsResponse>, Status> {
        let p = caller(&req)?;
        let contracts = self.registry.list(&p, req.get_ref().include_disabled)?;
        Ok(Response::new(pb::ListContractsResponse { contracts }))
    }

    async fn get_contract(
        &self,
        req: Request<pb::GetContractRequest>,
    ) -> Result<Response<pb::ContractDetail>, Status> {
        let p = caller(&req)?;
        let r = req.get_ref();
        Ok(Response::new(self.registry.get(&p, &r.id, r.version)?))
    }

    async fn disable_contract(
        &self,
        req: Request<pb::DisableContractRequest>,
    ) -> Result<Response<pb::Contract>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        Ok(Response::new(
            self.registry.disable(&p, &r.id, &r.reason).await?,
        ))
    }

    async fn signal(
        &self,
        req: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let s = SignalRequest {
            name: r.name,
            customer_id: r.customer_id,
            contract: r.contract,
            idempotency_key: r.idempotency_key,
            attrs: attrs(r.attrs)?,
        };
        Ok(Response::new(self.runtime.signal(&p, s).await?))
    }

    type WatchActionsStream = ActionStream;

    async fn watch_actions(
        &self,
        req: Request<pb::WatchActionsRequest>,
    ) -> Result<Response<Self::WatchActionsStream>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let rx = self
            .runtime
            .watch(&p, r.kinds, r.contract, r.lease_seconds)?;
        let stream =
            tokio_stream::wrappers::ReceiverStream::new(rx).map(|d| d.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn complete_action(
        &self,
        req: Request<pb::CompleteActionRequest>,
    ) -> Result<Response<pb::ActionOutcome>, Status> {
        let p = caller(&req)?;
        Ok(Response::new(
            self.runtime.complete(&p, &req.get_ref().handle).await?,
        ))
    }

    async fn fail_action(
        &self,
        req: Request<pb::FailActionRequest>,
    ) -> Result<Response<pb::ActionOutcome>, Status> {
        let p = caller(&req)?;
        let r = req.get_ref();
        Ok(Response::new(
            self.runtime.fail(&p, &r.handle, &r.reason).await?,
        ))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let p = caller(&req)?;
        let instances = self.runtime.list(&p, req.get_ref())?;
        Ok(Response::new(pb::ListInstancesResponse { instances }))
    }

    async fn get_evidence(
        &self,
        req: Request<pb::GetEvidenceRequest>,
    ) -> Result<Response<pb::Evidence>, Status> {
        let p = caller(&req)?;
        let instance = req.get_ref().instance;
        let report = self.runtime.evidence(&p, instance).await?;
        let json = serde_json::to_string_pretty(&report)
            .map_err(|_| VaultError::internal("rendering the evidence report"))?;
        let tree_size = evidence::verify(json.as_bytes(), None)?.tree_size;
        Ok(Response::new(pb::Evidence {
            entries: report.entries.len() as u64,
            tree_size,
            json,
        }))
    }
}
