//! The `sovra` command: parses the command line, starts logging for the
//! server, and hands each command to its module in `sovra_cli::commands`.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use sovra_cli::commands::{
    audit, consent, contract, demo, init, job, keys, lineage, migrate, policy, records, serve,
    token,
};
use sovra_cli::common::CmdResult;
use sovra_cli::{Cli, Cmd};

// glibc malloc showed up at ~10% of server CPU under load; mimalloc is
// faster for tonic's many small per-request allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every file any command writes (config, keys, exports, databases) is
    // private to this user, whatever umask it was started with.
    sovra_vault::files::private_umask();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

async fn run(cmd: Cmd) -> CmdResult {
    match cmd {
        Cmd::Init(a) => init::run(a),
        Cmd::Migrate(a) => migrate::run(a),
        Cmd::Serve(a) => {
            // The configuration names the log format, so logging starts
            // once it is read (a bad file is reported on plain stderr).
            let cfg = serve::load(&a)?;
            init_logs(cfg.log_format == "json");
            serve::run(&cfg).await
        }
        Cmd::Token { cmd } => token::run(cmd),
        Cmd::Put(a) => records::put(a).await,
        Cmd::Get(a) => records::get(a).await,
        Cmd::Search(a) => records::search(a).await,
        Cmd::Erase(a) => records::erase(a).await,
        Cmd::Keys { cmd } => keys::run(cmd).await,
        Cmd::Consent { cmd } => consent::run(cmd).await,
        Cmd::Audit { cmd } => audit::run(cmd).await,
        Cmd::Policy { cmd } => policy::run(cmd).await,
        Cmd::Lineage { cmd } => lineage::run(cmd).await,
        Cmd::Job { cmd } => job::run(cmd).await,
        Cmd::Contract { cmd } => contract::run(cmd).await,
        Cmd::Schema { conn } => records::schema(conn).await,
        Cmd::Demo(a) => demo::run_command(a).await,
    }
}

/// Structured logs on standard error, `text` or `json`; the level from
/// `RUST_LOG` (default `info`).
fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // tonic reports why it closed a connection (a protocol error, a
        // GOAWAY it sent, a reset) at debug level: shown by default.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,tonic::transport::server=debug")
        });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
