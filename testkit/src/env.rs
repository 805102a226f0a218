//! The tests' environment: one principal and token per role, the server
//! in-process or as the real `sovra` binary. A failure here panics with
//! its cause, which is what a test wants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;
use std::path::PathBuf;

use sovra_vault::access::auth::Role;
use sovra_vault::client::{self, Client};
use sovra_vault::config::{self, Config};

use crate::server::{data_dir_on, serve, PrincipalSpec, Running};

/// The purposes the test service principal may declare.
pub const SERVICE_PURPOSES: &[&str] = &[
    "customer_service",
    "sales_followup",
    "marketing",
    "lead_scoring",
    "billing",
    "fraud_prevention",
    "legal_obligation",
    "analytics",
    "export",
];

/// An initialised data directory with one principal per role: `svc`
/// (service, sales, [`SERVICE_PURPOSES`]), `dpo` (officer, compliance),
/// `partner` (partner, purpose `lead_scoring`) and `admin`.
pub struct Env {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// Its `config.toml`.
    pub config_path: PathBuf,
    /// The service principal's token.
    pub service: String,
    /// The officer's token.
    pub officer: String,
    /// The partner's token.
    pub partner: String,
    /// The admin's token.
    pub admin: String,
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

impl Env {
    /// A fresh directory and its principals, on the kit's storage
    /// ([`crate::kit_storage`]).
    pub fn new() -> Env {
        Env::on(crate::kit_storage())
    }

    /// [`Env::new`] with the log kept where `storage` says.
    pub fn on(storage: config::StorageConfig) -> Env {
        let d = data_dir_on(
            &[
                PrincipalSpec {
                    name: "svc",
                    role: Role::Service,
                    department: "sales",
                    purposes: SERVICE_PURPOSES,
                },
                PrincipalSpec {
                    name: "dpo",
                    role: Role::Officer,
                    department: "compliance",
                    purposes: &[],
                },
                PrincipalSpec {
                    name: "partner",
                    role: Role::Partner,
                    department: "partners",
                    purposes: &["lead_scoring"],
                },
            ],
            storage,
        )
        .unwrap();
        let [service, officer, partner] = &d.tokens[..] else {
            panic!("three principals asked for, {} made", d.tokens.len());
        };
        let (service, officer, partner) = (
            service.token.to_string(),
            officer.token.to_string(),
            partner.token.to_string(),
        );
        Env {
            config_path: d.init.config_path.clone(),
            service,
            officer,
            partner,
            admin: d.init.admin_token.token.to_string(),
            dir: d.dir,
        }
    }

    /// The configuration as it is on disk now.
    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }

    /// The sled database directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server in this process on a free loopback port.
    pub async fn start(&self) -> Running {
        serve(&self.config()).await.unwrap()
    }
}

impl Running {
    /// A `Vault` client with `token`.
    pub async fn client(&self, token: Option<&str>) -> Client {
        client::connect(&self.url, token, None).await.unwrap()
    }

    /// Shuts the server down and waits until it has.
    pub async fn stop(self) {
        self.handle.shutdown().await.unwrap();
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rewrites the config's listen address.
pub fn set_listen(env: &Env, port: u16) {
    let mut cfg = env.config();
    cfg.listen = format!("127.0.0.1:{port}");
    config::write_config(&cfg, &env.config_path).unwrap();
}

/// Whether a server at `url` answers an authenticated call (`token`)
/// within `within`, polled every 50 ms.
pub async fn serving(url: &str, token: &str, within: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if let Ok(mut c) = client::connect(url, Some(token), None).await {
            if c.describe_schema(sovra_proto::vault::v1::DescribeSchemaRequest {})
                .await
                .is_ok()
            {
                return true;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Starts `BIN serve` (the real `sovra` binary: a test of the package that
/// builds it has its path in `CARGO_BIN_EXE_sovra`) as a process on `port`
/// and waits until it answers. The caller kills and waits for it.
#[allow(clippy::zombie_processes)]
pub async fn spawn_server(bin: impl AsRef<OsStr>, env: &Env, port: u16) -> std::process::Child {
    set_listen(env, port);
    let log = std::fs::File::create(env.dir.path().join(format!("serve-{port}.log"))).unwrap();
    let child = std::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&env.config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    if serving(&url, &env.service, std::time::Duration::from_secs(30)).await {
        return child;
    }
    let log = std::fs::read_to_string(env.dir.path().join(format!("serve-{port}.log")))
        .unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    panic!("server did not come up in 30 s; the end of its log:\n{tail}");
}
