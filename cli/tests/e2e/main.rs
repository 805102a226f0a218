//! End-to-end tests of the vault: a real server on an ephemeral loopback
//! port (in-process, or the real `sovra` binary where a process must die),
//! driven through the real tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod api;
mod authz;
mod bad_input;
mod cli;
mod durability;
mod erasure;
mod hardening;
mod integrity;
mod ledger;
mod lineage;
mod policy;
mod refused_reads;
mod rotation;
mod sandbox;
mod tls;
mod transport;
