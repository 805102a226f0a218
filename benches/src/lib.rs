//! Shared helpers for Sovra's benchmarks and the `sovra-load` generator:
//! an embedded server on a loopback port with a token per role (the test
//! kit's data directory and server).

#![forbid(unsafe_code)]

use sovra_testkit::PrincipalSpec;
use sovra_vault::access::auth::Role;
use sovra_vault::server::ServerHandle;

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
    let names: Vec<String> = (0..6).map(|i| format!("partner-{i}")).collect();
    let mut principals = vec![PrincipalSpec {
        name: "bench",
        role: Role::Service,
        department: "sales",
        purposes: &["customer_service", "marketing", "billing", "lead_scoring"],
    }];
    principals.extend(names.iter().map(|name| PrincipalSpec {
        name,
        role: Role::Partner,
        department: "partners",
        purposes: &["lead_scoring"],
    }));
    let d = sovra_testkit::data_dir(&principals)?;
    let running = sovra_testkit::serve(&d.config()?).await?;
    let mut tokens = d.tokens.iter().map(|t| t.token.to_string());
    let service_token = tokens.next().ok_or("the service principal was not added")?;
    Ok(Embedded {
        partner_tokens: tokens.collect(),
        service_token,
        admin_token: d.init.admin_token.token.to_string(),
        dir: d.dir,
        handle: running.handle,
        url: running.url,
    })
}
