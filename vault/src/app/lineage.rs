//! Lineage queries: where a customer field's values came from, who used
//! them, what was derived from them, and the tenant's aggregated lineage.
//!
//! Guarantees: every query needs `read_lineage` under the policy set in
//! force (officers and admins by default) before any input is looked at
//! beyond its shape; answers carry keyed value hashes and pseudonyms, never
//! values; every activity returned was checked against its ledger anchor.
//!
//! Does not guarantee: that the caller learns nothing from a NOT_FOUND (an
//! officer may learn that a customer id is unknown or erased, as the consent
//! queries already tell).

use sovra_policy::Action;
use sovra_proto::lineage::v1 as pb;

use super::App;
use crate::access::auth::Principal;
use crate::engine::{validate_id, MAX_CUSTOMER_ID_LEN};
use crate::error::{Result, VaultError};

/// One customer field whose lineage is asked for.
#[derive(Debug, Clone)]
pub struct FieldRef {
    /// The customer.
    pub customer_id: String,
    /// A schema field, or a job output (`lead_score`).
    pub field: String,
}

/// A page of a field's accesses.
#[derive(Debug, Clone)]
pub struct AccessQuery {
    /// The field.
    pub target: FieldRef,
    /// From this time (ms, inclusive; 0: from the start).
    pub from_ms: i64,
    /// Up to this time (ms; 0: until now).
    pub to_ms: i64,
    /// Most accesses per page.
    pub limit: u32,
    /// Where the previous page ended (empty: the first page).
    pub page_token: String,
}

impl App {
    /// The lineage of one customer field: its versions and what made them.
    pub async fn field_lineage(&self, p: &Principal, f: FieldRef) -> Result<pb::FieldLineage> {
        let tenant = self.lineage_target(p, &f)?;
        let (engine, ledger) = (self.engine.clone(), self.ledger.clone());
        blocking(move || engine.field_lineage(&ledger, &tenant, &f.customer_id, &f.field)).await
    }

    /// Who read one customer field, when, for what, and how it was shown.
    pub async fn accesses(
        &self,
        p: &Principal,
        q: AccessQuery,
    ) -> Result<pb::ListAccessesResponse> {
        let tenant = self.lineage_target(p, &q.target)?;
        let (engine, ledger) = (self.engine.clone(), self.ledger.clone());
        blocking(move || {
            engine.accesses(
                &ledger,
                &tenant,
                &q.target.customer_id,
                &q.target.field,
                (q.from_ms, q.to_ms),
                q.limit,
                &q.page_token,
            )
        })
        .await
    }

    /// What was derived from one customer field.
    pub async fn derived(&self, p: &Principal, f: FieldRef) -> Result<pb::GetDerivedResponse> {
        let tenant = self.lineage_target(p, &f)?;
        let (engine, ledger) = (self.engine.clone(), self.ledger.clone());
        blocking(move || engine.derived(&ledger, &tenant, &f.customer_id, &f.field)).await
    }

    /// The caller's tenant's aggregated lineage, for export.
    pub async fn export_lineage(&self, p: &Principal) -> Result<pb::ExportLineageResponse> {
        self.authorize(p, Action::ReadLineage)?;
        let (engine, tenant) = (self.engine.clone(), p.tenant.clone());
        blocking(move || engine.export_lineage(&tenant)).await
    }

    /// Authorises a lineage query and checks the customer id and field
    /// name; returns the caller's tenant.
    fn lineage_target(&self, p: &Principal, f: &FieldRef) -> Result<String> {
        self.authorize(p, Action::ReadLineage)?;
        validate_id("customer_id", &f.customer_id, MAX_CUSTOMER_ID_LEN)?;
        // Job outputs (`lead_score`) have lineage too, so a name that is not
        // a schema field is accepted if it is a well-formed identifier; a
        // customer without it gets NOT_FOUND.
        if self.engine.schema().field(&f.field).is_err() {
            validate_id("field", &f.field, 64).map_err(|_| {
                let shown: String = f.field.chars().take(64).collect();
                VaultError::invalid("field", format!("`{shown}` is not a field name"))
            })?;
        }
        Ok(p.tenant.clone())
    }
}

/// Runs a query (sled reads, ledger checks) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| VaultError::internal("the lineage query"))?
}
