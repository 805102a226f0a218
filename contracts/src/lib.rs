#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod condition;
pub mod crm;
pub mod error;
pub mod guest;
pub mod manifest;
pub mod plan;

pub use condition::{AnyField, CelType, Condition, FieldTypes, Scalar};
pub use error::{ContractError, GuestFault, Result};
pub use manifest::{Action, ActionKind, Capability, Manifest, Target, Trigger};
pub use plan::{
    dry_run, dry_run_decided, evaluate, ActionDecision, CustomerFacts, Decider, DryRun, Evaluation,
    Event, Planned,
};
