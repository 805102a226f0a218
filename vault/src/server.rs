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

use crate::access::policy::PolicyHolder;
use crate::app::{recovery, App};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::grpc::admit::AdmitLayer;
use crate::grpc::ledger::LedgerService;
use crate::grpc::policy::PolicyService;
use crate::grpc::vault::VaultService;
use sovra_proto::contracts::v1::contracts_server::ContractsServer;
use sovra_proto::lineage::v1::lineage_server::LineageServer;
use sovra_proto::policy::v1::policy_server::PolicyServer;
use sovra_proto::sandbox::v1::sandbox_server::SandboxServer;

use crate::grpc::contracts::ContractsService;
use crate::grpc::lineage::LineageService;
use crate::grpc::sandbox::SandboxService;

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
    views: Option<ViewTask>,
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
    pub fn lineage_recorder(&self) -> crate::jobs::record::Recorder {
        crate::jobs::record::Recorder::new(self.engine.clone(), self.ledger.clone())
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
        // INVARIANT: the periodic flush has finished (it holds the engine
        // and the ledger while it runs), so once this returns and the
        // handle is dropped, nothing of the server holds the data
        // directory.
        if let Some(v) = self.views.take() {
            v.finish().await;
        }
        // A clean stop folds pending feature values into their blocks, so
        // the next start has nothing left to pack.
        if !self.engine.schema().feature_catalog().is_empty() {
            let engine = self.engine.clone();
            match tokio::task::spawn_blocking(move || engine.pack_features(None, None)).await {
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot pack pending feature writes at shutdown")
                }
                Err(e) => tracing::error!(error = %e, "the shutdown packing task failed"),
                Ok(Ok(_)) => {}
            }
        }
        flush_views(&self.engine, &self.ledger)?;
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
    cfg.limits.validate()?;
    check_admission(cfg)?;
    let (app, views) = open(cfg).await?;
    // The contract runtime: the outbox reconciled with the ledger, then
    // its loop (inbox and timers).
    let runtime = crate::contracts::runtime::Runtime::new(app.clone());
    let open_actions = runtime.start()?;
    if open_actions > 0 {
        tracing::info!(open_actions, "contract outbox loaded");
    }
    runtime.spawn();
    let listener = bind(cfg, listener).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| VaultError::config("listen", format!("no local address: {e}")))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<VaultServer<VaultService>>().await;
    health.set_serving::<LedgerServer<LedgerService>>().await;
    health.set_serving::<PolicyServer<PolicyService>>().await;
    health.set_serving::<LineageServer<LineageService>>().await;
    health.set_serving::<SandboxServer<SandboxService>>().await;
    health
        .set_serving::<ContractsServer<ContractsService>>()
        .await;
    // Reflection in both versions: grpcurl and most tools speak v1,
    // grpcio's reflection client only v1alpha. Both list the health service.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sovra_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| VaultError::config("reflection", e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| VaultError::config("reflection", e.to_string()))?;

    let max_in = cfg.max_request_bytes;
    let router = transport(cfg)?
        // Limits first (outermost), then authentication: a call over its
        // principal's allowance costs no token check.
        .layer(call_limits(cfg))
        .layer(AdmitLayer(app.auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            VaultServer::new(VaultService::new(app.clone()))
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(
            LedgerServer::new(LedgerService::new(app.clone()))
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(256 * 1024 * 1024),
        )
        .add_service(
            PolicyServer::new(PolicyService::new(app.clone())).max_decoding_message_size(max_in),
        )
        .add_service(
            LineageServer::new(LineageService::new(app.clone()))
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(
            SandboxServer::new(SandboxService::with_admission(app.clone(), cfg.sandbox))
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(
            ContractsServer::new(ContractsService::new(
                crate::contracts::Registry::new(app.clone(), runtime.clone()),
                runtime.clone(),
            ))
            .max_decoding_message_size(max_in)
            .max_encoding_message_size(64 * 1024 * 1024),
        );

    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(router.serve_with_incoming_shutdown(
        // Connection limit, handshake timeout, no Nagle (see net.rs).
        crate::grpc::net::incoming(listener, &cfg.limits, cfg.tls.is_some()),
        {
            let runtime = runtime.clone();
            async move {
                tokio::select! {
                    _ = rx => {},
                    () = stop => {},
                }
                runtime.close();
            }
        },
    ));
    tracing::info!(%addr, tls = cfg.tls.is_some(), data_dir = %cfg.resolve(&cfg.data_dir).display(), "sovra vault serving");
    Ok(ServerHandle {
        addr,
        engine: app.engine,
        ledger: app.ledger,
        shutdown: Some(tx),
        join,
        views: Some(views),
    })
}

/// Opens everything the use cases share, in order: the ledger, then the
/// engine (refused if its database was lost beside a used ledger), every
/// tenant's TFHE keys, the policy set in force; then resumes unfinished key
/// rotations and starts the background sweeps and the SIGHUP watcher.
async fn open(cfg: &Config) -> Result<(App, ViewTask)> {
    let schema = cfg.load_schema()?;
    let root = cfg.load_root_key()?;
    let auth = Arc::new(cfg.authenticator()?);
    // The ledger first: a vault database with no trace of its
    // initialisation beside a ledger that has recorded its use was lost,
    // truncated or replaced, and is refused before anything is written to
    // it, never taken as an empty vault.
    let wal = cfg.open_wal()?;
    let ledger = Arc::new(cfg.open_ledger(wal.clone())?);
    let data_dir = cfg.resolve(&cfg.data_dir);
    let pads = cfg.pad_place()?;
    let engine = Arc::new(Engine::open_with(
        &data_dir,
        root,
        schema,
        wal,
        &pads,
        || {
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
        },
    )?);
    // Before anything reads or writes: faults refuse here, naming the file;
    // erasures the ledger records are completed or applied again.
    recovery::reconcile(&engine, &ledger, &data_dir, &data_dir.join("ledger"))?;
    // A contract record that disagrees with its pin or its ledger entries
    // refuses here; one the ledger disabled is disabled again.
    let contracts = crate::contracts::check(&engine, &ledger)?;
    if contracts > 0 {
        tracing::info!(contracts, "contract registry checked against the ledger");
    }
    // Both views are current: from here, damage to the log below this
    // point is never taken for a torn tail.
    flush_views(&engine, &ledger)?;
    crate::files::make_private_dir(&data_dir)?;
    ensure_tenant_keys(cfg, &engine)?;
    // An invalid policy set refuses to start, naming file, line and problem.
    let policies = Arc::new(
        PolicyHolder::start(
            cfg.policies()?,
            cfg.policy_dir(),
            ledger.clone(),
            &engine.store().meta,
            engine.store().wal().is_postgres(),
        )
        .await?,
    );
    engine.resume_rotations();
    spawn_sweeper(&engine);
    let views = spawn_anchor(&engine, &ledger);
    spawn_packer(&engine);
    watch_sighup(&policies, &engine)?;
    let app = App {
        engine,
        auth,
        ledger,
        policies,
        operator_tenant: Arc::from(cfg.policy.operator_tenant.as_str()),
    };
    Ok((app, views))
}

/// Every tenant a principal belongs to has its TFHE keys before the first
/// call (a new tenant's are created here, at its first start).
fn ensure_tenant_keys(cfg: &Config, engine: &Engine) -> Result<()> {
    if engine.schema().feature_catalog().is_empty() {
        return Ok(());
    }
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
    engine.store().flush()
}

/// Idempotency records answer retries for a day, then go: at start and
/// hourly (a weak reference, so the task does not keep the engine).
fn spawn_sweeper(engine: &Arc<Engine>) {
    sweep_idempotency(engine);
    let engine = Arc::downgrade(engine);
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

/// Every second, records the ledger's durable position in the vault (the
/// anchor start-up checks the ledger against; see `app::recovery`); every
/// few seconds, flushes both views of the write-ahead log, records the
/// floor they reached and deletes the log segments neither needs.
fn spawn_anchor(engine: &Arc<Engine>, ledger: &Arc<Ledger>) -> ViewTask {
    let (engine, ledger) = (Arc::downgrade(engine), Arc::downgrade(ledger));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let join = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let mut tick = 0u64;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stopped.changed() => return,
            }
            tick += 1;
            let (Some(engine), Some(ledger)) = (engine.upgrade(), ledger.upgrade()) else {
                return;
            };
            if let Err(e) = recovery::record_anchor(&engine, &ledger) {
                tracing::error!(error = %e, "cannot record the ledger anchor");
            }
            if tick % VIEW_FLUSH_TICKS == 0 {
                let r = tokio::task::spawn_blocking(move || flush_views(&engine, &ledger)).await;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot flush the views of the write-ahead log")
                    }
                    Err(e) => tracing::error!(error = %e, "the view flush task failed"),
                }
            }
        }
    });
    ViewTask { stop, join }
}

