//! The crate's one error type.
//!
//! Guarantees: messages name files, lines and policy ids, never attribute
//! values of a request (which may describe a customer).

use std::fmt;

/// Everything that can go wrong loading or evaluating policies.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A policy file or the schema is malformed, ill-typed or inconsistent.
    #[error(transparent)]
    Invalid(#[from] InvalidPoliciesError),
    /// A policy directory or file could not be read.
    #[error(transparent)]
    Io(#[from] PolicyIoError),
    /// A request could not be built (a bug in the caller, or input that the
    /// caller should have refused); it is never an allow.
    #[error(transparent)]
    Request(#[from] BadRequestError),
}

/// One problem in a policy file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    file: String,
    line: usize,
    column: usize,
    message: String,
}

impl Problem {
    pub(crate) fn new(file: &str, text: &str, offset: Option<usize>, message: String) -> Self {
        let (line, column) = offset.map_or((0, 0), |o| line_col(text, o));
        Problem {
            file: file.to_owned(),
            line,
            column,
            message,
        }
    }
    /// The file the problem is in.
    pub fn file(&self) -> &str {
        &self.file
    }
    /// Its line (1-based; 0 when the problem has no single location).
    pub fn line(&self) -> usize {
        self.line
    }
    /// Its column (1-based; 0 when unknown).
    pub fn column(&self) -> usize {
        self.column
    }
    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// Byte offset to 1-based line and column (in characters).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A policy set that cannot take effect, with every problem found.
#[derive(Debug, Clone)]
pub struct InvalidPoliciesError {
    problems: Vec<Problem>,
}

impl InvalidPoliciesError {
    pub(crate) fn new(problems: Vec<Problem>) -> Self {
        InvalidPoliciesError { problems }
    }
    /// The problems, in file order.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for InvalidPoliciesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy set: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidPoliciesError {}

/// A file or directory that could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot read policies from `{path}`: {reason}")]
pub struct PolicyIoError {
    path: String,
    reason: String,
}

impl PolicyIoError {
    pub(crate) fn new(path: &std::path::Path, reason: impl fmt::Display) -> Self {
        PolicyIoError {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A request that does not fit the model.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot evaluate the request: {reason}")]
pub struct BadRequestError {
    reason: String,
}

impl BadRequestError {
    pub(crate) fn new(reason: impl fmt::Display) -> Self {
        BadRequestError {
            reason: reason.to_string(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_to_lines() {
        let t = "ab\ncd\n\u{e9}f";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 4), (2, 2));
        assert_eq!(line_col(t, 6), (3, 1));
        assert_eq!(line_col(t, 7), (3, 1), "inside a character");
        assert_eq!(line_col(t, 999), (3, 3));
    }
}
