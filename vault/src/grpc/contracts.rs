//! The gRPC `Contracts` service: decode, call the registry
//! ([`crate::contracts`]), encode.

use sovra_proto::contracts::v1 as pb;
use sovra_proto::contracts::v1::contracts_server::Contracts;
use tonic::{Request, Response, Status};

use crate::contracts::{Registration, Registry};
use crate::grpc::authn::caller;

/// The `Contracts` service.
#[derive(Debug, Clone)]
pub struct ContractsService {
    registry: Registry,
}

impl ContractsService {
    /// A service over the registry.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
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
}