/// The anchor and view-flush task.
#[derive(Debug)]
struct ViewTask {
    stop: tokio::sync::watch::Sender<bool>,
    join: JoinHandle<()>,
}

impl ViewTask {
    /// Stops the task and waits until a flush it was running has finished.
    async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.join.await;
    }
}

/// Seconds between two flushes of the views.
const VIEW_FLUSH_TICKS: u64 = 2;

/// Flushes the vault's and the ledger's views; the log below the lower of
/// their positions is no longer needed.
fn flush_views(engine: &Engine, ledger: &Ledger) -> Result<()> {
    let vault = engine.store().flush_view()?;
    let entries = ledger.flush_view()?;
    let floor = vault.min(entries);
    let wal = engine.store().wal();
    wal.record_floor(floor)?;
    let retired = wal.retire_below(floor)?;
    if retired > 0 {
        tracing::debug!(retired, floor, "write-ahead log segments retired");
    }
    Ok(())
}

/// Folds pending feature writes into their encrypted blocks in the
/// background (a job also does before it reads them): every 250 ms, off the
/// request path, one fresh encryption per block and feature whatever the
/// number of writes.
fn spawn_packer(engine: &Arc<Engine>) {
    if engine.schema().feature_catalog().is_empty() {
        return;
    }
    let engine = Arc::downgrade(engine);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A damaged block fails every round: said once, until it changes.
        let mut last = String::new();
        loop {
            every.tick().await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let r = tokio::task::spawn_blocking(move || engine.pack_features(None, None)).await;
            match r {
                Ok(Err(e)) if e.to_string() != last => {
                    last = e.to_string();
                    tracing::error!(error = %e, "cannot pack pending feature writes; jobs on that feature fail until it is repaired");
                }
                Ok(Ok(_)) => last.clear(),
                _ => {}
            }
        }
    });
}

