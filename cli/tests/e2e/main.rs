//! End-to-end tests of the vault: a real server on an ephemeral loopback
//! port (in-process, or the real `sovra` binary where a process must die),
//! driven through the real tonic client. The environment and fixtures are
//! `sovra_testkit`'s.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// The `sovra` binary this package builds (only its own tests get the
/// path), for the tests that run it as a process.
const SOVRA: &str = env!("CARGO_BIN_EXE_sovra");

mod api;
mod authz;
mod bad_input;
mod cli;
mod contract_runtime;
mod contracts;
mod durability;
mod erasure;
mod hardening;
mod integrity;
mod ledger;
mod lineage;
mod policy;
mod postgres;
mod recovery;
mod refused_reads;
mod rotation;
mod sandbox;
mod tls;
mod transport;
