//! The vault's one public error type.
//!
//! Every variant carries a struct with private fields, so callers match on the
//! kind of failure and read its message, while the details stay free to
//! change. Messages never contain key material or field values: at most a
//! field name, a customer id the caller supplied, or a version number.
//! Mapping to gRPC status codes happens at the gRPC edge only, in one
//! `From<VaultError> for tonic::Status` (`grpc/status.rs`).

use std::fmt;

/// Everything that can go wrong in the vault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The caller sent something the vault will not accept.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgumentError),
    /// The thing asked for does not exist (or was erased).
    #[error(transparent)]
    NotFound(#[from] NotFoundError),
    /// A stored ciphertext or wrapped key failed authentication: the bytes on
    /// disk were altered, or moved to a place they do not belong.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// The operation is valid but the vault's state does not allow it now.
    #[error(transparent)]
    FailedPrecondition(#[from] FailedPreconditionError),
    /// What the caller tries to create exists already (an idempotency key
    /// used for another request).
    #[error(transparent)]
    AlreadyExists(#[from] AlreadyExistsError),
    /// No valid credentials were presented.
    #[error(transparent)]
    Unauthenticated(#[from] UnauthenticatedError),
    /// The caller is known but may not do this.
    #[error(transparent)]
    PermissionDenied(#[from] PermissionDeniedError),
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A configuration, schema or key file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The consent and audit ledger refused or failed.
    #[error(transparent)]
    Ledger(#[from] sovra_ledger::LedgerError),
    /// The policy set is invalid or could not be evaluated.
    #[error(transparent)]
    Policy(#[from] sovra_policy::PolicyError),
    /// A position or size lies beyond what exists (a ledger index past its
    /// end).
    #[error(transparent)]
    OutOfRange(#[from] OutOfRangeError),
    /// A bound was reached (queued jobs, a cohort's size): retry later or
    /// ask for less.
    #[error(transparent)]
    ResourceExhausted(#[from] ResourceExhaustedError),
    /// The sandbox refused a job spec or failed while evaluating it.
    #[error(transparent)]
    Sandbox(#[from] sovra_sandbox::SandboxError),
    /// A task of the vault's own failed (a worker panicked or was dropped):
    /// a bug, never the caller's doing.
    #[error(transparent)]
    Internal(#[from] InternalError),
}

/// A bound was reached.
#[derive(Debug)]
pub struct ResourceExhaustedError {
    reason: String,
}
impl fmt::Display for ResourceExhaustedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}
impl std::error::Error for ResourceExhaustedError {}

/// A position beyond what exists.
#[derive(Debug)]
pub struct OutOfRangeError {
    reason: String,
}
impl fmt::Display for OutOfRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}
impl std::error::Error for OutOfRangeError {}

/// One of the vault's own tasks failed.
#[derive(Debug)]
pub struct InternalError {
    what: String,
}
impl fmt::Display for InternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed; the server log has details", self.what)
    }
}
impl std::error::Error for InternalError {}

/// Result alias for the vault.
pub type Result<T, E = VaultError> = std::result::Result<T, E>;

/// An input was rejected.
#[derive(Debug)]
pub struct InvalidArgumentError {
    subject: String,
    reason: String,
}

impl InvalidArgumentError {
    pub(crate) fn new(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            reason: reason.into(),
        }
    }
    /// What was rejected: a request field or a schema field name.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl fmt::Display for InvalidArgumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.subject, self.reason)
    }
}
impl std::error::Error for InvalidArgumentError {}

/// Something asked for does not exist.
#[derive(Debug)]
pub struct NotFoundError {
    message: String,
}
impl NotFoundError {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self {
            message: format!("{} not found", what.into()),
        }
    }
}
impl fmt::Display for NotFoundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for NotFoundError {}

/// Something exists already.
#[derive(Debug)]
pub struct AlreadyExistsError {
    subject: String,
    reason: String,
}
impl fmt::Display for AlreadyExistsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.subject, self.reason)
    }
}
impl std::error::Error for AlreadyExistsError {}

/// Authenticated decryption failed.
#[derive(Debug)]
pub struct IntegrityError {
    context: String,
}
impl IntegrityError {
    pub(crate) fn new(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
        }
    }
}
impl fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "integrity check failed for {}: the stored bytes were altered or do not belong here",
            self.context
        )
    }
}
impl std::error::Error for IntegrityError {}

