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
}

/// Initialises the directory and prints what was made, the verifier key
/// and the admin token (shown this once only).
pub fn run(a: InitArgs) -> CmdResult {
    let InitArgs { dir, listen } = a;
    let i = setup::init(&dir, &listen)?;
    println!("Initialised {}", dir.display());
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
