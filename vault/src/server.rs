//! Assembles and runs the gRPC server: the `Vault` and `Ledger` services,
//! gRPC health and reflection, optional TLS, and graceful shutdown.
//!
//! Guarantees: the database and the ledger are opened (their locks taken,
//! the ledger verified against its entries) before the port accepts calls; unfinished key-rotation jobs resume at start; on shutdown
//! in-flight calls finish and the database is flushed.

use std::net::SocketAddr;
use std::sync::Arc;

use sovra_ledger::Ledger;
use sovra_proto::ledger::v1::ledger_server::LedgerServer;
use sovra_proto::vault::v1::vault_server::VaultServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::config::Config;
use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::ledger_service::LedgerService;
use crate::policy::PolicyGate;
use crate::policy_service::PolicyService;
use crate::service::Shared;
use crate::service::VaultService;
use sovra_proto::lineage::v1::lineage_server::LineageServer;
use sovra_proto::policy::v1::policy_server::PolicyServer;
use sovra_proto::sandbox::v1::sandbox_server::SandboxServer;

use crate::lineage_service::LineageService;
use crate::sandbox_service::SandboxService;

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    engine: Arc<Engine>,
    ledger: Arc<Ledger>,
    shutdown: Option<oneshot::Sender<()>>,
    join: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The ledger behind the server.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The lineage recorder the sandbox's release gate records its jobs
    /// through.
    pub fn lineage_recorder(&self) -> crate::lineage::Recorder {
        crate::lineage::Recorder::new(self.engine.clone(), self.ledger.clone())
    }

    /// Stops accepting calls, lets in-flight calls finish, flushes.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops (after [`ServerHandle::shutdown`] or the
    /// `stop` future given to [`start`], or an error), then flushes.
    pub async fn wait(mut self) -> Result<()> {
        let served = (&mut self.join).await;
        self.engine.store().flush()?;
        self.ledger.flush()?;
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(VaultError::storage(format!("server error: {e}"))),
            Err(e) => Err(VaultError::storage(format!("server task failed: {e}"))),
        }
    }
}

