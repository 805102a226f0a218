//! The server configuration file (`config.toml`). Initialising a data
//! directory (`sovra init`) is `app::setup`.
//!
//! Guarantees: relative paths resolve against the configuration file's
//! directory, unknown keys are rejected (a typo never silently falls back to a
//! default), and the file holds token hashes, never tokens or keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::access::auth::{issue_token, Authenticator, IssuedToken, Principal, Role};
use crate::crypto::keys::RootKey;
use crate::error::{Result, VaultError};
use crate::schema::validate_id;
use crate::schema::{Schema, DEFAULT_SCHEMA};
use sovra_ledger::{Ledger, LedgerOptions, LogKey};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default cap on one request, in bytes.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The configuration, as written in `config.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory of the database (relative to the config file).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Schema file; the embedded default CRM schema if absent.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// Root key file (0600); `SOVRA_ROOT_KEY` overrides it.
    #[serde(default = "default_root_key_file")]
    pub root_key_file: PathBuf,
    /// Largest accepted request message, in bytes.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// `text` or `json` logs.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Longest time, in microseconds, the write-ahead log may hold a group
    /// commit back while other requests are still working towards their
    /// appends, so that they share its sync (0..=100000; 0 syncs every
    /// group at once). A lone client never waits for it.
    #[serde(default = "default_commit_delay_us")]
    pub commit_delay_us: u64,
    /// Optional TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The consent and audit ledger.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// The policy set.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Connection and call limits.
    #[serde(default)]
    pub limits: Limits,
    /// Sandbox admission: jobs running at once, evaluation threads, queue
    /// and per-principal limits (written only when changed, since the
    /// defaults follow the machine's cores).
    #[serde(default, skip_serializing_if = "is_default_admission")]
    pub sandbox: AdmissionConfig,
    /// Where the log is kept: the data directory (the default) or
    /// PostgreSQL (`[storage] postgres = "postgres://…"`).
    #[serde(default, skip_serializing_if = "StorageConfig::is_embedded")]
    pub storage: StorageConfig,
    /// Who may call, by token hash.
    #[serde(default)]
    pub principals: Vec<PrincipalConfig>,
    /// Directory the file was read from (not serialised).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was read from, if any (not serialised).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// TLS settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// Ledger settings (`[ledger]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The log's Ed25519 signing key (0600, 64 hex digits of seed).
    #[serde(default = "default_ledger_key_file")]
    pub key_file: PathBuf,
    /// The log origin: the first line of every checkpoint and the key name
    /// (no spaces or `+`).
    #[serde(default = "default_origin")]
    pub origin: String,
    /// A checkpoint is signed at least this often while entries arrive.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            key_file: default_ledger_key_file(),
            origin: default_origin(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
        }
    }
}

fn default_ledger_key_file() -> PathBuf {
    "ledger.key".into()
}
fn default_origin() -> String {
    "sovra.local/ledger".into()
}
fn default_checkpoint_interval_ms() -> u64 {
    1000
}

/// The environment variable that holds the PostgreSQL password when no
/// `password_file` is set.
pub const POSTGRES_PASSWORD_ENV: &str = "SOVRA_POSTGRES_PASSWORD";

/// Storage settings (`[storage]`). Without `postgres`, everything is in
/// the data directory (sled views of its write-ahead log). With it, the
/// log and the shred pads are kept in PostgreSQL, one group commit per
/// transaction, and the data directory holds only views rebuilt from the
/// log when lost (see docs/postgres.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `postgres://USER@HOST:PORT/DATABASE`, without a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// A file (0600) holding the password; otherwise
    /// `SOVRA_POSTGRES_PASSWORD`, otherwise none (trust or peer auth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The schema the tables go in (`sovra` by default): one vault per
    /// schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Where the shred pads are kept: `file` (the default: `pads_file`,
    /// overwritten in place, so an erasure leaves no copy of the pad in
    /// PostgreSQL's history) or `postgres` (rows of the log's `pads`
    /// table: a standby that takes the lease has them without a shared
    /// volume, but PostgreSQL keeps a deleted row's old version in its
    /// heap until vacuum, in its WAL, replicas and backups; SECURITY.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pads: Option<String>,
    /// The pad file (default `<data_dir>/shred.slots`); for a standby, a
    /// volume that moves with the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pads_file: Option<PathBuf>,
    /// How long a server waits for the sequencer lease another server holds
    /// before giving up, in milliseconds; absent: as long as it takes (a
    /// standby).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_wait_ms: Option<u64>,
}

