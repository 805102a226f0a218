#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod access;
pub mod app;
pub mod client;
pub mod clock;
pub mod config;
pub mod contracts;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod files;
pub mod grpc;
pub mod jobs;
pub mod lineage;
pub mod schema;
pub mod server;
pub mod store;
pub mod synthetic;

pub use error::{Result, VaultError};
