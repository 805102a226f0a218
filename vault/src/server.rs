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
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
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

fn sweep_idempotency(engine: &Engine) {
    match engine.sweep_idempotency() {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "expired idempotency records removed"),
        Err(e) => tracing::error!(error = %e, "cannot sweep idempotency records"),
    }
}

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
    // Whatever umask the server was started with, what it creates is
    // private; what it trusts must not be writable by anyone else.
    crate::files::private_umask();
    cfg.refuse_shared_writes()?;
    let schema = cfg.load_schema()?;
    let root = cfg.load_root_key()?;
    let auth = Arc::new(cfg.authenticator()?);
    let data_dir = cfg.resolve(&cfg.data_dir);
    // The ledger first: a vault database with no trace of its
    // initialisation beside a ledger that has recorded its use was lost,
    // truncated or replaced, and is refused before anything is written to
    // it, never taken as an empty vault.
    let ledger = Arc::new(cfg.open_ledger()?);
    let engine = Arc::new(Engine::open_with(&data_dir, root, schema, || {
        match ledger.size() {
            0 => Ok(()),
            n => Err(VaultError::config(
                data_dir.display().to_string(),
                format!(
                    "the vault database holds no root key check value and no data keys, but the ledger has {n} entries: \
                     the database was lost, truncated or replaced; restore it from a backup"
                ),
            )),
        }
    })?);
    crate::files::make_private_dir(&data_dir)?;
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
    // Idempotency records answer retries for a day, then go: at start and
    // hourly (a weak reference, so the task does not keep the engine).
    sweep_idempotency(&engine);
    {
        let engine = Arc::downgrade(&engine);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            every.tick().await;
            loop {
                every.tick().await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let _ = tokio::task::spawn_blocking(move || sweep_idempotency(&engine)).await;
            }
        });
    }

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
        operator_tenant: Arc::from(cfg.policy.operator_tenant.as_str()),
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
    let a = cfg.sandbox;
    if a.max_running == 0
        || a.eval_threads == 0
        || a.max_queued == 0
        || a.max_jobs_per_principal == 0
    {
        return Err(VaultError::config(
            "sandbox",
            "max_running, eval_threads, max_queued and max_jobs_per_principal must each be at least 1",
        ));
    }
    let sandbox_svc = SandboxServer::new(SandboxService::with_admission(shared.clone(), a))
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

    let limits = &cfg.limits;
    limits.validate()?;
    let tokens = cfg.principals.iter().filter_map(|p| {
        let mut h = [0u8; 32];
        hex::decode_to_slice(&p.token_sha256, &mut h)
            .ok()
            .map(|()| h)
    });
    let calls = crate::net::CallLimitLayer(Arc::new(crate::net::CallLimits::new(tokens, limits)));
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_millis(limits.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        // Receive windows: a stream may have 256 KiB unread, a connection
        // 4 MiB. h2 closes a connection whose unread small DATA frames
        // exceed half the connection window in overhead (256 bytes a
        // frame at most); 256 KiB of 35-byte frames stay below it, so a
        // stalled stream is held back by flow control, not cut off.
        .initial_stream_window_size(Some(256 * 1024))
        .initial_connection_window_size(Some(4 * 1024 * 1024));
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
        .layer(calls)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(vault)
        .add_service(ledger_svc)
        .add_service(policy_svc)
        .add_service(lineage_svc)
        .add_service(sandbox_svc);

    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(router.serve_with_incoming_shutdown(
        // Connection limit, handshake timeout, no Nagle (see net.rs).
        crate::net::incoming(listener, limits, cfg.tls.is_some()),
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
