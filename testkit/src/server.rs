//! A data directory with the principals a caller names, and the embedded
//! server on a loopback port: what the tests, the benches and the demo all
//! start from. These return errors rather than panic, since the demo (part
//! of the `sovra` binary) uses them.

use std::path::Path;

use sovra_vault::access::auth::{IssuedToken, Role};
use sovra_vault::app::setup::{self, Initialised};
use sovra_vault::config::{self, default_tenant, Config, StorageConfig};
use sovra_vault::server::{self, ServerHandle};
use sovra_vault::VaultError;

/// Why a data directory or a server could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The vault refused (initialisation, configuration, start).
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// No temporary directory could be made.
    #[error("tempdir: {0}")]
    TempDir(std::io::Error),
    /// No loopback port could be bound.
    #[error("listen: {0}")]
    Listen(std::io::Error),
}

/// A principal of the default tenant, to add to a new data directory.
#[derive(Debug, Clone, Copy)]
pub struct PrincipalSpec<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its role.
    pub role: Role,
    /// Its department ("" for none).
    pub department: &'a str,
    /// The purposes it may declare.
    pub purposes: &'a [&'a str],
}

/// A temporary data directory initialised as `sovra init` does, with the
/// principals asked for added to its configuration.
#[derive(Debug)]
pub struct DataDir {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// What initialisation made: the configuration file, the admin token,
    /// the ledger's verifier key.
    pub init: Initialised,
    /// The added principals' tokens, in the order they were given.
    pub tokens: Vec<IssuedToken>,
}

impl DataDir {
    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.init.config_path
    }

    /// The configuration, loaded as the server loads it.
    pub fn config(&self) -> Result<Config, KitError> {
        Ok(Config::load(&self.init.config_path)?)
    }
}

/// The variable naming the PostgreSQL database the kit's data directories
/// keep their log in (`postgres://USER@HOST:PORT/DB`); unset: the embedded
/// default. `.ci/postgres start` prints it.
pub const POSTGRES_ENV: &str = "SOVRA_TEST_POSTGRES";
/// The variable naming the file with that database's password.
pub const POSTGRES_PASSWORD_FILE_ENV: &str = "SOVRA_TEST_POSTGRES_PASSWORD_FILE";

/// Whether the kit's data directories keep their log in PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var_os(POSTGRES_ENV).is_some_and(|v| !v.is_empty())
}

/// True (after saying so on stderr) when the kit's data directories keep
/// their log in PostgreSQL: for the tests that alter, delete or restore
/// the data directory's *files* (the log, `shred.slots`), which that
/// backend does not have. `cli/tests/e2e/postgres.rs` alters the database
/// instead.
pub fn file_backend_only(why: &str) -> bool {
    if on_postgres() {
        eprintln!("not run on PostgreSQL: {why}");
        return true;
    }
    false
}

/// The storage a new kit data directory uses: with [`POSTGRES_ENV`] set,
/// PostgreSQL in a schema of its own (so tests never share a log);
/// otherwise the embedded default.
pub fn kit_storage() -> StorageConfig {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(url) = std::env::var(POSTGRES_ENV).ok().filter(|v| !v.is_empty()) else {
        return StorageConfig::default();
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    StorageConfig {
        postgres: Some(url),
        password_file: std::env::var_os(POSTGRES_PASSWORD_FILE_ENV).map(Into::into),
        schema: Some(format!("t{}_{nanos}_{n}", std::process::id())),
        ..StorageConfig::default()
    }
}

/// Initialises a temporary data directory (listening on port 0, so a
/// server picks a free port) and adds `principals` to it; its log is kept
/// where [`kit_storage`] says.
pub fn data_dir(principals: &[PrincipalSpec<'_>]) -> Result<DataDir, KitError> {
    data_dir_on(principals, kit_storage())
}

/// [`data_dir`] with the log kept where `storage` says.
pub fn data_dir_on(
    principals: &[PrincipalSpec<'_>],
    storage: StorageConfig,
) -> Result<DataDir, KitError> {
    let dir = tempfile::tempdir().map_err(KitError::TempDir)?;
    let init = setup::init_with(dir.path(), "127.0.0.1:0", storage)?;
    let mut cfg = Config::load(&init.config_path)?;
    let tokens = principals
        .iter()
        .map(|p| {
            cfg.add_principal_with(p.name, p.role, &default_tenant(), p.department, p.purposes)
        })
        .collect::<Result<Vec<_>, _>>()?;
    config::write_config(&cfg, &init.config_path)?;
    Ok(DataDir { dir, init, tokens })
}

/// A server running in this process.
pub struct Running {
    /// Its handle (shut it down to stop it).
    pub handle: ServerHandle,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

/// Starts the server in this process on a free loopback port (call inside
/// a tokio runtime); it runs until its handle is shut down.
pub async fn serve(cfg: &Config) -> Result<Running, KitError> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(KitError::Listen)?;
    let handle = server::start(cfg, Some(l), std::future::pending()).await?;
    let url = format!("http://{}", handle.addr());
    Ok(Running { handle, url })
}
