//! The application layer: one function per use case, each taking the
//! authenticated [`Principal`] and a typed request and returning a domain
//! result or a [`VaultError`]. The gRPC handlers and the CLI only decode,
//! call one of these, and encode.
//!
//! The ordering invariants live here, once:
//! - every use case asks the policy set in force before it touches data;
//! - a read decides before it fetches (the pre-check), decides again with
//!   the customer's attributes, records the read durably in the ledger and
//!   the lineage, and only then releases values;
//! - a write is acknowledged only after the vault and the ledger are
//!   durable; an erasure or key change is in the ledger, durably, before it
//!   takes effect;
//! - nothing leaves the server before its ledger entry is durable.

use std::collections::BTreeSet;
use std::sync::Arc;

use sovra_ledger::{Body, Ledger};
use sovra_policy::Action;
use sovra_wal::Intent;

use crate::access::auth::{Authenticator, Principal, Role};
use crate::access::policy::{self, PolicyHolder};
use crate::engine::Engine;
use crate::error::{Result, VaultError};

pub mod audit;
pub mod keys;
pub mod lineage;
pub mod migrate;
pub mod policies;
pub mod records;
pub mod recovery;
pub mod setup;

/// What every use case shares: the engine, authentication, the audit
/// ledger and the policy holder.
#[derive(Debug, Clone)]
pub struct App {
    /// The storage engine.
    pub engine: Arc<Engine>,
    /// Bearer-token authentication.
    pub auth: Arc<Authenticator>,
    /// The consent and audit ledger.
    pub ledger: Arc<Ledger>,
    /// The policy set in force.
    pub policies: Arc<PolicyHolder>,
    /// The tenant whose admins manage what every tenant shares (the policy
    /// set): `[policy] operator_tenant`.
    pub operator_tenant: Arc<str>,
}

/// Most approval tokens one call may carry.
pub const MAX_APPROVALS: usize = 16;

impl App {
    /// Asks the policy set in force whether `p` may do the tenant or
    /// customer `action` (the check every use case without fields makes
    /// before it touches data); returns the determining policy ids.
    pub fn authorize(&self, p: &Principal, action: Action) -> Result<Vec<String>> {
        let d = policy::check(&self.policies.current(), p, action, &policy::context("", 0))?;
        Ok(d.policies().to_vec())
    }

    /// Counts the distinct approvers among `tokens` (the comma-separated
    /// bearer tokens of `x-sovra-approvals`): officers or admins of the
    /// caller's tenant other than the caller. An unknown token is refused.
    pub fn approvals(&self, caller: &Principal, tokens: Option<&str>) -> Result<i64> {
        let Some(v) = tokens else {
            return Ok(0);
        };
        let tokens: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.len() > MAX_APPROVALS {
            return Err(VaultError::invalid(
                "x-sovra-approvals",
                format!("{} tokens; at most {MAX_APPROVALS}", tokens.len()),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, t) in tokens.iter().enumerate() {
            let a = self
                .auth
                .authenticate(Some(&format!("Bearer {t}")))
                .map_err(|_| VaultError::unauthenticated_approval(i + 1))?;
            if a.tenant == caller.tenant
                && a.name != caller.name
                && matches!(a.role, Role::Officer | Role::Admin)
            {
                names.insert(a.name.clone());
            }
        }
        Ok(names.len() as i64)
    }

    /// Waits until the engine's and the ledger's writes are durable (both
    /// flushes run at once).
    pub async fn commit(&self) -> Result<()> {
        let (e, l) = tokio::join!(self.engine.commit(), self.ledger.commit());
        e?;
        l?;
        Ok(())
    }

    /// Appends one entry and waits until it is durable; returns its index.
    pub async fn audit(&self, body: Body) -> Result<u64> {
        let a = self
            .ledger
            .append_durable(std::slice::from_ref(&body))
            .await?;
        Ok(a.first().map_or(0, |a| a.index))
    }

    /// [`App::audit`] for a request that announced its append
    /// ([`Engine::intent`](crate::engine::Engine::intent)): the intent
    /// goes once the entry is appended, before the wait.
    pub(crate) async fn audit_announced(&self, body: Body, intent: Intent) -> Result<u64> {
        let a = self.ledger.append(std::slice::from_ref(&body));
        drop(intent);
        let a = a?;
        self.ledger.commit().await?;
        Ok(a.first().map_or(0, |a| a.index))
    }
}
