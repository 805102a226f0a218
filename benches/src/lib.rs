//! Shared helpers for Sovra's benchmarks and the `sovra-load` generator:
//! an embedded server on a loopback port with a token per role.

#![forbid(unsafe_code)]

use sovra_vault::access::auth::Role;
use sovra_vault::config::{self, Config};
use sovra_vault::server::{self, ServerHandle};

/// An embedded server in a temporary directory.
pub struct Embedded {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The running server.
    pub handle: ServerHandle,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// A `service` token.
    pub service_token: String,
    /// The `admin` token.
    pub admin_token: String,
    /// Tokens of partners `partner-0` … `partner-5` (purpose
    /// `lead_scoring`), for sandbox load: each may have only a few jobs
    /// queued or running.
    pub partner_tokens: Vec<String>,
}

/// Starts an embedded server (call inside a tokio runtime).
pub async fn embedded() -> Result<Embedded, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let init = config::init(dir.path(), "127.0.0.1:0")?;
    let mut cfg = Config::load(&init.config_path)?;
    let svc = cfg.add_principal_with(
        "bench",
        Role::Service,
        "default",
        "sales",
        &["customer_service", "marketing", "billing", "lead_scoring"],
    )?;
    let mut partner_tokens = Vec::new();
    for i in 0..6 {
        let p = cfg.add_principal_with(
            &format!("partner-{i}"),
            Role::Partner,
            "default",
            "partners",
            &["lead_scoring"],
        )?;
        partner_tokens.push(p.token.to_string());
    }
    config::write_config(&cfg, &init.config_path)?;
    let cfg = Config::load(&init.config_path)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let handle = server::start(&cfg, Some(listener), std::future::pending()).await?;
    let url = format!("http://{}", handle.addr());
    Ok(Embedded {
        dir,
        handle,
        url,
        service_token: svc.token.to_string(),
        admin_token: init.admin_token.token.to_string(),
        partner_tokens,
    })
}
