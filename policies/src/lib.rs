#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod authorize;
mod error;
mod model;
mod set;

pub use authorize::{Decision, Disclosure, FieldDecision, Scope};
pub use error::{
    BadRequestError, InvalidPoliciesError, PolicyError, PolicyIoError, Problem, Result,
};
pub use model::{Action, Context, CustomerAttrs, FieldAttrs, Principal, PrincipalKind, Target};
pub use set::{Origin, Policies, DEFAULT_FILES, MAX_FILES, MAX_FILE_BYTES, SCHEMA, SCHEMA_FILE};