/// Starts a server for `cfg`. With `listener` it serves there (tests bind
/// 127.0.0.1:0); otherwise it binds `cfg.listen`. `stop` ends it gracefully.
pub async fn start(
    cfg: &Config,
    listener: Option<TcpListener>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ServerHandle> {
    let schema = cfg.load_schema()?;
    let root = cfg.load_root_key()?;
    let auth = Arc::new(cfg.authenticator()?);
    let data_dir = cfg.resolve(&cfg.data_dir);
    let engine = Arc::new(Engine::open(&data_dir, root, schema)?);
    // Every tenant a principal belongs to has its TFHE keys before the
    // first call (a new tenant's are created here, at its first start).
    if !engine.schema().feature_catalog().is_empty() {
        let tenants: std::collections::BTreeSet<&str> =
            cfg.principals.iter().map(|p| p.tenant.as_str()).collect();
        for t in tenants {
            match engine.ensure_fhe_keys(t) {
                Ok(()) => {}
                // A damaged key fails every feature write and job of that
                // tenant with DATA_LOSS; the rest of the vault still serves.
                Err(e @ VaultError::Integrity(_)) => {
                    tracing::error!(tenant = t, error = %e, "the tenant's TFHE key cannot be read");
                }
                Err(e) => return Err(e),
            }
        }
        engine.store().flush()?;
    }
    let ledger = Arc::new(cfg.open_ledger()?);
    // An invalid policy set refuses to start, naming file, line and problem.
    let policies = cfg.policies()?;
    let gate = Arc::new(
        PolicyGate::start(
            policies,
            cfg.policy_dir(),
            ledger.clone(),
            &engine.store().meta,
        )
        .await?,
    );
    engine.resume_rotations();

    let listener = match listener {
        Some(l) => l,
        None => {
            let addr = cfg.listen_addr().map_err(|_| {
                VaultError::config("listen", format!("`{}` is not an address", cfg.listen))
            })?;
            TcpListener::bind(addr).await.map_err(|e| {
                VaultError::config("listen", format!("cannot listen on {addr}: {e}"))
            })?
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|e| VaultError::config("listen", format!("no local address: {e}")))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<VaultServer<VaultService>>().await;
    health.set_serving::<LedgerServer<LedgerService>>().await;
    health.set_serving::<PolicyServer<PolicyService>>().await;
    health.set_serving::<LineageServer<LineageService>>().await;
    health.set_serving::<SandboxServer<SandboxService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sovra_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| VaultError::config("reflection", e.to_string()))?;

    let shared = Shared {
        engine: engine.clone(),
        auth,
        ledger: ledger.clone(),
        gate: gate.clone(),
    };
    let vault = VaultServer::new(VaultService::new(shared.clone()))
        .max_decoding_message_size(cfg.max_request_bytes)
        .max_encoding_message_size(64 * 1024 * 1024);
    let ledger_svc = LedgerServer::new(LedgerService::new(shared.clone()))
        .max_decoding_message_size(cfg.max_request_bytes)
        .max_encoding_message_size(256 * 1024 * 1024);
    let lineage_svc = LineageServer::new(LineageService::new(shared.clone()))
        .max_decoding_message_size(cfg.max_request_bytes)
        .max_encoding_message_size(64 * 1024 * 1024);
    let sandbox_svc = SandboxServer::new(SandboxService::new(shared.clone()))
        .max_decoding_message_size(cfg.max_request_bytes)
        .max_encoding_message_size(64 * 1024 * 1024);
    let policy_svc = PolicyServer::new(PolicyService::new(shared))
        .max_decoding_message_size(cfg.max_request_bytes);
    // SIGHUP reloads the policy directory, as ReloadPolicies does.
    #[cfg(unix)]
    {
        // Weak references: the watcher must not keep the database and the
        // ledger open after the server stops.
        let gate = Arc::downgrade(&gate);
        let engine = Arc::downgrade(&engine);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| VaultError::config("signals", format!("cannot watch SIGHUP: {e}")))?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let (Some(gate), Some(engine)) = (gate.upgrade(), engine.upgrade()) else {
                    return;
                };
                match gate.reload("sighup", &engine.store().meta).await {
                    Ok(r) => {
                        tracing::info!(changed = r.changed, policy_sha256 = %r.active.policies.sha256_hex(), "SIGHUP: policies reloaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: policy reload refused; the previous set stays in force")
                    }
                }
            }
        });
    }

    let mut builder = Server::builder();
    if let Some(tls) = &cfg.tls {
        let cert_path = cfg.resolve(&tls.cert_file);
        let key_path = cfg.resolve(&tls.key_file);
        let cert = std::fs::read(&cert_path).map_err(|e| {
            VaultError::config(
                cert_path.display().to_string(),
                format!("cannot read TLS certificate: {e}"),
            )
        })?;
        let key = std::fs::read(&key_path).map_err(|e| {
            VaultError::config(
                key_path.display().to_string(),
                format!("cannot read TLS key: {e}"),
            )
        })?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| {
                VaultError::config("tls", format!("invalid TLS certificate or key: {e}"))
            })?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(vault)
        .add_service(ledger_svc)
        .add_service(policy_svc)
        .add_service(lineage_svc)
        .add_service(sandbox_svc);

    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(router.serve_with_incoming_shutdown(
        // Small request/response pairs: Nagle's algorithm would only add latency.
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        async move {
            tokio::select! {
                _ = rx => {},
                () = stop => {},
            }
        },
    ));
    tracing::info!(%addr, tls = cfg.tls.is_some(), data_dir = %data_dir.display(), "sovra vault serving");
    Ok(ServerHandle {
        addr,
        engine,
        ledger,
        shutdown: Some(tx),
        join,
    })
}