/// The schema used when `[storage] schema` is absent.
pub const DEFAULT_POSTGRES_SCHEMA: &str = "sovra";

impl StorageConfig {
    fn is_embedded(&self) -> bool {
        *self == StorageConfig::default()
    }
}

/// One principal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Name, for logs and errors.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tenant it acts for.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Hex SHA-256 of its bearer token.
    pub token_sha256: String,
    /// Its department (policies compare it with a field's owning
    /// department); empty for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub department: String,
    /// The purposes it may declare (least privilege: none by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<String>,
}

/// Policy settings (`[policy]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files; the compiled-in default set when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// The tenant whose admins may reload the policy set. The set governs
    /// every tenant, so no other tenant's admin may change it.
    #[serde(default = "default_tenant")]
    pub operator_tenant: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: None,
            operator_tenant: default_tenant(),
        }
    }
}

fn is_default_admission(a: &AdmissionConfig) -> bool {
    *a == AdmissionConfig::default()
}

fn default_listen() -> String {
    DEFAULT_LISTEN.into()
}
fn default_data_dir() -> PathBuf {
    "data".into()
}
fn default_root_key_file() -> PathBuf {
    "root.key".into()
}
fn default_max_request_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
}
fn default_log_format() -> String {
    "text".into()
}
fn default_commit_delay_us() -> u64 {
    u64::try_from(sovra_wal::DEFAULT_MAX_COMMIT_DELAY.as_micros()).unwrap_or(u64::MAX)
}
/// The tenant used when none is named.
pub fn default_tenant() -> String {
    "default".into()
}

