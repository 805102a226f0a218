//! The ledger's one public error type.
//!
//! Every variant carries a struct with private fields: callers match on the
//! kind of failure and read its message. Messages name an index, a size or a
//! part of a bundle, never personal data (the ledger holds none).

use std::fmt;

/// Everything that can go wrong in the ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// An input (entry field, proof, bundle, key, size) was rejected.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgumentError),
    /// A tree size or index lies beyond the log.
    #[error(transparent)]
    OutOfRange(#[from] OutOfRangeError),
    /// A proof, signature, hash chain or bundle did not verify.
    #[error(transparent)]
    Verification(#[from] VerificationError),
    /// The stored log does not match itself: an entry was altered, removed
    /// or moved, or a stored hash or checkpoint disagrees with the entries.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A key file or option is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Result alias for the ledger.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

macro_rules! message_error {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Debug)]
        pub struct $name {
            message: String,
        }
        impl $name {
            /// The message without its prefix.
            pub fn message(&self) -> &str {
                &self.message
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.message)
            }
        }
        impl std::error::Error for $name {}
    };
}

message_error!(
    /// An input was rejected.
    InvalidArgumentError, "invalid "
);
message_error!(
    /// A size or index beyond the log.
    OutOfRangeError, ""
);
message_error!(
    /// A failed verification.
    VerificationError, "verification failed: "
);
message_error!(
    /// Stored data that contradicts the log.
    IntegrityError, "ledger integrity violated: "
);
message_error!(
    /// A storage failure.
    StorageError, "ledger storage failed: "
);
message_error!(
    /// An unusable key file or option.
    ConfigError, "ledger configuration: "
);

impl LedgerError {
    pub(crate) fn invalid(m: impl Into<String>) -> Self {
        InvalidArgumentError { message: m.into() }.into()
    }
    pub(crate) fn out_of_range(m: impl Into<String>) -> Self {
        OutOfRangeError { message: m.into() }.into()
    }
    pub(crate) fn verification(m: impl Into<String>) -> Self {
        VerificationError { message: m.into() }.into()
    }
    pub(crate) fn integrity(m: impl Into<String>) -> Self {
        IntegrityError { message: m.into() }.into()
    }
    pub(crate) fn storage(m: impl Into<String>) -> Self {
        StorageError { message: m.into() }.into()
    }
    pub(crate) fn config(m: impl Into<String>) -> Self {
        ConfigError { message: m.into() }.into()
    }
}

impl From<sled::Error> for LedgerError {
    fn from(e: sled::Error) -> Self {
        LedgerError::storage(e.to_string())
    }
}
