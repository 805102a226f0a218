//! The vault's one public error type.
//!
//! Every variant carries a struct with private fields, so callers match on the
//! kind of failure and read its message, while the details stay free to
//! change. Messages never contain key material or field values: at most a
//! field name, a customer id the caller supplied, or a version number.
//! Mapping to gRPC status codes happens at the service edge only
//! (`service.rs`).

use std::fmt;

/// Everything that can go wrong in the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The caller sent something the vault will not accept.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
    /// The thing asked for does not exist (or was erased).
    #[error(transparent)]
    NotFound(#[from] NotFound),
    /// A stored ciphertext or wrapped key failed authentication: the bytes on
    /// disk were altered, or moved to a place they do not belong.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// The operation is valid but the vault's state does not allow it now.
    #[error(transparent)]
    FailedPrecondition(#[from] FailedPrecondition),
    /// What the caller tries to create exists already (an idempotency key
    /// used for another request).
    #[error(transparent)]
    AlreadyExists(#[from] AlreadyExists),
    /// No valid credentials were presented.
    #[error(transparent)]
    Unauthenticated(#[from] Unauthenticated),
    /// The caller is known but may not do this.
    #[error(transparent)]
    PermissionDenied(#[from] PermissionDenied),
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
}

/// Result alias for the vault.
pub type Result<T, E = VaultError> = std::result::Result<T, E>;

/// An input was rejected.
#[derive(Debug)]
pub struct InvalidArgument {
    subject: String,
    reason: String,
}

impl InvalidArgument {
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

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.subject, self.reason)
    }
}
impl std::error::Error for InvalidArgument {}

/// Something asked for does not exist.
#[derive(Debug)]
pub struct NotFound {
    what: String,
}
impl NotFound {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self { what: what.into() }
    }
}
impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} not found", self.what)
    }
}
impl std::error::Error for NotFound {}

/// Something exists already.
#[derive(Debug)]
pub struct AlreadyExists {
    subject: String,
    reason: String,
}
impl fmt::Display for AlreadyExists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.subject, self.reason)
    }
}
impl std::error::Error for AlreadyExists {}

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
pub struct FailedPrecondition {
    reason: String,
}
impl FailedPrecondition {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}
impl fmt::Display for FailedPrecondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}
impl std::error::Error for FailedPrecondition {}

/// No valid credentials.
#[derive(Debug)]
pub struct Unauthenticated {
    reason: &'static str,
}
impl Unauthenticated {
    pub(crate) fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}
impl fmt::Display for Unauthenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}
impl std::error::Error for Unauthenticated {}

/// The principal may not perform the action.
#[derive(Debug)]
pub struct PermissionDenied {
    principal: String,
    role: String,
    action: String,
}
impl PermissionDenied {
    pub(crate) fn new(
        principal: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        Self {
            principal: principal.into(),
            role: role.into(),
            action: action.into(),
        }
    }
}
impl PermissionDenied {
    /// Appends an explanation (e.g. where consent was withdrawn).
    pub(crate) fn noted(mut self, note: &str) -> Self {
        self.action.push_str(note);
        self
    }
}
impl fmt::Display for PermissionDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "principal `{}` (role {}) may not {}",
            self.principal, self.role, self.action
        )
    }
}
impl std::error::Error for PermissionDenied {}

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
        InvalidArgument::new(subject, reason).into()
    }
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        NotFound::new(what).into()
    }
    pub(crate) fn integrity(context: impl Into<String>) -> Self {
        IntegrityError::new(context).into()
    }
    pub(crate) fn precondition(reason: impl Into<String>) -> Self {
        FailedPrecondition::new(reason).into()
    }
    pub(crate) fn storage(context: impl Into<String>) -> Self {
        StorageError::new(context).into()
    }
    pub(crate) fn already_exists(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        AlreadyExists {
            subject: subject.into(),
            reason: reason.into(),
        }
        .into()
    }
    pub(crate) fn config(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::new(path, reason).into()
    }
    pub(crate) fn denied(
        principal: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        PermissionDenied::new(principal, role, action).into()
    }
}
