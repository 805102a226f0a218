//! The request model: who asks ([`Principal`]), to do what ([`Action`]), to
//! which customer and field ([`CustomerAttrs`], [`FieldAttrs`]), in which
//! [`Context`]. These mirror `sovra.cedarschema` one to one.
//!
//! Guarantees: every value here is turned into a typed Cedar value that the
//! schema checks; nothing is interpolated into policy text.

use std::collections::BTreeSet;

/// The kind of principal; each is a Cedar entity type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// Internal services.
    Service,
    /// Compliance officers.
    Officer,
    /// Partner modelers.
    Partner,
    /// Operators.
    Admin,
    /// Sandbox guest workloads.
    Workload,
}

impl PrincipalKind {
    /// Every kind.
    pub const ALL: [PrincipalKind; 5] = [
        PrincipalKind::Service,
        PrincipalKind::Officer,
        PrincipalKind::Partner,
        PrincipalKind::Admin,
        PrincipalKind::Workload,
    ];

    /// The Cedar entity type, without namespace.
    pub fn type_name(self) -> &'static str {
        match self {
            PrincipalKind::Service => "Service",
            PrincipalKind::Officer => "Officer",
            PrincipalKind::Partner => "Partner",
            PrincipalKind::Admin => "Admin",
            PrincipalKind::Workload => "Workload",
        }
    }

    /// Parses a role name as the configuration writes it (`service`, ...).
    pub fn from_role(role: &str) -> Option<PrincipalKind> {
        PrincipalKind::ALL
            .into_iter()
            .find(|k| k.type_name().eq_ignore_ascii_case(role))
    }
}

/// Who asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// Its kind.
    pub kind: PrincipalKind,
    /// Its configured name (the Cedar entity id).
    pub name: String,
    /// The department it belongs to ("" for none).
    pub department: String,
    /// The purposes it may declare.
    pub purposes: BTreeSet<String>,
}

/// What the resource of an action is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One field of one customer.
    Field,
    /// A customer as a whole.
    Customer,
    /// The tenant.
    Tenant,
}