/// SIGHUP reloads the policy directory, as ReloadPolicies does.
fn watch_sighup(policies: &Arc<PolicyHolder>, engine: &Arc<Engine>) -> Result<()> {
    #[cfg(unix)]
    {
        // Weak references: the watcher must not keep the database and the
        // ledger open after the server stops.
        let policies = Arc::downgrade(policies);
        let engine = Arc::downgrade(engine);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| VaultError::config("signals", format!("cannot watch SIGHUP: {e}")))?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let (Some(policies), Some(engine)) = (policies.upgrade(), engine.upgrade()) else {
                    return;
                };
                match policies.reload("sighup", &engine.store().meta).await {
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
    #[cfg(not(unix))]
    let _ = (policies, engine);
    Ok(())
}

/// The listener: the one given, or `cfg.listen` bound.
async fn bind(cfg: &Config, listener: Option<TcpListener>) -> Result<TcpListener> {
    if let Some(l) = listener {
        return Ok(l);
    }
    let addr = cfg
        .listen_addr()
        .map_err(|_| VaultError::config("listen", format!("`{}` is not an address", cfg.listen)))?;
    TcpListener::bind(addr)
        .await
        .map_err(|e| VaultError::config("listen", format!("cannot listen on {addr}: {e}")))
}

/// A sandbox that could admit no job is a configuration mistake.
fn check_admission(cfg: &Config) -> Result<()> {
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
    Ok(())
}

/// Each principal's allowance of calls in progress.
fn call_limits(cfg: &Config) -> crate::grpc::net::CallLimitLayer {
    let tokens = cfg.principals.iter().filter_map(|p| {
        let mut h = [0u8; 32];
        hex::decode_to_slice(&p.token_sha256, &mut h)
            .ok()
            .map(|()| h)
    });
    AdmitLayer(Arc::new(crate::grpc::net::CallLimits::new(
        tokens,
        &cfg.limits,
    )))
}

/// HTTP/2 settings and TLS.
fn transport(cfg: &Config) -> Result<Server> {
    let limits = &cfg.limits;
    let builder = Server::builder()
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
    let Some(tls) = &cfg.tls else {
        return Ok(builder);
    };
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).map_err(|e| {
            VaultError::config(
                p.display().to_string(),
                format!("cannot read TLS {what}: {e}"),
            )
        })
    };
    let cert = read(&cfg.resolve(&tls.cert_file), "certificate")?;
    let key = read(&cfg.resolve(&tls.key_file), "key")?;
    builder
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .map_err(|e| VaultError::config("tls", format!("invalid TLS certificate or key: {e}")))
}
