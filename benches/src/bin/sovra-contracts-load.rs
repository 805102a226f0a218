//! `sovra-contracts-load`: event to action on the outbox, open loop. Sends
//! `poc_report_signed` signals at a fixed rate (each about another
//! customer), while one connector watches the outbox and (by default)
//! completes every action it is sent, and reports the latency from each
//! signal's send to the first delivery of its instance's actions on the
//! connector's `WatchActions` stream: percentiles, the rate reached and
//! the outbox left.
//!
//!   sovra-contracts-load --embedded --rate 1000 --seconds 10
//!   sovra-contracts-load --server URL --token SERVICE --admin-token ADMIN

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use sovra_proto::contracts::v1 as cpb;
use sovra_vault::client;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Server URL (ignored with --embedded).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// A `service` token: it signals and is the connector.
    #[arg(long, env = "SOVRA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// An `admin` token, to register the POC contract (skipped when absent).
    #[arg(long, env = "SOVRA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Start an embedded server in this process instead.
    #[arg(long)]
    embedded: bool,
    /// Signals per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds to send (after one second of warm-up at the same rate).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Customers signalled about, round robin.
    #[arg(long, default_value_t = 500)]
    customers: usize,
    /// Connections the signals are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Only watch: do not complete the actions delivered.
    #[arg(long)]
    no_complete: bool,
}

type Sent = Arc<Mutex<HashMap<u64, Instant>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.rate == 0 || args.rate > 100_000 || args.seconds == 0 || args.seconds > 600 {
        return Err("--rate must be 1..=100000 and --seconds 1..=600".into());
    }
    if args.connections == 0 || args.connections > 256 || args.customers == 0 {
        return Err("--connections must be 1..=256 and --customers at least 1".into());
    }
    let embedded = if args.embedded {
        Some(sovra_benches::embedded().await?)
    } else {
        None
    };
    let (url, token, admin) = match &embedded {
        Some(e) => (
            e.url.clone(),
            e.service_token.clone(),
            Some(e.admin_token.clone()),
        ),
        None => (
            args.server.clone(),
            args.token
                .clone()
                .ok_or("--token or SOVRA_TOKEN is required")?,
            args.admin_token.clone(),
        ),
    };
    setup(&url, &token, admin.as_deref(), args.customers).await?;

    // The connector: first delivery per instance, then complete.
    let delivered: Sent = Arc::default();
    let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let connector = {
        let (url, token, delivered, completed) = (
            url.clone(),
            token.clone(),
            delivered.clone(),
            completed.clone(),
        );
        let complete = !args.no_complete;
        tokio::spawn(async move { connect(url, token, delivered, completed, complete).await })
    };

    let sent: Sent = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let measured_ids = Arc::new(Mutex::new(Vec::new()));
    let (total, sending) = send(&args, &url, &token, &sent, &errors, &measured_ids).await?;
    let mut measured: Vec<u64> = Vec::new();
    // Let the last deliveries arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut missing = 0;
    {
        let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
        let delivered = delivered.lock().unwrap_or_else(|e| e.into_inner());
        for id in measured_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            match (sent.get(id), delivered.get(id)) {
                (Some(s), Some(d)) => {
                    let us = d.saturating_duration_since(*s).as_micros();
                    h.record(u64::try_from(us).unwrap_or(u64::MAX).max(1))?;
                    measured.push(*id);
                }
                _ => missing += 1,
            }
        }
    }
    connector.abort();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "signals {} in {:.2} s ({:.0}/s offered {}/s), errors {}, measured {} (after 1 s warm-up), no delivery {}",
        total,
        sending.as_secs_f64(),
        total as f64 / sending.as_secs_f64(),
        args.rate,
        errors.load(std::sync::atomic::Ordering::Relaxed),
        measured.len(),
        missing
    );
    println!(
        "event to action on the outbox (ms): p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
    println!(
        "actions completed by the connector: {}",
        completed.load(std::sync::atomic::Ordering::Relaxed)
    );
    if let Some(e) = embedded {
        e.handle.shutdown().await?;
    }
    Ok(())
}

