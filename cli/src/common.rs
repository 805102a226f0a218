//! What the commands share: the connection arguments, the kinds of failure
//! and their exit codes, credentials, the clients, and bounded file reads.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use sovra_vault::client::{self, Client};
use sovra_vault::VaultError;
use zeroize::Zeroizing;

// Flattened into every client command (no doc comment: clap would use it).
#[derive(Args, Clone)]
pub struct Conn {
    /// Server URL.
    #[arg(
        long,
        env = "SOVRA_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// Bearer token (prefer the environment variable: arguments are visible to other users).
    #[arg(long, env = "SOVRA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM CA certificate to trust for https:// servers.
    #[arg(long, env = "SOVRA_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

/// Why a command failed; each kind has its exit code (see [`Failure::exit`]).
#[derive(Debug)]
pub enum Failure {
    /// The vault library refused or failed (configuration, connection).
    Vault(VaultError),
    /// The server refused the call.
    Rpc(tonic::Status),
    /// Bad command-line input.
    Usage(String),
    /// An offline verification failed (or a policy set is invalid).
    Verify(String),
    /// A local failure outside the vault library (the demo, offline
    /// explain), reported as the vault's own are.
    Local(String),
}

impl From<VaultError> for Failure {
    fn from(e: VaultError) -> Self {
        Failure::Vault(e)
    }
}
impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Rpc(s)
    }
}

impl Failure {
    /// Prints the failure and returns the exit code: 1 local error, 2 the
    /// server refused, 64 bad command-line input; a failed verification
    /// prints `FAILED:` on standard output and exits 1.
    pub fn exit(self) -> ExitCode {
        match self {
            Failure::Vault(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
            Failure::Local(m) => {
                eprintln!("error: {m}");
                ExitCode::from(1)
            }
            Failure::Rpc(s) => {
                eprintln!("error: {:?}: {}", s.code(), s.message());
                ExitCode::from(2)
            }
            Failure::Usage(m) => {
                eprintln!("error: {m}");
                ExitCode::from(64)
            }
            Failure::Verify(m) => {
                println!("FAILED: {m}");
                ExitCode::from(1)
            }
        }
    }
}

/// What a command returns.
pub type CmdResult = Result<(), Failure>;

/// Reads at most `limit` bytes of `p`; a larger file is refused, so a
/// hostile or mistaken path cannot make the command allocate without bound.
pub fn read_file(p: &Path, limit: u64) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let f = std::fs::File::open(p)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", p.display())))?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", p.display())))?;
    if buf.len() as u64 > limit {
        return Err(Failure::Usage(format!(
            "{} is larger than {limit} bytes",
            p.display()
        )));
    }
    Ok(buf)
}

/// Writes `data` to `p`, naming the file if it fails.
pub fn write_file(p: &Path, data: &[u8]) -> Result<(), Failure> {
    std::fs::write(p, data)
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", p.display())))
}

/// The CA certificate and token a client command connects with.
pub fn credentials(conn: &Conn) -> Result<(Option<Vec<u8>>, Zeroizing<String>), Failure> {
    let ca = match &conn.ca_cert {
        Some(p) => Some(read_file(p, 1 << 20)?),
        None => None,
    };
    let token = conn
        .token
        .as_ref()
        .map(|t| Zeroizing::new(t.clone()))
        .ok_or_else(|| Failure::Usage("no token: set SOVRA_TOKEN or pass --token".into()))?;
    Ok((ca, token))
}

/// A client of the `Vault` service. (It reads the CA file without the
/// 1 MiB bound of [`credentials`], as the record commands always have.)
pub async fn connect(conn: &Conn) -> Result<Client, Failure> {
    let ca = match &conn.ca_cert {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let token = conn.token.as_ref().map(|t| Zeroizing::new(t.clone()));
    if token.is_none() {
        return Err(Failure::Usage(
            "no token: set SOVRA_TOKEN or pass --token".into(),
        ));
    }
    Ok(client::connect(&conn.server, token.as_deref().map(String::as_str), ca).await?)
}

/// A client of the `Ledger` service.
pub async fn connect_ledger(conn: &Conn) -> Result<client::LedgerClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_ledger(&conn.server, Some(token.as_str()), ca).await?)
}

/// A client of the `Policy` service.
pub async fn connect_policy(conn: &Conn) -> Result<client::PolicyClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_policy(&conn.server, Some(token.as_str()), ca).await?)
}

/// A client of the `Lineage` service.
pub async fn connect_lineage(conn: &Conn) -> Result<client::LineageClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_lineage(&conn.server, Some(token.as_str()), ca).await?)
}

/// A client of the `Contracts` service.
pub async fn connect_contracts(conn: &Conn) -> Result<client::ContractsClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_contracts(&conn.server, Some(token.as_str()), ca).await?)
}

/// A client of the `Sandbox` service.
pub async fn connect_sandbox(conn: &Conn) -> Result<client::SandboxClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_sandbox(&conn.server, Some(token.as_str()), ca).await?)
}