/// The state of the vault does not allow the operation.
#[derive(Debug)]
pub struct FailedPreconditionError {
    reason: String,
}
impl FailedPreconditionError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}
impl fmt::Display for FailedPreconditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}
impl std::error::Error for FailedPreconditionError {}

/// No valid credentials.
#[derive(Debug)]
pub struct UnauthenticatedError {
    reason: std::borrow::Cow<'static, str>,
}
impl UnauthenticatedError {
    pub(crate) fn new(reason: &'static str) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}
impl fmt::Display for UnauthenticatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}
impl std::error::Error for UnauthenticatedError {}

/// The principal may not perform the action.
#[derive(Debug)]
pub struct PermissionDeniedError {
    message: String,
}
impl PermissionDeniedError {
    pub(crate) fn new(
        principal: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        Self {
            message: format!(
                "principal `{}` (role {}) may not {}",
                principal.into(),
                role.into(),
                action.into()
            ),
        }
    }
    /// Appends an explanation (e.g. where consent was withdrawn).
    pub(crate) fn noted(mut self, note: &str) -> Self {
        self.message.push_str(note);
        self
    }
}
impl fmt::Display for PermissionDeniedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for PermissionDeniedError {}

/// The storage engine failed.
#[derive(Debug)]
pub struct StorageError {
    context: String,
    source: Option<sled::Error>,
}
impl StorageError {
    pub(crate) fn new(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }
}
impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(e) => write!(f, "storage error ({}): {e}", self.context),
            None => write!(f, "storage error: {}", self.context),
        }
    }
}
impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<sovra_wal::WalError> for VaultError {
    fn from(e: sovra_wal::WalError) -> Self {
        match e {
            // Damage found at open refuses the start; the message names the
            // segment and offset.
            sovra_wal::WalError::Corrupt(c) => {
                VaultError::config("the write-ahead log", c.message())
            }
            e => VaultError::storage(e.to_string()),
        }
    }
}

impl From<sled::Error> for VaultError {
    fn from(e: sled::Error) -> Self {
        VaultError::Storage(StorageError {
            context: "sled".into(),
            source: Some(e),
        })
    }
}

/// A configuration, schema or key file is unusable.
#[derive(Debug)]
pub struct ConfigError {
    path: String,
    reason: String,
}
impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}
impl std::error::Error for ConfigError {}

// Small constructors keep call sites short.
impl VaultError {
    pub(crate) fn invalid(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidArgumentError::new(subject, reason).into()
    }
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        NotFoundError::new(what).into()
    }
    pub(crate) fn integrity(context: impl Into<String>) -> Self {
        IntegrityError::new(context).into()
    }
    pub(crate) fn precondition(reason: impl Into<String>) -> Self {
        FailedPreconditionError::new(reason).into()
    }
    pub(crate) fn storage(context: impl Into<String>) -> Self {
        StorageError::new(context).into()
    }
    pub(crate) fn already_exists(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        AlreadyExistsError {
            subject: subject.into(),
            reason: reason.into(),
        }
        .into()
    }
    /// NOT_FOUND with the whole message given (not "… not found").
    pub(crate) fn not_found_because(message: impl Into<String>) -> Self {
        NotFoundError {
            message: message.into(),
        }
        .into()
    }
    /// PERMISSION_DENIED with the whole message given.
    pub(crate) fn denied_because(message: impl Into<String>) -> Self {
        PermissionDeniedError {
            message: message.into(),
        }
        .into()
    }
    pub(crate) fn out_of_range(reason: impl Into<String>) -> Self {
        OutOfRangeError {
            reason: reason.into(),
        }
        .into()
    }
    pub(crate) fn exhausted(reason: impl Into<String>) -> Self {
        ResourceExhaustedError {
            reason: reason.into(),
        }
        .into()
    }
    pub(crate) fn unauthenticated_approval(n: usize) -> Self {
        UnauthenticatedError {
            reason: format!("approval {n} is not a valid token").into(),
        }
        .into()
    }
    pub(crate) fn internal(what: impl Into<String>) -> Self {
        InternalError { what: what.into() }.into()
    }
    pub(crate) fn config(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::new(path, reason).into()
    }
    pub(crate) fn denied(
        principal: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        PermissionDeniedError::new(principal, role, action).into()
    }
}
