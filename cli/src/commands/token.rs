//! `sovra token`: principals and their tokens in a configuration file.

use std::path::PathBuf;

use clap::Subcommand;
use sovra_vault::access::auth::Role;
use sovra_vault::config::{self, Config};

use crate::common::CmdResult;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Add a principal and print its token once.
    Add {
        /// Configuration file.
        #[arg(long, default_value = "sovra-data/config.toml")]
        config: PathBuf,
        /// Principal name.
        #[arg(long)]
        name: String,
        /// service, officer, partner or admin.
        #[arg(long)]
        role: String,
        /// Tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Department (policies reveal sensitive fields only to the owning
        /// department).
        #[arg(long, default_value = "")]
        department: String,
        /// A purpose the principal may declare (repeat; none by default).
        #[arg(long = "purpose")]
        purposes: Vec<String>,
    },
}

/// Adds the principal to the file and prints its token (only its hash is
/// stored).
pub fn run(cmd: TokenCmd) -> CmdResult {
    let TokenCmd::Add {
        config,
        name,
        role,
        tenant,
        department,
        purposes,
    } = cmd;
    let role: Role = role.parse()?;
    let mut cfg = Config::load(&config)?;
    let purposes: Vec<&str> = purposes.iter().map(String::as_str).collect();
    let t = cfg.add_principal_with(&name, role, &tenant, &department, &purposes)?;
    config::write_config(&cfg, &config)?;
    println!(
        "Added principal `{name}` (role {}, tenant {tenant}, department `{department}`, purposes [{}]). Token, shown once:",
        role.as_str(),
        purposes.join(", ")
    );
    println!("  {}", t.token.as_str());
    println!("Restart the server to apply.");
    Ok(())
}
