//! The gRPC `Lineage` service: field lineage, accesses and derivations of
//! one customer field, and the tenant's aggregated lineage for export.
//!
//! Guarantees: every call needs `read_lineage` under the policy set in force
//! (officers and admins by default) before any input is looked at beyond
//! its shape; answers carry keyed value hashes and pseudonyms, never values;
//! every activity returned was checked against its ledger anchor.
//!
//! Does not guarantee: that the caller learns nothing from a NOT_FOUND (an
//! officer may learn that a customer id is unknown or erased, as the ledger
//! service's consent queries already tell).

use sovra_policy::Action;
use sovra_proto::lineage::v1 as pb;
use sovra_proto::lineage::v1::lineage_server::Lineage;
use tonic::{Request, Response, Status};

use crate::engine::{validate_id, MAX_CUSTOMER_ID_LEN};
use crate::service::{to_status, Shared};
use crate::VaultError;

/// The `Lineage` service.
#[derive(Debug, Clone)]
pub struct LineageService {
    shared: Shared,
}

impl LineageService {
    /// A service over the shared engine, ledger and gate.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// Authorises the call and checks the customer id and field name.
    fn target<T>(&self, req: &Request<T>, customer: &str, field: &str) -> Result<String, Status> {
        let p = self.shared.principal(req, Action::ReadLineage)?;
        validate_id("customer_id", customer, MAX_CUSTOMER_ID_LEN).map_err(to_status)?;
        // Job outputs (`lead_score`) have lineage too, so a name that is not
        // a schema field is accepted if it is a well-formed identifier; a
        // customer without it gets NOT_FOUND.
        if self.shared.engine.schema().field(field).is_err() {
            validate_id("field", field, 64).map_err(|_| {
                let shown: String = field.chars().take(64).collect();
                to_status(VaultError::invalid(
                    "field",
                    format!("`{shown}` is not a field name"),
                ))
            })?;
        }
        Ok(p.tenant.clone())
    }
}

/// Runs a lineage query (sled reads, ledger checks) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Status::internal("the lineage query failed; the server log has details"))?
        .map_err(to_status)
}

#[tonic::async_trait]
impl Lineage for LineageService {
    async fn get_field_lineage(
        &self,
        req: Request<pb::GetFieldLineageRequest>,
    ) -> Result<Response<pb::FieldLineage>, Status> {
        let tenant = self.target(&req, &req.get_ref().customer_id, &req.get_ref().field)?;
        let r = req.into_inner();
        let engine = self.shared.engine.clone();
        let ledger = self.shared.ledger.clone();
        let out =
            blocking(move || engine.field_lineage(&ledger, &tenant, &r.customer_id, &r.field))
                .await?;
        Ok(Response::new(out))
    }

    async fn list_accesses(
        &self,
        req: Request<pb::ListAccessesRequest>,
    ) -> Result<Response<pb::ListAccessesResponse>, Status> {
        let tenant = self.target(&req, &req.get_ref().customer_id, &req.get_ref().field)?;
        let r = req.into_inner();
        let engine = self.shared.engine.clone();
        let ledger = self.shared.ledger.clone();
        let out = blocking(move || {
            engine.accesses(
                &ledger,
                &tenant,
                &r.customer_id,
                &r.field,
                (r.from_ms, r.to_ms),
                r.limit,
                &r.page_token,
            )
        })
        .await?;
        Ok(Response::new(out))
    }

    async fn get_derived(
        &self,
        req: Request<pb::GetDerivedRequest>,
    ) -> Result<Response<pb::GetDerivedResponse>, Status> {
        let tenant = self.target(&req, &req.get_ref().customer_id, &req.get_ref().field)?;
        let r = req.into_inner();
        let engine = self.shared.engine.clone();
        let ledger = self.shared.ledger.clone();
        let out =
            blocking(move || engine.derived(&ledger, &tenant, &r.customer_id, &r.field)).await?;
        Ok(Response::new(out))
    }

    async fn export_lineage(
        &self,
        req: Request<pb::ExportLineageRequest>,
    ) -> Result<Response<pb::ExportLineageResponse>, Status> {
        let p = self.shared.principal(&req, Action::ReadLineage)?;
        let engine = self.shared.engine.clone();
        let tenant = p.tenant.clone();
        let out = blocking(move || engine.export_lineage(&tenant)).await?;
        Ok(Response::new(out))
    }
}
