//! The gRPC `Lineage` service: decode, call the application layer
//! ([`crate::app::lineage`]), encode.

use sovra_proto::lineage::v1 as pb;
use sovra_proto::lineage::v1::lineage_server::Lineage;
use tonic::{Request, Response, Status};

use crate::app::lineage::{AccessQuery, FieldRef};
use crate::app::App;
use crate::grpc::authn::caller;

/// The `Lineage` service.
#[derive(Debug, Clone)]
pub struct LineageService {
    app: App,
}

impl LineageService {
    /// A service over the application layer.
    pub fn new(app: App) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl Lineage for LineageService {
    async fn get_field_lineage(
        &self,
        req: Request<pb::GetFieldLineageRequest>,
    ) -> Result<Response<pb::FieldLineage>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let f = FieldRef {
            customer_id: r.customer_id,
            field: r.field,
        };
        Ok(Response::new(self.app.field_lineage(&p, f).await?))
    }

    async fn list_accesses(
        &self,
        req: Request<pb::ListAccessesRequest>,
    ) -> Result<Response<pb::ListAccessesResponse>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let q = AccessQuery {
            target: FieldRef {
                customer_id: r.customer_id,
                field: r.field,
            },
            from_ms: r.from_ms,
            to_ms: r.to_ms,
            limit: r.limit,
            page_token: r.page_token,
        };
        Ok(Response::new(self.app.accesses(&p, q).await?))
    }

    async fn get_derived(
        &self,
        req: Request<pb::GetDerivedRequest>,
    ) -> Result<Response<pb::GetDerivedResponse>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let f = FieldRef {
            customer_id: r.customer_id,
            field: r.field,
        };
        Ok(Response::new(self.app.derived(&p, f).await?))
    }

    async fn export_lineage(
        &self,
        req: Request<pb::ExportLineageRequest>,
    ) -> Result<Response<pb::ExportLineageResponse>, Status> {
        let p = caller(&req)?;
        Ok(Response::new(self.app.export_lineage(&p).await?))
    }
}
