//! `sovra init`: a new data directory with its keys, configuration and
//! first admin token.

use std::path::PathBuf;

use clap::Args;
use sovra_vault::app::setup;
use sovra_vault::config;

use crate::common::CmdResult;

#[derive(Args)]
pub struct InitArgs {
    /// Directory to create.
    #[arg(long, default_value = "sovra-data")]
    pub dir: PathBuf,
    /// Address the server will listen on.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    pub listen: String,
    /// Keep the log in PostgreSQL: `postgres://USER@HOST:PORT/DATABASE`
    /// (no password in it; see --postgres-password-file).
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// A file (0600) holding the database password; without it,
    /// `SOVRA_POSTGRES_PASSWORD` is read at each start.
    #[arg(long, value_name = "FILE", requires = "postgres")]
    pub postgres_password_file: Option<PathBuf>,
    /// The schema the tables go in (one vault per schema; default `sovra`).
    #[arg(long, value_name = "NAME", requires = "postgres")]
    pub postgres_schema: Option<String>,
    /// Where the shred pads are kept: `file` (default: in the data
    /// directory, overwritten in place) or `postgres` (rows of the log's
    /// database: a standby has them, but a deleted row stays in
    /// PostgreSQL's history; see SECURITY.md).
    #[arg(long, value_name = "PLACE", value_parser = ["file", "postgres"], requires = "postgres")]
    pub pads: Option<String>,
}

/// Initialises the directory and prints what was made, the verifier key
/// and the admin token (shown this once only).
pub fn run(a: InitArgs) -> CmdResult {
    let InitArgs {
        dir,
        listen,
        postgres,
        postgres_password_file,
        postgres_schema,
        pads,
    } = a;
    let storage = config::StorageConfig {
        postgres,
        // Relative to the new config.toml, as every path in it.
        password_file: postgres_password_file.map(|p| std::path::absolute(&p).unwrap_or(p)),
        schema: postgres_schema,
        pads,
        ..config::StorageConfig::default()
    };
    let on_postgres = storage.postgres.is_some();
    let i = setup::init_with(&dir, &listen, storage)?;
    println!("Initialised {}", dir.display());
    if on_postgres {
        println!("  log:           in PostgreSQL ([storage] in the configuration)");
    }
    println!("  configuration: {}", i.config_path.display());
    println!(
        "  root key:      {} (mode 0600; back it up offline: without it nothing can be decrypted)",
        dir.join("root.key").display()
    );
    println!("  schema:        {}", dir.join("schema.toml").display());
    println!(
        "  ledger key:    {} (mode 0600; signs the audit log's checkpoints)",
        dir.join("ledger.key").display()
    );
    if i.fhe_key {
        println!("  TFHE key:      made for tenant `default` (tfhe's {} parameters), stored wrapped under the root key", sovra_sandbox::params::PARAMETER_SET_NAME);
    }
    println!();
    println!("Ledger verifier key (give it to compliance officers to pin for `sovra audit verify --key`):");
    println!("  {}", i.verifier_key);
    println!();
    println!("Admin token (shown once, only its hash is stored):");
    println!("  {}", i.admin_token.token.as_str());
    println!();
    println!("Next: sovra serve --config {}", i.config_path.display());
    Ok(())
}