impl Config {
    /// Parses a configuration; `base_dir` resolves relative paths.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Config> {
        let mut c: Config = toml::from_str(text)
            .map_err(|e| VaultError::config(origin, format!("invalid configuration: {e}")))?;
        c.base_dir = base_dir.to_path_buf();
        c.listen_addr().map_err(|_| {
            VaultError::config(
                origin,
                format!(
                    "listen: `{}` is not an address like 127.0.0.1:50051",
                    c.listen
                ),
            )
        })?;
        if !(1024..=64 * 1024 * 1024).contains(&c.max_request_bytes) {
            return Err(VaultError::config(
                origin,
                "max_request_bytes must be 1 KiB..=64 MiB",
            ));
        }
        if u128::from(c.commit_delay_us) > sovra_wal::MAX_COMMIT_DELAY.as_micros() {
            return Err(VaultError::config(
                origin,
                format!(
                    "commit_delay_us must be 0..={}",
                    sovra_wal::MAX_COMMIT_DELAY.as_micros()
                ),
            ));
        }
        if !matches!(c.log_format.as_str(), "text" | "json") {
            return Err(VaultError::config(
                origin,
                "log_format must be `text` or `json`",
            ));
        }
        c.authenticator()
            .map_err(|e| VaultError::config(origin, e.to_string()))?;
        Ok(c)
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| VaultError::config(&shown, format!("cannot read configuration: {e}")))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut cfg = Config::parse(&text, &shown, &base)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Refuses to go on if group or others may write a file the server
    /// trusts: this configuration, its directory, the schema, the policy
    /// directory and files, the keys, the TLS files, or anything in the
    /// data directory (`files::refuse_writable`). Each names the file.
    pub fn refuse_shared_writes(&self) -> Result<()> {
        use crate::files::{refuse_writable, refuse_writable_tree};
        let exists = |p: &Path| p.exists().then(|| p.to_path_buf());
        let mut files: Vec<PathBuf> = Vec::new();
        files.extend(self.source.clone());
        if !self.base_dir.as_os_str().is_empty() {
            files.push(self.base_dir.clone());
        }
        files.extend(self.schema.as_ref().map(|p| self.resolve(p)));
        files.extend(exists(&self.resolve(&self.root_key_file)));
        files.extend(exists(&self.resolve(&self.ledger.key_file)));
        if let Some(t) = &self.tls {
            files.push(self.resolve(&t.cert_file));
            files.push(self.resolve(&t.key_file));
        }
        for f in &files {
            refuse_writable(f)?;
        }
        if let Some(d) = self.policy_dir() {
            refuse_writable_tree(&d)?;
        }
        refuse_writable_tree(&self.resolve(&self.data_dir))
    }

    /// Resolves a path relative to the config file.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The listen address.
    pub fn listen_addr(&self) -> std::result::Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }

    /// The schema in force.
    pub fn load_schema(&self) -> Result<Schema> {
        match &self.schema {
            Some(p) => Schema::load(&self.resolve(p)),
            None => Schema::parse(DEFAULT_SCHEMA, "embedded default schema"),
        }
    }

    /// The root key.
    pub fn load_root_key(&self) -> Result<RootKey> {
        RootKey::load(&self.resolve(&self.root_key_file))
    }

    /// Opens the ledger in `<data_dir>/ledger`. A missing key file is
    /// created only for a ledger that does not exist yet; an existing log
    /// without its key is refused (its checkpoints could not be verified).
    /// The data directory's write-ahead log (`wal/` in it), reporting a
    /// torn tail it cut.
    pub fn open_wal(&self) -> Result<std::sync::Arc<sovra_wal::Wal>> {
        let opts = sovra_wal::WalOptions {
            max_commit_delay: std::time::Duration::from_micros(self.commit_delay_us),
            ..sovra_wal::WalOptions::default()
        };
        if let Some(target) = self.postgres_target()? {
            tracing::info!(target = %target.shown(), "opening the log in PostgreSQL");
            let wait = self
                .storage
                .lease_wait_ms
                .map(std::time::Duration::from_millis);
            let lock = self.resolve(&self.data_dir).join("postgres.lock");
            let opened = sovra_wal::Wal::open_postgres(&target, opts, wait, Some(&lock))
                .map_err(|e| VaultError::config("[storage] postgres", e.to_string()))?;
            return Ok(std::sync::Arc::new(opened.wal));
        }
        let dir = self.resolve(&self.data_dir).join("wal");
        let opened = sovra_wal::Wal::open(&dir, opts)?;
        if let Some(t) = &opened.torn {
            tracing::warn!(
                segment = %t.segment.display(),
                offset = t.offset,
                dropped = t.dropped,
                reason = %t.reason,
                "cut the write-ahead log's torn tail (a group whose write a crash interrupted; none of it was acknowledged)"
            );
        }
        Ok(std::sync::Arc::new(opened.wal))
    }

    /// The PostgreSQL database and schema `[storage]` names, with its
    /// password read from `password_file` or the environment; `None` for
    /// the embedded default.
    pub fn postgres_target(&self) -> Result<Option<sovra_wal::PgTarget>> {
        let st = &self.storage;
        let Some(url) = &st.postgres else {
            if st.password_file.is_some() || st.schema.is_some() || st.lease_wait_ms.is_some() {
                return Err(VaultError::config(
                    "[storage]",
                    "password_file and schema need `postgres = \"postgres://USER@HOST:PORT/DB\"`",
                ));
            }
            return Ok(None);
        };
        let password = match &st.password_file {
            Some(f) => {
                let path = self.resolve(f);
                let text =
                    zeroize::Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                        VaultError::config(
                            path.display().to_string(),
                            format!("cannot read the PostgreSQL password file: {e}"),
                        )
                    })?);
                Some(zeroize::Zeroizing::new(
                    text.trim_end_matches(['\n', '\r']).to_owned(),
                ))
            }
            None => std::env::var(POSTGRES_PASSWORD_ENV)
                .ok()
                .map(zeroize::Zeroizing::new),
        };
        let schema = st.schema.as_deref().unwrap_or(DEFAULT_POSTGRES_SCHEMA);
        sovra_wal::PgTarget::new(url, password.as_deref().map(String::as_str), schema)
            .map(Some)
            .map_err(|e| VaultError::config("[storage] postgres", e.to_string()))
    }

    /// Where the shred pads are (`[storage] pads`, `pads_file`).
    pub fn pad_place(&self) -> Result<crate::store::PadPlace> {
        let st = &self.storage;
        match st.pads.as_deref() {
            None | Some("file") => Ok(crate::store::PadPlace::File(match &st.pads_file {
                Some(p) => self.resolve(p),
                None => self.resolve(&self.data_dir).join("shred.slots"),
            })),
            Some("postgres") if st.postgres.is_none() => Err(VaultError::config(
                "[storage] pads",
                "`pads = \"postgres\"` needs `postgres = \"postgres://…\"`",
            )),
            Some("postgres") if st.pads_file.is_some() => Err(VaultError::config(
                "[storage] pads",
                "`pads_file` is for `pads = \"file\"`",
            )),
            Some("postgres") => Ok(crate::store::PadPlace::Database),
            Some(other) => Err(VaultError::config(
                "[storage] pads",
                format!("{other:?} is not a pad place: use \"file\" or \"postgres\""),
            )),
        }
    }

    /// Opens the ledger over `wal`.
    pub fn open_ledger(&self, wal: std::sync::Arc<sovra_wal::Wal>) -> Result<Ledger> {
        let key_path = self.resolve(&self.ledger.key_file);
        let dir = self.resolve(&self.data_dir).join("ledger");
        if !key_path.exists() {
            if dir.exists() {
                return Err(VaultError::config(
                    key_path.display().to_string(),
                    "the ledger key file is missing but the ledger exists; restore the key from backup",
                ));
            }
            LogKey::write_new(&key_path)?;
            tracing::warn!(path = %key_path.display(), "created a new ledger signing key");
        }
        let key = LogKey::load_file(&self.ledger.origin, &key_path)?;
        let opts = LedgerOptions {
            checkpoint_interval: std::time::Duration::from_millis(
                self.ledger.checkpoint_interval_ms.clamp(10, 3_600_000),
            ),
            verify_on_open: true,
            wal: Some(wal),
        };
        Ok(Ledger::open(&dir, key, opts)?)
    }

    /// The principals, by token hash.
    pub fn authenticator(&self) -> Result<Authenticator> {
        let mut a = Authenticator::default();
        validate_id("policy.operator_tenant", &self.policy.operator_tenant, 64)?;
        for p in &self.principals {
            validate_id("principals.name", &p.name, 64)?;
            validate_id("principals.tenant", &p.tenant, 64)?;
            if !p.department.is_empty() {
                validate_id("principals.department", &p.department, 64)?;
            }
            for purpose in &p.purposes {
                validate_id("principals.purposes", purpose, 64)?;
            }
            a.add(
                &p.token_sha256,
                Principal::new(
                    &p.name,
                    p.role,
                    &p.tenant,
                    &p.department,
                    p.purposes.iter().cloned(),
                ),
            )?;
        }
        Ok(a)
    }

    /// Serialises the configuration (with a header comment).
    pub fn to_toml(&self) -> Result<String> {
        let body = toml::to_string_pretty(self)
            .map_err(|e| VaultError::config("config", format!("cannot serialise: {e}")))?;
        Ok(format!(
            "# Sovra server configuration. Relative paths are relative to this file.\n\
             # Principals hold SHA-256 hashes of bearer tokens, never the tokens.\n\
             # Add one with `sovra token add --config <this file> --name NAME --role ROLE`.\n{body}"
        ))
    }

    /// The policy directory, resolved against the file's directory.
    pub fn policy_dir(&self) -> Option<PathBuf> {
        self.policy.dir.as_ref().map(|d| self.base_dir.join(d))
    }

    /// Loads and validates the configured policy set.
    pub fn policies(&self) -> Result<sovra_policy::Policies> {
        match self.policy_dir() {
            Some(d) => Ok(sovra_policy::Policies::load_dir(&d)?),
            None => Ok(sovra_policy::Policies::embedded()?),
        }
    }

    /// The configuration `sovra init` writes as `dir/config.toml`: the
    /// defaults, with the schema and policy files beside it
    /// (`schema.toml`, `policies/`), the ledger origin `origin`, and no
    /// principals yet.
    pub fn for_new_dir(dir: &Path, listen: &str, origin: String) -> Config {
        Config {
            storage: StorageConfig::default(),
            listen: listen.into(),
            data_dir: default_data_dir(),
            schema: Some("schema.toml".into()),
            root_key_file: default_root_key_file(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            log_format: default_log_format(),
            commit_delay_us: default_commit_delay_us(),
            tls: None,
            ledger: LedgerConfig {
                origin,
                ..LedgerConfig::default()
            },
            policy: PolicyConfig {
                dir: Some("policies".into()),
                operator_tenant: default_tenant(),
            },
            limits: Limits::default(),
            sandbox: AdmissionConfig::default(),
            principals: Vec::new(),
            base_dir: dir.to_path_buf(),
            source: Some(dir.join("config.toml")),
        }
    }

    /// Issues a token for a new principal with no department and no
    /// purposes, and adds it.
    pub fn add_principal(&mut self, name: &str, role: Role, tenant: &str) -> Result<IssuedToken> {
        self.add_principal_with(name, role, tenant, "", &[])
    }

    /// Issues a token for a new principal and adds it.
    pub fn add_principal_with(
        &mut self,
        name: &str,
        role: Role,
        tenant: &str,
        department: &str,
        purposes: &[&str],
    ) -> Result<IssuedToken> {
        if !department.is_empty() {
            validate_id("department", department, 64)?;
        }
        for p in purposes {
            validate_id("purpose", p, 64)?;
        }
        validate_id("name", name, 64)?;
        validate_id("tenant", tenant, 64)?;
        if self.principals.iter().any(|p| p.name == name) {
            return Err(VaultError::invalid(
                "name",
                format!("a principal named `{name}` already exists"),
            ));
        }
        let t = issue_token();
        self.principals.push(PrincipalConfig {
            name: name.into(),
            role,
            tenant: tenant.into(),
            token_sha256: t.sha256_hex.clone(),
            department: department.into(),
            purposes: purposes.iter().map(|p| (*p).to_owned()).collect(),
        });
        Ok(t)
    }
}

