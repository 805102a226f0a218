#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod auth;
pub mod blind_index;
pub mod client;
pub mod config;
pub mod demo;
pub mod engine;
pub mod envelope;
pub mod error;
pub(crate) mod features;
pub(crate) mod fhe;
pub mod files;
pub(crate) mod gate;
pub mod job_view;
pub mod keys;
pub mod ledger_service;
pub mod lineage;
pub mod lineage_service;
pub mod lineage_view;
pub mod net;
pub mod openlineage;
pub mod policy;
pub mod policy_service;
pub mod rotation;
pub mod sandbox_service;
pub mod schema;
pub mod server;
pub mod service;
pub mod shred;
pub mod store;
pub mod synthetic;

pub use error::{Result, VaultError};
