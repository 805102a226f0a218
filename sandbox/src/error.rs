//! The sandbox's one error type. Messages name the bound, field or file that
//! failed and never carry a feature value.

/// Why a spec, manifest, ciphertext or job was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The job spec or workload manifest is malformed or out of bounds.
    #[error("{0}")]
    InvalidSpec(#[from] InvalidSpecError),
    /// A ciphertext read back from storage (or received) failed
    /// deserialisation or conformance with the parameter set.
    #[error("{0}")]
    BadCiphertext(#[from] BadCiphertextError),
    /// The job hit one of its limits (customers, wall time, memory).
    #[error("{0}")]
    LimitExceeded(#[from] LimitExceededError),
    /// The job was cancelled.
    #[error("job cancelled")]
    Cancelled,
    /// The job needs programmable bootstrapping and the evaluation material
    /// carries no bootstrap key.
    #[error("this job needs the tenant's bootstrap key, which the evaluation material lacks")]
    NoBootstrapKey,
    /// The evaluation pool's threads could not be started.
    #[error("the sandbox's evaluation threads could not start: {0}")]
    Pool(String),
}

/// A spec or manifest refused before anything ran.
#[derive(Debug, thiserror::Error)]
#[error("invalid job spec: {what}: {message}")]
pub struct InvalidSpecError {
    what: String,
    message: String,
}

impl InvalidSpecError {
    pub(crate) fn error(what: impl Into<String>, message: impl Into<String>) -> SandboxError {
        InvalidSpecError {
            what: what.into(),
            message: message.into(),
        }
        .into()
    }
    /// Which part of the spec (`model.weights.budget`, `output`).
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// A ciphertext refused before evaluation.
#[derive(Debug, thiserror::Error)]
#[error("rejected ciphertext ({what}): {message}")]
pub struct BadCiphertextError {
    what: String,
    message: String,
}

impl BadCiphertextError {
    pub(crate) fn error(what: impl Into<String>, message: impl Into<String>) -> SandboxError {
        BadCiphertextError {
            what: what.into(),
            message: message.into(),
        }
        .into()
    }
}

/// A limit the job ran into.
#[derive(Debug, thiserror::Error)]
#[error("job limit exceeded: {limit} ({detail})")]
pub struct LimitExceededError {
    limit: &'static str,
    detail: String,
}

impl LimitExceededError {
    pub(crate) fn error(limit: &'static str, detail: impl Into<String>) -> SandboxError {
        LimitExceededError {
            limit,
            detail: detail.into(),
        }
        .into()
    }
    /// The limit's name: `customers`, `wall_time` or `memory`.
    pub fn limit(&self) -> &'static str {
        self.limit
    }
}

/// The sandbox's result type.
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
