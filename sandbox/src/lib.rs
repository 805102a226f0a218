#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod block;
pub mod bootstrap;
pub mod error;
pub mod eval;
pub mod params;
pub mod release;
pub mod spec;
pub mod tree;
pub mod workload;

pub use block::FeatureBlock;
pub use bootstrap::BootstrapKey;
pub use error::{Result, SandboxError};
pub use eval::{
    run, CustomerValue, EncryptedAggregate, EncryptedHistogram, EncryptedOutput, EvalPool,
    EvaluationMaterial, JobInput, Limits, Progress, ScoredBlock,
};
pub use spec::{FeatureInfo, OutputClass, ValidatedSpec};
