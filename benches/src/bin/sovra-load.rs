//! `sovra-load`: drives a real Sovra server with N concurrent clients, each
//! on its own connection, and reports throughput and latency percentiles.
//!
//! Against a running server:
//!   sovra-load --server http://127.0.0.1:50051 --token $SOVRA_TOKEN --mode read
//! Or against an embedded server in this process:
//!   sovra-load --embedded --mode write
//! With heavy sandbox jobs submitted by partners before measuring (they
//! queue behind the admission limits and run while the clients measure):
//!   sovra-load --embedded --mode read --sandbox-jobs 24

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::client;
use sovra_vault::synthetic;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Mode {
    /// GetFields of one field of a random preloaded customer.
    Read,
    /// PutRecord of one field of a new customer (durable before the reply):
    /// `purchase_count`, an encrypted model feature.
    Write,
    /// The same with a plain field (`last_contact_ms`, no feature): beside
    /// `write`, what a feature field costs.
    WritePlain,
    /// PutRecord of a whole 11-field record of a new customer.
    WriteRecord,
    /// RecordConsent (grant) for a random preloaded customer: one durable
    /// ledger append, a signed checkpoint and a receipt per call.
    Consent,
    /// BatchPut of `BATCH` whole 11-field records of new customers per
    /// call, as the demo loads them; the report adds records/s.
    BatchPut,
    /// DescribeSchema: authenticated and policy-checked like every call,
    /// but it reads one in-memory schema and writes nothing (no audit
    /// entry, no lineage, no sync). Beside `read`, the floor that the
    /// transport, authentication and one Cedar decision set on this
    /// machine with the load generator on the same cores.
    Describe,
}

/// Records per BatchPut stream in `--mode batch-put` (the demo's batch).
const BATCH: usize = 100;