/// Sends the signals, open loop, at `--rate` for one second of warm-up and
/// `--seconds`; returns how many were sent and how long sending took.
async fn send(
    args: &Args,
    url: &str,
    token: &str,
    sent: &Sent,
    errors: &Arc<std::sync::atomic::AtomicU64>,
    measured_ids: &Arc<Mutex<Vec<u64>>>,
) -> Result<(u64, Duration), Box<dyn std::error::Error>> {
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(client::connect_contracts(url, Some(token), None).await?);
    }
    let total = u64::from(args.rate) * (args.seconds + 1);
    let warmup = u64::from(args.rate);
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        // Open loop: each signal leaves at its time, whatever the replies.
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let mut c = clients[(i as usize) % clients.len()].clone();
        let (sent, errors, ids) = (sent.clone(), errors.clone(), measured_ids.clone());
        let customer = format!("load-{}", (i as usize) % args.customers);
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            match c
                .signal(cpb::SignalRequest {
                    name: "poc_report_signed".into(),
                    customer_id: customer,
                    contract: "poc-activation".into(),
                    idempotency_key: String::new(),
                    attrs: Default::default(),
                })
                .await
            {
                Ok(r) => {
                    if let Some(inst) = r.into_inner().instances.first() {
                        sent.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(inst.id, at);
                        if i >= warmup {
                            ids.lock().unwrap_or_else(|e| e.into_inner()).push(inst.id);
                        }
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok((total, start.elapsed()))
}

/// Registers the POC contract (when an admin token is given) and stores
/// the customers signalled about.
async fn setup(
    url: &str,
    token: &str,
    admin: Option<&str>,
    customers: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(admin) = admin {
        let poc = sovra_contracts::crm::CONTRACTS
            .iter()
            .find(|c| c.file == "poc-activation.toml")
            .ok_or("the POC contract is not shipped")?;
        let mut a = client::connect_contracts(url, Some(admin), None).await?;
        a.register_contract(cpb::RegisterContractRequest {
            manifest: poc.manifest.into(),
            guest: Vec::new(),
            file_name: poc.file.into(),
        })
        .await?;
    }
    eprintln!("storing {customers} customers…");
    let mut c = client::connect(url, Some(token), None).await?;
    let reqs: Vec<_> = (0..customers)
        .map(|i| sovra_proto::vault::v1::PutRecordRequest {
            customer_id: format!("load-{i}"),
            fields: [(
                "email".to_owned(),
                sovra_proto::vault::v1::Value {
                    kind: Some(sovra_proto::vault::v1::value::Kind::Text(format!(
                        "load{i}@example.com"
                    ))),
                },
            )]
            .into(),
            source: Some(sovra_proto::vault::v1::CollectionSource {
                channel: "load".into(),
                collector: "sovra-contracts-load".into(),
                consent_ref: String::new(),
            }),
            ..Default::default()
        })
        .collect();
    let mut s = c.batch_put(tokio_stream::iter(reqs)).await?.into_inner();
    while let Some(r) = s.message().await? {
        if r.code != 0 {
            return Err(format!("storing customers failed: {}", r.message).into());
        }
    }
    Ok(())
}

/// The connector: records the first delivery of each instance; completes
/// each action when asked to.
async fn connect(
    url: String,
    token: String,
    delivered: Sent,
    completed: Arc<std::sync::atomic::AtomicU64>,
    complete: bool,
) -> Result<(), String> {
    let mut c = client::connect_contracts(&url, Some(&token), None)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = c
        .watch_actions(cpb::WatchActionsRequest {
            lease_seconds: 600,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    while let Ok(Some(d)) = s.message().await {
        let now = Instant::now();
        let Some(a) = d.action else { continue };
        delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(a.instance)
            .or_insert(now);
        if complete {
            let mut c = c.clone();
            let completed = completed.clone();
            tokio::spawn(async move {
                if c.complete_action(cpb::CompleteActionRequest { handle: a.handle })
                    .await
                    .is_ok()
                {
                    completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    }
    Ok(())
}
