//! The one place where a [`VaultError`] becomes a gRPC [`Status`].
//!
//! Storage, configuration and internal failures are logged in full here
//! and reported without internals; every other message is the error's own,
//! which names the offending input but never a value, a token or key
//! material.

use sovra_ledger::LedgerError;
use sovra_policy::PolicyError;
use sovra_sandbox::SandboxError;
use tonic::Status;

use crate::error::VaultError;

impl From<VaultError> for Status {
    fn from(e: VaultError) -> Status {
        match &e {
            VaultError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            VaultError::NotFound(_) => Status::not_found(e.to_string()),
            VaultError::Integrity(_) => {
                tracing::error!(error = %e, "integrity failure");
                Status::data_loss(e.to_string())
            }
            VaultError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            VaultError::AlreadyExists(_) => Status::already_exists(e.to_string()),
            VaultError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            VaultError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            VaultError::ResourceExhausted(_) => Status::resource_exhausted(e.to_string()),
            VaultError::OutOfRange(_) => Status::out_of_range(e.to_string()),
            VaultError::Storage(_) | VaultError::Config(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal storage error; the server log has details")
            }
            VaultError::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal(e.to_string())
            }
            VaultError::Policy(PolicyError::Invalid(_)) => {
                Status::failed_precondition(e.to_string())
            }
            VaultError::Policy(_) => {
                tracing::error!(error = %e, "policy failure");
                Status::internal("the policy layer could not decide; the request was denied (the server log has details)")
            }
            VaultError::Ledger(l) => ledger(l, &e),
            VaultError::Sandbox(s) => sandbox(s),
        }
    }
}

fn ledger(l: &LedgerError, e: &VaultError) -> Status {
    match l {
        LedgerError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        LedgerError::OutOfRange(_) => Status::out_of_range(e.to_string()),
        LedgerError::Verification(_) => Status::failed_precondition(e.to_string()),
        LedgerError::Integrity(_) => {
            tracing::error!(error = %e, "ledger integrity failure");
            Status::data_loss(e.to_string())
        }
        LedgerError::Storage(_) | LedgerError::Config(_) => {
            tracing::error!(error = %e, "ledger failure");
            Status::unavailable(
                "the audit ledger cannot be written; the operation was not performed (the server log has details)",
            )
        }
        _ => Status::internal(e.to_string()),
    }
}

fn sandbox(e: &SandboxError) -> Status {
    match e {
        SandboxError::InvalidSpec(_) => Status::invalid_argument(e.to_string()),
        SandboxError::BadCiphertext(_) => {
            tracing::error!(error = %e, "a stored feature block was rejected");
            Status::data_loss(e.to_string())
        }
        SandboxError::LimitExceeded(_) => Status::resource_exhausted(e.to_string()),
        SandboxError::Cancelled => Status::cancelled(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}
