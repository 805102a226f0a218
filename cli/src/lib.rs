#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

pub mod commands;
pub mod common;

use commands::{
    audit, consent, contract, demo, init, job, keys, lineage, migrate, policy, records, serve,
    token,
};
use common::Conn;

// The command line. Only `//` comments on the types clap derives from:
// their doc comments would become help text. The variants' doc comments
// below are the commands' help; the argument structs in `commands/` carry
// none, so these are the only ones clap uses.
#[derive(Parser)]
#[command(name = "sovra", version, about = "Sovra data-sovereignty vault")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

// The commands, in the order `sovra --help` lists them.
#[derive(Subcommand)]
pub enum Cmd {
    /// Create a data directory: root key (0600), config.toml, schema.toml; prints the first admin token once.
    Init(init::InitArgs),
    /// Run the gRPC server.
    Serve(serve::ServeArgs),
    /// Copy a vault to another storage (a data directory into PostgreSQL, or
    /// back), checking the ledger's root and a sample of decrypted values on
    /// both sides.
    Migrate(migrate::MigrateArgs),
    /// Manage principals' tokens in a configuration file (restart the server to apply).
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
    /// Write fields of a customer: `sovra put --customer c-1 phone=13800138000 budget=50000`.
    Put(records::PutArgs),
    /// Read fields of a customer for a declared purpose.
    Get(records::GetArgs),
    /// Find customers by an indexed field.
    Search(records::SearchArgs),
    /// Crypto-shred a customer.
    Erase(records::EraseArgs),
    /// Tenant key management.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// Record or read customers' consent (the consent ledger).
    Consent {
        #[command(subcommand)]
        cmd: consent::ConsentCmd,
    },
    /// Checkpoints, audit bundles and their offline verification.
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Validate, inspect, reload and explain Cedar policies.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Field lineage: where a value came from, who used it, what was derived
    /// from it (officer or admin token); OpenLineage export.
    Lineage {
        #[command(subcommand)]
        cmd: lineage::LineageCmd,
    },
    /// Sandbox jobs on encrypted features: submit, watch, fetch the
    /// released result, cancel; list registered workloads.
    Job {
        #[command(subcommand)]
        cmd: job::JobCmd,
    },
    /// CRM contracts: check a manifest or dry-run it offline; register,
    /// list, show and disable contracts on the server.
    Contract {
        #[command(subcommand)]
        cmd: contract::ContractCmd,
    },
    /// Show the schema.
    Schema {
        #[command(flatten)]
        conn: Conn,
    },
    /// Run the end-to-end demo on an embedded server in a temporary directory.
    Demo(demo::DemoArgs),
}