#[derive(Parser)]
struct Args {
    /// Server URL (ignored with --embedded).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// A `service` token (ignored with --embedded).
    #[arg(long, env = "SOVRA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Start an embedded server in this process instead.
    #[arg(long)]
    embedded: bool,
    /// What to measure.
    #[arg(long, value_enum, default_value = "read")]
    mode: Mode,
    /// Concurrent clients, one connection each.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds to measure (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Customers to preload for reads.
    #[arg(long, default_value_t = 10_000)]
    preload: usize,
    /// Heavy sandbox jobs (16-edge histograms, 80 bootstraps per customer)
    /// to submit before measuring, spread over the embedded server's six
    /// partners (--embedded only).
    #[arg(long, default_value_t = 0)]
    sandbox_jobs: usize,
    /// Customers given `lead_scoring` consent, the heavy jobs' cohort.
    #[arg(long, default_value_t = 200)]
    sandbox_cohort: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Against a separate server the clients share one thread, as a wrk
    // thread's connections share its event loop: no wake-ups cross threads,
    // so the generator takes as little of the server's cores as it can.
    // The embedded server needs the cores itself.
    let rt = if args.embedded {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.clients == 0 || args.clients > 1024 || args.seconds == 0 || args.seconds > 600 {
        return Err("--clients must be 1..=1024 and --seconds 1..=600".into());
    }
    let target = Target::new(&args).await?;
    let (url, token) = (&target.url, &target.token);
    let run_id = std::process::id();

    let people = Arc::new(synthetic::generate(u64::from(run_id), args.preload.max(1)));
    if matches!(args.mode, Mode::Read | Mode::Consent) {
        preload(url, token, &people, run_id).await?;
    }

    if args.sandbox_jobs > 0 {
        if target.partners.is_empty() {
            return Err("--sandbox-jobs needs --embedded (it uses the embedded partners)".into());
        }
        submit_heavy_jobs(url, token, &target.partners, &people, run_id, &args).await?;
    }

    let (all, errors) = measure(url, token, &people, run_id, &args).await?;
    report(&args, &all, errors);
    if let Some(e) = target.embedded {
        e.handle.shutdown().await?;
    }
    Ok(())
}

/// The server the clients call, and the tokens they call it with.
struct Target {
    /// The embedded server, kept running until the end (None with
    /// `--server`).
    embedded: Option<sovra_benches::Embedded>,
    /// The embedded server's partner tokens (none with `--server`).
    partners: Vec<String>,
    url: String,
    token: String,
}

impl Target {
    /// Starts the embedded server, or takes `--server` and `--token`.
    async fn new(args: &Args) -> Result<Target, Box<dyn std::error::Error>> {
        if args.embedded {
            let e = sovra_benches::embedded().await?;
            Ok(Target {
                url: e.url.clone(),
                token: e.service_token.clone(),
                partners: e.partner_tokens.clone(),
                embedded: Some(e),
            })
        } else {
            Ok(Target {
                url: args.server.clone(),
                token: args
                    .token
                    .clone()
                    .ok_or("--token or SOVRA_TOKEN is required")?,
                partners: Vec::new(),
                embedded: None,
            })
        }
    }
}

/// Stores every customer of `people` (as `ID-RUN_ID`) for the modes that
/// read or consent.
async fn preload(
    url: &str,
    token: &str,
    people: &[synthetic::Customer],
    run_id: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("preloading {} customers…", people.len());
    let mut c = client::connect(url, Some(token), None).await?;
    let reqs: Vec<_> = people
        .iter()
        .map(|p| {
            let mut r = p.to_request("load");
            r.customer_id = format!("{}-{run_id}", p.id);
            r
        })
        .collect();
    let mut s = c.batch_put(tokio_stream::iter(reqs)).await?.into_inner();
    while let Some(r) = s.message().await? {
        if r.code != 0 {
            return Err(format!("preload failed: {}", r.message).into());
        }
    }
    Ok(())
}

/// Runs `--clients` clients for one second of warm-up and `--seconds` of
/// measurement; returns their latencies together and their errors.
async fn measure(
    url: &str,
    token: &str,
    people: &Arc<Vec<synthetic::Customer>>,
    run_id: u32,
    args: &Args,
) -> Result<(Histogram<u64>, u64), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let warmup = Duration::from_secs(1);
    let end = warmup + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for w in 0..args.clients {
        let url = url.to_owned();
        let token = token.to_owned();
        let people = people.clone();
        let mode = args.mode;
        tasks.push(tokio::spawn(async move {
            let mut c = client::connect(&url, Some(&token), None).await?;
            let mut l = client::connect_ledger(&url, Some(&token), None).await?;
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0u64;
            let mut i = 0usize;
            loop {
                let elapsed = start.elapsed();
                if elapsed >= end {
                    break;
                }
                let t = Instant::now();
                let ok = call(mode, &mut c, &mut l, &people, run_id, w, i).await;
                i += 1;
                if elapsed >= warmup {
                    if ok {
                        h.record(t.elapsed().as_micros().max(1) as u64)?;
                    } else {
                        errors += 1;
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((h, errors))
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?.map_err(|e| e.to_string())?;
        all.add(h)?;
        errors += e;
    }
    Ok((all, errors))
}

/// Call `i` of client `w` in `mode`; whether it succeeded.
async fn call(
    mode: Mode,
    c: &mut client::Client,
    l: &mut client::LedgerClient,
    people: &[synthetic::Customer],
    run_id: u32,
    w: usize,
    i: usize,
) -> bool {
    match mode {
        Mode::Read => {
            let p = &people[(i * 7919 + w * 104_729) % people.len()];
            c.get_fields(pb::GetFieldsRequest {
                customer_id: format!("{}-{run_id}", p.id),
                fields: vec!["phone".into()],
                purpose: "customer_service".into(),
            })
            .await
            .is_ok()
        }
        Mode::Write | Mode::WritePlain => {
            let mut fields = std::collections::HashMap::new();
            let (name, kind) = if mode == Mode::Write {
                (
                    "purchase_count",
                    pb::value::Kind::Integer((i % 1000) as i64),
                )
            } else {
                (
                    "last_contact_ms",
                    pb::value::Kind::TimestampMs(1_700_000_000_000 + i as i64),
                )
            };
            fields.insert(name.to_owned(), pb::Value { kind: Some(kind) });
            c.put_record(pb::PutRecordRequest {
                idempotency_key: String::new(),
                customer_id: format!("lw-{run_id}-{w}-{i}"),
                fields,
                source: Some(pb::CollectionSource {
                    channel: "load".into(),
                    collector: "sovra-load".into(),
                    consent_ref: String::new(),
                }),
            })
            .await
            .is_ok()
        }
        Mode::Consent => {
            let p = &people[(i * 7919 + w * 104_729) % people.len()];
            l.record_consent(lpb::RecordConsentRequest {
                customer_id: format!("{}-{run_id}", p.id),
                purpose: "marketing".into(),
                action: lpb::ConsentAction::Grant as i32,
                channel: "load".into(),
                legal_basis: "consent".into(),
                notice_version: "v1".into(),
                evidence_sha256: vec![(i % 251) as u8; 32],
            })
            .await
            .is_ok()
        }
        Mode::WriteRecord => {
            let mut r = people[i % people.len()].to_request("load");
            r.customer_id = format!("lr-{run_id}-{w}-{i}");
            c.put_record(r).await.is_ok()
        }
        Mode::Describe => c
            .describe_schema(pb::DescribeSchemaRequest {})
            .await
            .is_ok(),
        Mode::BatchPut => {
            let reqs: Vec<pb::PutRecordRequest> = (0..BATCH)
                .map(|k| {
                    let mut r = people[(i * BATCH + k) % people.len()].to_request("load");
                    r.customer_id = format!("lb-{run_id}-{w}-{i}-{k}");
                    r
                })
                .collect();
            let Ok(stream) = c.batch_put(tokio_stream::iter(reqs)).await else {
                return false;
            };
            let mut results = stream.into_inner();
            let mut ok = 0;
            while let Ok(Some(r)) = results.message().await {
                ok += usize::from(r.code == 0);
            }
            ok == BATCH
        }
    }
}

/// Prints the one-line result.
fn report(args: &Args, all: &Histogram<u64>, errors: u64) {
    let secs = args.seconds as f64;
    println!(
        "mode={:?} clients={} seconds={} ops={} errors={} throughput={:.0}/s p50={}us p90={}us p99={}us p999={}us max={}us",
        args.mode,
        args.clients,
        args.seconds,
        all.len(),
        errors,
        all.len() as f64 / secs,
        all.value_at_quantile(0.50),
        all.value_at_quantile(0.90),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999),
        all.max()
    );
    if args.mode == Mode::BatchPut {
        println!(
            "records={} records_per_s={:.0}",
            all.len() as usize * BATCH,
            (all.len() as usize * BATCH) as f64 / secs
        );
    }
}

/// Gives the first `--sandbox-cohort` preloaded customers `lead_scoring`
/// consent, then submits `--sandbox-jobs` heavy histograms round-robin over
/// the partners and reports how many run and how many queue.
async fn submit_heavy_jobs(
    url: &str,
    token: &str,
    partners: &[String],
    people: &[synthetic::Customer],
    run_id: u32,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    use sovra_proto::sandbox::v1 as spb;
    let mut l = client::connect_ledger(url, Some(token), None).await?;
    for p in people.iter().take(args.sandbox_cohort) {
        l.record_consent(lpb::RecordConsentRequest {
            customer_id: format!("{}-{run_id}", p.id),
            purpose: "lead_scoring".into(),
            action: lpb::ConsentAction::Grant as i32,
            channel: "load".into(),
            legal_basis: "consent".into(),
            notice_version: "v1".into(),
            evidence_sha256: vec![7; 32],
        })
        .await?;
    }
    let edges: Vec<i64> = (1..=16).map(|e| e * 3).collect();
    let mut clients = Vec::new();
    for t in partners {
        clients.push(client::connect_sandbox(url, Some(t), None).await?);
    }
    let (mut running, mut queued) = (0, 0);
    for i in 0..args.sandbox_jobs {
        let spec = format!(
            "name = \"heavy-{i}\"\npurpose = \"lead_scoring\"\noutput = \"aggregate\"\n[model]\nkind = \"aggregate\"\nop = \"histogram\"\nfeature = \"purchase_count\"\nedges = {edges:?}\n"
        );
        let n = clients.len();
        let c = &mut clients[i % n];
        let j = c
            .submit_job(spb::SubmitJobRequest {
                job: Some(spb::submit_job_request::Job::SpecToml(spec)),
            })
            .await?
            .into_inner();
        if j.queue_position > 0 {
            queued += 1;
        } else {
            running += 1;
        }
    }
    eprintln!(
        "sandbox: {} heavy jobs submitted ({running} admitted to run, {queued} queued), cohort {}",
        args.sandbox_jobs, args.sandbox_cohort
    );
    Ok(())
}
