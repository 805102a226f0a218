//! Tenant keys: rotation, status and retirement of old versions.
//!
//! Guarantees: every key-state change has its ledger entry, durable before
//! the change takes effect (write-ahead, as erasure); if the ledger fails,
//! the key does not change.

use sovra_ledger::entry::{KeyRetirement, KeyRotation};
use sovra_ledger::Body;
use sovra_policy::Action;

use super::App;
use crate::access::auth::Principal;
use crate::engine::rotation::KeyStatus;
use crate::error::Result;

impl App {
    /// Rotates the caller's tenant key and starts re-wrapping data keys
    /// under the new version in the background.
    pub async fn rotate_key(&self, p: &Principal) -> Result<KeyStatus> {
        self.authorize(p, Action::ManageKeys)?;
        let ledger = self.ledger.clone();
        let (tenant, actor) = (p.tenant.clone(), p.name.clone());
        let st = self
            .engine
            .rotate(&p.tenant, |from_version, to_version| async move {
                ledger
                    .append_durable(&[Body::TenantKeyRotated(KeyRotation {
                        tenant,
                        actor,
                        from_version,
                        to_version,
                    })])
                    .await?;
                Ok(())
            })
            .await?;
        tracing::info!(principal = %p.name, version = st.active_version, "tenant key rotated");
        self.engine.spawn_rotation(p.tenant.clone());
        self.engine.key_status(&p.tenant)
    }

    /// The caller's tenant key versions and rotation progress.
    pub fn key_status(&self, p: &Principal) -> Result<KeyStatus> {
        self.authorize(p, Action::ManageKeys)?;
        self.engine.key_status(&p.tenant)
    }

    /// Retires the caller's tenant key versions below `min_version`;
    /// `force` also drops data keys still wrapped under them (their data
    /// becomes unreadable).
    pub async fn retire_key_versions(
        &self,
        p: &Principal,
        min_version: u32,
        force: bool,
    ) -> Result<KeyStatus> {
        self.authorize(p, Action::ManageKeys)?;
        let ledger = self.ledger.clone();
        let (tenant, actor) = (p.tenant.clone(), p.name.clone());
        let s = self
            .engine
            .retire(&p.tenant, min_version, force, |x| async move {
                ledger
                    .append_durable(&[Body::TenantKeyRetired(KeyRetirement {
                        tenant,
                        actor,
                        from_min_version: x.from_min_version,
                        to_min_version: x.to_min_version,
                        forced: x.forced,
                        data_keys_lost: x.data_keys_lost,
                    })])
                    .await?;
                Ok(())
            })
            .await?;
        tracing::info!(principal = %p.name, min_version, force, "tenant key versions retired");
        Ok(s)
    }
}
