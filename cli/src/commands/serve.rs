//! `sovra serve`: the gRPC server, until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use clap::Args;
use sovra_vault::config::Config;
use sovra_vault::server;

use crate::common::{CmdResult, Failure};

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file written by `sovra init`.
    #[arg(long, default_value = "sovra-data/config.toml", env = "SOVRA_CONFIG")]
    pub config: PathBuf,
}

/// Loads the configuration (before logging starts: it names the log format).
pub fn load(a: &ServeArgs) -> Result<Config, Failure> {
    Ok(Config::load(&a.config)?)
}

/// Serves until a shutdown signal, then drains.
pub async fn run(cfg: &Config) -> CmdResult {
    let srv = server::start(cfg, None, shutdown_signal()).await?;
    srv.wait().await?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
