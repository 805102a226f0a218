//! The fixed role table that decides who may do what, until the policy
//! engine replaces it.
//!
//! Guarantees: deny by default. Every RPC names an [`Action`]; only the
//! pairs listed in [`authorize`] are allowed, and [`disclosure`] decides per
//! field whether a permitted read reveals or masks.
//!
//! | role    | may                                                          |
//! |---------|--------------------------------------------------------------|
//! | service | write, read (sensitive fields masked), search, record and read consent |
//! | officer | read consent state, checkpoints, proofs, entries, bundles; never field values |
//! | partner | describe the schema; never field values                      |
//! | admin   | erase, manage keys, rebuild the consent view; never field values |

use crate::auth::{Principal, Role};
use crate::error::{PermissionDenied, Result};
use crate::schema::{FieldDef, Sensitivity};

/// What a call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write records.
    Write,
    /// Read field values.
    Read,
    /// Search by blind index.
    Search,
    /// Erase a customer.
    Erase,
    /// Rotate, inspect or retire tenant keys.
    ManageKeys,
    /// Describe the schema.
    DescribeSchema,
    /// Record a consent grant or withdrawal.
    RecordConsent,
    /// Read a customer's consent state.
    ReadConsent,
    /// Read checkpoints, proofs, entries and audit bundles.
    ReadAudit,
    /// Rebuild the consent view.
    RebuildConsent,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Write => "write records",
            Action::Read => "read field values",
            Action::Search => "search",
            Action::Erase => "erase customers",
            Action::ManageKeys => "manage keys",
            Action::DescribeSchema => "describe the schema",
            Action::RecordConsent => "record consent",
            Action::ReadConsent => "read consent state",
            Action::ReadAudit => "read the audit ledger",
            Action::RebuildConsent => "rebuild the consent view",
        }
    }
}

/// Allows or denies `action` for `p`.
pub fn authorize(p: &Principal, action: Action) -> Result<()> {
    let allowed = matches!(
        (p.role, action),
        (_, Action::DescribeSchema)
            | (
                Role::Service,
                Action::Write
                    | Action::Read
                    | Action::Search
                    | Action::RecordConsent
                    | Action::ReadConsent
            )
            | (Role::Officer, Action::ReadConsent | Action::ReadAudit)
            | (
                Role::Admin,
                Action::Erase | Action::ManageKeys | Action::RebuildConsent
            )
    );
    if allowed {
        Ok(())
    } else {
        Err(PermissionDenied::new(&p.name, p.role.as_str(), action.as_str()).into())
    }
}

/// How a permitted read shows a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure {
    /// The plaintext value.
    Reveal,
    /// The field's mask.
    Mask,
}

/// How `role` sees `field` on a permitted read.
pub fn disclosure(role: Role, field: &FieldDef) -> Disclosure {
    match (role, field.sensitivity) {
        (Role::Service, Sensitivity::Sensitive) => Disclosure::Mask,
        (Role::Service, _) => Disclosure::Reveal,
        _ => Disclosure::Mask,
    }
}
