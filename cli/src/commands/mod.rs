//! One module per command: its arguments and what it does.

pub mod audit;
pub mod consent;
pub mod contract;
pub mod demo;
pub mod init;
pub mod job;
pub mod keys;
pub mod lineage;
pub mod migrate;
pub mod policy;
pub mod records;
pub mod serve;
pub mod token;
