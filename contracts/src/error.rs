//! The crate's one error enum. Each variant wraps a struct with private
//! fields and accessors, so that callers match on the kind and read what
//! they need without depending on how the message is built.

use std::fmt;

/// Results of this crate.
pub type Result<T, E = ContractError> = std::result::Result<T, E>;

/// Everything that can go wrong with a contract.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContractError {
    /// The manifest (or a file it names) is not a valid contract.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The condition does not parse or does not type-check, or failed on an
    /// event.
    #[error(transparent)]
    Condition(#[from] ConditionError),
    /// The guest module is invalid, or its run failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// An event is malformed.
    #[error(transparent)]
    Event(#[from] EventError),
}

/// A manifest error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    file: String,
    line: usize,
    column: usize,
    message: String,
}

impl ManifestError {
    pub(crate) fn new(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
    /// The file the error is in (as the caller named it).
    pub fn file(&self) -> &str {
        &self.file
    }
    /// 1-based line; 0 when the error is about the file as a whole.
    pub fn line(&self) -> usize {
        self.line
    }
    /// 1-based column; 0 when unknown.
    pub fn column(&self) -> usize {
        self.column
    }
    /// What is wrong and what would be right.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {}", self.file, self.message),
            (l, 0) => write!(f, "{}:{l}: {}", self.file, self.message),
            (l, c) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
        }
    }
}
impl std::error::Error for ManifestError {}

/// A condition error: at compile time (parse or type), or at evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    message: String,
}

impl ConditionError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}
impl fmt::Display for ConditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "condition: {}", self.message)
    }
}
impl std::error::Error for ConditionError {}

/// Why a guest failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestFault {
    /// The module does not compile or validate, or lacks the exports the
    /// guest interface requires.
    Invalid,
    /// The module imports something the host does not provide.
    UnknownImport,
    /// The run used up its fuel (a loop, or more work than the manifest
    /// allows).
    FuelExhausted,
    /// The module asked for more memory than its cap.
    MemoryCap,
    /// The guest trapped (unreachable, out-of-bounds access, division by
    /// zero, stack overflow).
    Trap,
    /// The guest emitted an action that is malformed or that the
    /// contract's capabilities do not cover.
    BadAction,
    /// The guest's `run` returned a non-zero status.
    Failed,
}

impl GuestFault {
    /// A stable snake_case name (for status messages and ledger reasons).
    pub fn as_str(self) -> &'static str {
        match self {
            GuestFault::Invalid => "invalid_module",
            GuestFault::UnknownImport => "unknown_import",
            GuestFault::FuelExhausted => "fuel_exhausted",
            GuestFault::MemoryCap => "memory_cap",
            GuestFault::Trap => "trap",
            GuestFault::BadAction => "bad_action",
            GuestFault::Failed => "failed",
        }
    }
}

/// A guest error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestError {
    fault: GuestFault,
    message: String,
    fuel_used: u64,
}

impl GuestError {
    pub(crate) fn new(fault: GuestFault, message: impl Into<String>) -> Self {
        Self {
            fault,
            message: message.into(),
            fuel_used: 0,
        }
    }
    pub(crate) fn with_fuel(mut self, fuel_used: u64) -> Self {
        self.fuel_used = fuel_used;
        self
    }
    /// Why it failed.
    pub fn fault(&self) -> GuestFault {
        self.fault
    }
    /// Details.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Fuel the run had used when it stopped (0 before it started).
    pub fn fuel_used(&self) -> u64 {
        self.fuel_used
    }
}
impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {}: {}", self.fault.as_str(), self.message)
    }
}
impl std::error::Error for GuestError {}

/// A malformed event (a line of an events file, or a signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    line: usize,
    message: String,
}

impl EventError {
    pub(crate) fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
    /// 1-based line in the events file; 0 for a single event.
    pub fn line(&self) -> usize {
        self.line
    }
    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}
impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "event: {}", self.message)
        } else {
            write!(f, "event on line {}: {}", self.line, self.message)
        }
    }
}
impl std::error::Error for EventError {}