/// Every action of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Write a field.
    Write,
    /// Read a field (masked unless `reveal` is also allowed).
    Read,
    /// See a field's plaintext.
    Reveal,
    /// Search by a field's blind index.
    Search,
    /// Compute on a field's ciphertext in the sandbox.
    Compute,
    /// Erase a customer.
    Erase,
    /// Record a consent grant or withdrawal.
    RecordConsent,
    /// Read a customer's consent state.
    ReadConsent,
    /// Read checkpoints, proofs, entries, audit bundles and policy status.
    ReadAudit,
    /// Rotate, inspect or retire tenant keys.
    ManageKeys,
    /// Reload policies.
    ManagePolicies,
    /// Submit a sandbox job.
    SubmitJob,
    /// Describe the tenant schema.
    DescribeSchema,
    /// Rebuild the consent view from the ledger.
    RebuildConsent,
    /// Read or export field lineage.
    ReadLineage,
    /// Receive a sandbox job's per-customer output, decrypted by the
    /// release gate.
    ReleaseScores,
    /// Receive a sandbox job's aggregate output, decrypted by the release
    /// gate (context `cohort_size` is the cohort's size).
    ReleaseAggregate,
    /// A contract notifies someone about a customer.
    Notify,
    /// A contract opens a task about a customer.
    CreateTask,
    /// A contract asks for approvals about a customer.
    RequestApprovals,
    /// A contract cancels a customer's pending actions of a purpose.
    CancelActions,
    /// Register or disable CRM contracts.
    ManageContracts,
    /// List and show CRM contracts, their instances and evidence.
    ReadContracts,
    /// Send a business signal to the tenant's contracts.
    SignalContracts,
    /// Receive the contracts' actions from the outbox and confirm them
    /// (a connector).
    HandleActions,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 25] = [
        Action::Write,
        Action::Read,
        Action::Reveal,
        Action::Search,
        Action::Compute,
        Action::Erase,
        Action::RecordConsent,
        Action::ReadConsent,
        Action::ReadAudit,
        Action::ManageKeys,
        Action::ManagePolicies,
        Action::SubmitJob,
        Action::DescribeSchema,
        Action::RebuildConsent,
        Action::ReadLineage,
        Action::ReleaseScores,
        Action::ReleaseAggregate,
        Action::Notify,
        Action::CreateTask,
        Action::RequestApprovals,
        Action::CancelActions,
        Action::ManageContracts,
        Action::ReadContracts,
        Action::SignalContracts,
        Action::HandleActions,
    ];

    /// The Cedar action id.
    pub fn name(self) -> &'static str {
        match self {
            Action::Write => "write",
            Action::Read => "read",
            Action::Reveal => "reveal",
            Action::Search => "search",
            Action::Compute => "compute",
            Action::Erase => "erase",
            Action::RecordConsent => "record_consent",
            Action::ReadConsent => "read_consent",
            Action::ReadAudit => "read_audit",
            Action::ManageKeys => "manage_keys",
            Action::ManagePolicies => "manage_policies",
            Action::SubmitJob => "submit_job",
            Action::DescribeSchema => "describe_schema",
            Action::RebuildConsent => "rebuild_consent",
            Action::ReadLineage => "read_lineage",
            Action::ReleaseScores => "release_scores",
            Action::ReleaseAggregate => "release_aggregate",
            Action::Notify => "notify",
            Action::CreateTask => "create_task",
            Action::RequestApprovals => "request_approvals",
            Action::CancelActions => "cancel_actions",
            Action::ManageContracts => "manage_contracts",
            Action::ReadContracts => "read_contracts",
            Action::SignalContracts => "signal_contracts",
            Action::HandleActions => "handle_actions",
        }
    }

    /// Parses a Cedar action id.
    pub fn from_name(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }

    /// What the action applies to.
    pub fn target(self) -> Target {
        match self {
            Action::Write | Action::Read | Action::Reveal | Action::Search | Action::Compute => {
                Target::Field
            }
            Action::Erase
            | Action::RecordConsent
            | Action::ReadConsent
            | Action::Notify
            | Action::CreateTask
            | Action::RequestApprovals
            | Action::CancelActions => Target::Customer,
            _ => Target::Tenant,
        }
    }

    pub(crate) fn index(self) -> usize {
        Action::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }
}

/// What the policies may know about a customer. `kind` and
/// `contract_value` are values of the customer's record: `Debug` does not
/// print them.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CustomerAttrs {
    /// Purposes with consent in force.
    pub consents: BTreeSet<String>,
    /// Purposes whose consent was withdrawn.
    pub withdrawn: BTreeSet<String>,
    /// The customer's kind (e.g. `government`), "" when unknown.
    pub kind: String,
    /// The customer's contract value, 0 when unknown.
    pub contract_value: i64,
}

impl std::fmt::Debug for CustomerAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerAttrs")
            .field("consents", &self.consents)
            .field("withdrawn", &self.withdrawn)
            .field("kind", &"<redacted>")
            .field("contract_value", &"<redacted>")
            .finish()
    }
}

/// What the policies may know about a field (from the tenant schema).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldAttrs {
    /// Its name.
    pub name: String,
    /// `public`, `internal`, `personal` or `sensitive`.
    pub sensitivity: String,
    /// The owning department ("" for none).
    pub department: String,
    /// The purposes it may be used for.
    pub purposes: BTreeSet<String>,
}

/// What the call declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The declared purpose ("" for none).
    pub purpose: String,
    /// Request time, ms since the epoch.
    pub time_ms: i64,
    /// Distinct approvers.
    pub approvals: i64,
    /// Customers in the cohort (sandbox; 0 otherwise).
    pub cohort_size: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_values_stay_out_of_debug() {
        let c = CustomerAttrs {
            kind: "government".into(),
            contract_value: 8_765_432,
            ..CustomerAttrs::default()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("government") && !shown.contains("8765432"),
            "{shown}"
        );
    }
}
