//! The log's one public error type.
//!
//! Every variant carries a struct with private fields; messages name the
//! segment file and byte offset involved, never a record's contents.

use std::fmt;

/// Everything that can go wrong in the write-ahead log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// A segment is damaged before its tail, a segment is missing, or the
    /// records a caller needs were retired: the log refuses to open.
    #[error(transparent)]
    Corrupt(#[from] CorruptError),
    /// Reading, writing or syncing a file failed. After a failed write or
    /// sync the log accepts nothing more (a failed `fdatasync` may have lost
    /// pages the kernel no longer reports): restart to recover.
    #[error(transparent)]
    Io(#[from] IoError),
    /// An argument was refused (a record or frame too large, an option out
    /// of range).
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgumentError),
}

/// Result alias for the log.
pub type Result<T, E = WalError> = std::result::Result<T, E>;

macro_rules! message_error {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone)]
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
    /// A damaged or missing part of the log.
    CorruptError, "write-ahead log damaged: "
);
message_error!(
    /// A file operation that failed.
    IoError, "write-ahead log I/O failed: "
);
message_error!(
    /// A refused argument.
    InvalidArgumentError, "invalid write-ahead log argument: "
);

impl WalError {
    pub(crate) fn corrupt(m: impl Into<String>) -> Self {
        CorruptError { message: m.into() }.into()
    }
    pub(crate) fn io(path: &std::path::Path, what: &str, e: &dyn fmt::Display) -> Self {
        IoError {
            message: format!("{}: {what}: {e}", path.display()),
        }
        .into()
    }
    pub(crate) fn failed(m: impl Into<String>) -> Self {
        IoError { message: m.into() }.into()
    }
    pub(crate) fn invalid(m: impl Into<String>) -> Self {
        InvalidArgumentError { message: m.into() }.into()
    }
}