/// Writes `cfg` to `path` atomically (temporary file, fsync, rename).
pub fn write_config(cfg: &Config, path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    let text = cfg.to_toml()?;
    let tmp = path.with_extension("toml.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| VaultError::config(&shown, format!("cannot write: {e}")))
}

/// Connection and call limits (`[limits]` in config.toml). The defaults
/// need no tuning for one server on a small machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Sockets waiting for their first bytes at once (the oldest is closed
    /// when another arrives).
    pub max_handshaking: usize,
    /// How long a new socket may take to send its first bytes, in ms.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 keepalive: ping an established connection this often, in ms.
    pub keepalive_interval_ms: u64,
    /// HTTP/2 keepalive: close it if a ping is not answered within, in ms.
    pub keepalive_timeout_ms: u64,
    /// Concurrent calls (HTTP/2 streams) on one connection.
    pub max_streams_per_connection: u32,
    /// Calls one principal may have being handled at once.
    pub max_calls_per_principal: usize,
    /// Calls without a known token being handled at once, all together.
    pub max_calls_unauthenticated: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_handshaking: 256,
            handshake_timeout_ms: 5_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            max_streams_per_connection: 128,
            max_calls_per_principal: 256,
            max_calls_unauthenticated: 64,
        }
    }
}

impl Limits {
    /// Checks every limit is usable, naming the first that is not.
    pub fn validate(&self) -> crate::error::Result<()> {
        let bad = |name: &str, why: &str| {
            Err(crate::error::VaultError::config(
                format!("limits.{name}"),
                why.to_owned(),
            ))
        };
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return bad("max_connections", "must be 1 to 1000000");
        }
        if self.max_handshaking == 0 || self.max_handshaking > self.max_connections {
            return bad("max_handshaking", "must be 1 to max_connections");
        }
        if !(100..=120_000).contains(&self.handshake_timeout_ms) {
            return bad("handshake_timeout_ms", "must be 100 to 120000");
        }
        if !(1_000..=3_600_000).contains(&self.keepalive_interval_ms) {
            return bad("keepalive_interval_ms", "must be 1000 to 3600000");
        }
        if !(1_000..=600_000).contains(&self.keepalive_timeout_ms) {
            return bad("keepalive_timeout_ms", "must be 1000 to 600000");
        }
        if self.max_streams_per_connection == 0 || self.max_streams_per_connection > 10_000 {
            return bad("max_streams_per_connection", "must be 1 to 10000");
        }
        if self.max_calls_per_principal == 0 {
            return bad("max_calls_per_principal", "must be at least 1");
        }
        if self.max_calls_unauthenticated == 0 {
            return bad("max_calls_unauthenticated", "must be at least 1");
        }
        Ok(())
    }
}

