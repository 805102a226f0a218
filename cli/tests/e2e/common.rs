use std::path::{Path, PathBuf};

use sovra_proto::vault::v1 as pb;
use sovra_vault::access::auth::Role;
use sovra_vault::client::{self, Client};
use sovra_vault::config::{self, Config};
use sovra_vault::server::{self, ServerHandle};

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

/// An initialised data directory with one principal per role.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub service: String,
    pub officer: String,
    pub partner: String,
    pub admin: String,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let init = config::init(dir.path(), "127.0.0.1:0").unwrap();
        let mut cfg = Config::load(&init.config_path).unwrap();
        let service = cfg
            .add_principal_with("svc", Role::Service, "default", "sales", SERVICE_PURPOSES)
            .unwrap();
        let officer = cfg
            .add_principal_with("dpo", Role::Officer, "default", "compliance", &[])
            .unwrap();
        let partner = cfg
            .add_principal_with(
                "partner",
                Role::Partner,
                "default",
                "partners",
                &["lead_scoring"],
            )
            .unwrap();
        config::write_config(&cfg, &init.config_path).unwrap();
        Env {
            config_path: init.config_path,
            service: service.token.to_string(),
            officer: officer.token.to_string(),
            partner: partner.token.to_string(),
            admin: init.admin_token.token.to_string(),
            dir,
        }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn start(&self) -> Running {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = server::start(&self.config(), Some(l), std::future::pending())
            .await
            .unwrap();
        let url = format!("http://{}", handle.addr());
        Running { handle, url }
    }
}

pub struct Running {
    pub handle: ServerHandle,
    pub url: String,
}

impl Running {
    pub async fn client(&self, token: Option<&str>) -> Client {
        client::connect(&self.url, token, None).await.unwrap()
    }
    pub async fn stop(self) {
        self.handle.shutdown().await.unwrap();
    }
}

pub fn text(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Text(s.into())),
    }
}
pub fn int(i: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Integer(i)),
    }
}

pub fn source() -> Option<pb::CollectionSource> {
    Some(pb::CollectionSource {
        channel: "web_form".into(),
        collector: "test".into(),
        consent_ref: "consent-1".into(),
    })
}

pub fn put(customer: &str, fields: &[(&str, pb::Value)]) -> pb::PutRecordRequest {
    pb::PutRecordRequest {
        idempotency_key: String::new(),
        customer_id: customer.into(),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        source: source(),
    }
}

pub fn get(customer: &str, fields: &[&str], purpose: &str) -> pb::GetFieldsRequest {
    pb::GetFieldsRequest {
        customer_id: customer.into(),
        fields: fields.iter().map(|s| (*s).to_owned()).collect(),
        purpose: purpose.into(),
    }
}

pub fn revealed(r: &pb::FieldReading) -> Option<&pb::value::Kind> {
    match &r.disclosure {
        Some(pb::field_reading::Disclosure::Revealed(v)) => v.kind.as_ref(),
        _ => None,
    }
}

pub fn masked(r: &pb::FieldReading) -> Option<&str> {
    match &r.disclosure {
        Some(pb::field_reading::Disclosure::Masked(m)) => Some(m),
        _ => None,
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` occurs in any file under `dir`.
pub fn occurs_in(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|p| {
        let bytes = std::fs::read(p).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

/// Opens the raw sled database of a stopped server, waiting for the lock.
pub fn open_raw(dir: &Path) -> sled::Db {
    for _ in 0..100 {
        if let Ok(db) = sled::open(dir) {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("cannot open {}", dir.display());
}

/// `tenant 0 customer 0 field`, the record layout documented in store.rs.
pub fn record_key(customer: &str, field: &str) -> Vec<u8> {
    format!("default\0{customer}\0{field}").into_bytes()
}

pub const SOVRA: &str = env!("CARGO_BIN_EXE_sovra");

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
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
}

/// Starts `sovra serve` as a real process and waits until it answers. The
/// caller kills and waits for it.
#[allow(clippy::zombie_processes)]
pub async fn spawn_server(env: &Env, port: u16) -> std::process::Child {
    set_listen(env, port);
    let log = std::fs::File::create(env.dir.path().join(format!("serve-{port}.log"))).unwrap();
    let child = std::process::Command::new(SOVRA)
        .args(["serve", "--config"])
        .arg(&env.config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(mut c) = sovra_vault::client::connect(&url, Some(&env.service), None).await {
            if c.describe_schema(sovra_proto::vault::v1::DescribeSchemaRequest {})
                .await
                .is_ok()
            {
                return child;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "server did not come up; log in {}",
        env.dir.path().display()
    );
}

pub fn search_req(field: &str, value: &str, limit: u32) -> pb::SearchRequest {
    pb::SearchRequest {
        field: field.into(),
        value: Some(text(value)),
        limit,
        purpose: "customer_service".into(),
    }
}

/// Polls the key status until the rotation job is done.
pub async fn wait_rotation(adm: &mut Client) -> pb::KeyStatus {
    for _ in 0..3000 {
        let s = adm
            .get_key_status(pb::GetKeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.job.as_ref().is_some_and(|j| j.done) {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("rotation did not finish");
}
