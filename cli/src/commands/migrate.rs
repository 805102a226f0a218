//! `sovra migrate`: copies a vault to another storage (a data directory
//! into PostgreSQL, or back) and checks both sides; the work is
//! `sovra_vault::app::migrate`.

use std::path::PathBuf;

use clap::Args;
use sovra_vault::app::migrate;
use sovra_vault::config::Config;

use crate::common::CmdResult;

#[derive(Args)]
pub struct MigrateArgs {
    /// The configuration of the vault to copy (stop its server first).
    #[arg(long, value_name = "CONFIG")]
    pub from: PathBuf,
    /// The configuration naming where to copy it: the same keys, schema
    /// and policies, another `[storage]` (an empty PostgreSQL schema, or an
    /// empty data directory).
    #[arg(long, value_name = "CONFIG")]
    pub to: PathBuf,
    /// Customers to decrypt on both sides and compare.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sample: u32,
}

/// Runs the migration, printing each step.
pub fn run(a: MigrateArgs) -> CmdResult {
    let from = Config::load(&a.from)?;
    let to = Config::load(&a.to)?;
    let m = migrate::migrate(&from, &to, a.sample as usize, &mut |line| {
        println!("{line}")
    })?;
    println!(
        "Migrated {} to {}: {} ledger entries (root {}), {} keys, {} pads; {} customers compared.",
        m.from, m.to, m.entries, m.root, m.writes, m.pads, m.sampled
    );
    println!("Next: sovra serve --config {}", a.to.display());
    Ok(())
}
