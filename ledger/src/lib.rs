#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod bundle;
pub mod checkpoint;
pub mod entry;
pub mod error;
mod hashes;
pub mod log;
pub mod proof;
pub mod receipt;

pub use bundle::{
    verify_bundle, verify_proven_entry, AuditBundle, BundleEntry, ConsistencyProof, Verdict,
    VerifyOptions,
};
pub use checkpoint::{verify_checkpoint, LogKey, SignedCheckpoint};
pub use entry::{Body, ConsentAction, ContractEvent, ContractStep, Digest, Entry, Pseudonym};
pub use error::{LedgerError, Result};
pub use log::{open_sled, Appended, ConsentStatus, Ledger, LedgerOptions, Receipt, SledOpenError};
pub use proof::{leaf_hash, verify_consistency, verify_inclusion, TlogProof};
pub use receipt::verify_receipt;