/// Admission limits of the sandbox: how much of the machine jobs may take.
/// The defaults suit a small server (2 cores: one job at a time on one
/// thread, so one core stays with the vault's request handlers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Jobs evaluated at the same time. Default: half the cores, at least 1.
    pub max_running: usize,
    /// Threads of the evaluation pool all running jobs share. Default: half
    /// the cores, at least 1.
    pub eval_threads: usize,
    /// Jobs waiting to run, all principals together. Default 32.
    pub max_queued: usize,
    /// Jobs one principal (of a tenant) may have queued or running. Default 4.
    pub max_jobs_per_principal: usize,
}

impl Default for AdmissionConfig {
    fn default() -> AdmissionConfig {
        let half = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1);
        AdmissionConfig {
            max_running: half,
            eval_threads: half,
            max_queued: 32,
            max_jobs_per_principal: 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_name_the_problem() {
        let base = Path::new("/tmp");
        for (text, needle) in [
            ("listen = 5", "listen"),
            ("listen = 'nope'", "listen"),
            ("bogus = 1", "bogus"),
            ("max_request_bytes = 1", "max_request_bytes"),
            ("commit_delay_us = 100001", "commit_delay_us"),
            ("commit_delay_us = -1", "commit_delay_us"),
            ("commit_delay_us = 'soon'", "commit_delay_us"),
            ("log_format = 'xml'", "log_format"),
            (
                "[[principals]]\nname='a'\nrole='root'\ntoken_sha256='00'",
                "role",
            ),
            (
                &format!(
                    "[[principals]]\nname='a'\nrole='admin'\ntoken_sha256='{}'",
                    "zz".repeat(32)
                ),
                "token_sha256",
            ),
            (
                &format!(
                    "[[principals]]\nname='a b'\nrole='admin'\ntoken_sha256='{}'",
                    "00".repeat(32)
                ),
                "principals.name",
            ),
        ] {
            let e = Config::parse(text, "config.toml", base)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("config.toml") && e.contains(needle),
                "{text}: {e}"
            );
        }
    }
}
