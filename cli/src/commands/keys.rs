//! `sovra keys`: the tenant key's rotation, status and retirement.

use std::io::Write;

use clap::Subcommand;
use sovra_proto::vault::v1 as pb;
use sovra_vault::client::Client;

use crate::common::{connect, CmdResult, Conn, Failure};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Start a rotation; with --wait, show progress until every data key is re-wrapped.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        /// Wait for the re-wrap job.
        #[arg(long)]
        wait: bool,
    },
    /// Show key versions and rotation progress.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Retire versions below --min-version.
    Retire {
        #[command(flatten)]
        conn: Conn,
        /// Lowest version that stays usable.
        #[arg(long)]
        min_version: u32,
        /// Retire even if data keys remain under older versions (their data becomes unreadable).
        #[arg(long)]
        force: bool,
    },
}

fn print_status(s: &pb::KeyStatus) {
    println!(
        "tenant {}: active v{}, minimum decryption v{}",
        s.tenant, s.active_version, s.min_version
    );
    for (v, n) in &s.data_keys_by_version {
        println!("  v{v}: {n} data keys");
    }
    if let Some(j) = &s.job {
        println!(
            "  rotation to v{}: {}/{} re-wrapped{}",
            j.target_version,
            j.rewrapped,
            j.total,
            if j.done { ", done" } else { ", running" }
        );
    }
}

/// Runs a `sovra keys` command.
pub async fn run(cmd: KeysCmd) -> CmdResult {
    match cmd {
        KeysCmd::Rotate { conn, wait } => rotate(&conn, wait).await?,
        KeysCmd::Status { conn } => {
            let mut c = connect(&conn).await?;
            print_status(
                &c.get_key_status(pb::GetKeyStatusRequest {})
                    .await?
                    .into_inner(),
            );
        }
        KeysCmd::Retire {
            conn,
            min_version,
            force,
        } => {
            let mut c = connect(&conn).await?;
            let s = c
                .retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
                    min_version,
                    force,
                })
                .await?
                .into_inner();
            print_status(&s);
        }
    }
    Ok(())
}

/// Starts a rotation; with `wait`, draws the re-wrap progress on standard
/// error until the job is done.
async fn rotate(conn: &Conn, wait: bool) -> CmdResult {
    let mut c = connect(conn).await?;
    let s = c
        .rotate_tenant_key(pb::RotateTenantKeyRequest {})
        .await?
        .into_inner();
    println!(
        "tenant {}: v{} is now active for new data keys",
        s.tenant, s.active_version
    );
    if !wait {
        println!("  re-wrap job started; follow it with `sovra keys status`");
        return Ok(());
    }
    follow_rewrap(&mut c).await?;
    let s = c
        .get_key_status(pb::GetKeyStatusRequest {})
        .await?
        .into_inner();
    print_status(&s);
    Ok(())
}

async fn follow_rewrap(c: &mut Client) -> Result<(), Failure> {
    loop {
        let s = c
            .get_key_status(pb::GetKeyStatusRequest {})
            .await?
            .into_inner();
        let Some(j) = s.job else { break };
        let pct = if j.total == 0 {
            100.0
        } else {
            100.0 * j.rewrapped as f64 / j.total as f64
        };
        eprint!(
            "\r  re-wrapping: {}/{} ({pct:.0}%)   ",
            j.rewrapped, j.total
        );
        let _ = std::io::stderr().flush();
        if j.done {
            eprintln!();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}
