//! The `sovra` command: server, client and demo.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::access::auth::Role;
use sovra_vault::client::{self, Client};
use sovra_vault::config::{self, Config};
use sovra_vault::{demo, server, VaultError};
use zeroize::Zeroizing;

// glibc malloc showed up at ~10% of server CPU under load; mimalloc is
// faster for tonic's many small per-request allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sovra", version, about = "Sovra data-sovereignty vault")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// Server URL.
    #[arg(
        long,
        env = "SOVRA_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    server: String,
    /// Bearer token (prefer the environment variable: arguments are visible to other users).
    #[arg(long, env = "SOVRA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// PEM CA certificate to trust for https:// servers.
    #[arg(long, env = "SOVRA_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: root key (0600), config.toml, schema.toml; prints the first admin token once.
    Init {
        /// Directory to create.
        #[arg(long, default_value = "sovra-data")]
        dir: PathBuf,
        /// Address the server will listen on.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: String,
    },
    /// Run the gRPC server.
    Serve {
        /// Configuration file written by `sovra init`.
        #[arg(long, default_value = "sovra-data/config.toml", env = "SOVRA_CONFIG")]
        config: PathBuf,
    },
    /// Manage principals' tokens in a configuration file (restart the server to apply).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Write fields of a customer: `sovra put --customer c-1 phone=13800138000 budget=50000`.
    Put {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        #[arg(long)]
        customer: String,
        /// Collection channel.
        #[arg(long, default_value = "cli")]
        channel: String,
        /// Collector.
        #[arg(long, default_value = "sovra-cli")]
        collector: String,
        /// Consent reference.
        #[arg(long, default_value = "")]
        consent_ref: String,
        /// FIELD=VALUE pairs.
        #[arg(required = true)]
        fields: Vec<String>,
    },
    /// Read fields of a customer for a declared purpose.
    Get {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        #[arg(long)]
        customer: String,
        /// Declared purpose (see `sovra schema`).
        #[arg(long)]
        purpose: String,
        /// Fields to read (all if none).
        fields: Vec<String>,
    },
    /// Find customers by an indexed field.
    Search {
        #[command(flatten)]
        conn: Conn,
        /// Indexed field.
        #[arg(long)]
        field: String,
        /// Value to match (normalised like writes).
        #[arg(long)]
        value: String,
        /// Most ids to return.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Declared purpose of the search (one of the schema's purposes).
        #[arg(long)]
        purpose: String,
    },
    /// Crypto-shred a customer.
    Erase {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        #[arg(long)]
        customer: String,
        /// Reason, e.g. gdpr_art17_request.
        #[arg(long)]
        reason: String,
    },
    /// Tenant key management.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Record or read customers' consent (the consent ledger).
    Consent {
        #[command(subcommand)]
        cmd: ConsentCmd,
    },
    /// Checkpoints, audit bundles and their offline verification.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Validate, inspect, reload and explain Cedar policies.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Field lineage: where a value came from, who used it, what was derived
    /// from it (officer or admin token); OpenLineage export.
    Lineage {
        #[command(subcommand)]
        cmd: LineageCmd,
    },
    /// Sandbox jobs on encrypted features: submit, watch, fetch the
    /// released result, cancel; list registered workloads.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// Show the schema.
    Schema {
        #[command(flatten)]
        conn: Conn,
    },
    /// Run the end-to-end demo on an embedded server in a temporary directory.
    Demo {
        /// Customers to generate.
        #[arg(long, default_value_t = 1000)]
        customers: usize,
        /// Seed of the synthetic data set.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to write the demo's OpenLineage export.
        #[arg(long, default_value = "sovra-demo.openlineage.jsonl")]
        openlineage_out: PathBuf,
    },
}

#[derive(Subcommand)]
enum JobCmd {
    /// Submit a job spec (TOML) or a registered workload, then watch it
    /// with a progress bar and print the released result.
    Submit {
        #[command(flatten)]
        conn: Conn,
        /// The job spec file (see docs/sandbox.md).
        #[arg(required_unless_present = "workload", conflicts_with = "workload")]
        spec: Option<PathBuf>,
        /// Run a registered workload instead (`sovra job workloads`).
        #[arg(long)]
        workload: Option<String>,
        /// Print the job id and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow a job with a progress bar until it ends.
    Watch {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        job_id: String,
    },
    /// Print a job's released result (submitter only).
    Result {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        job_id: String,
        /// Most per-customer rows to print.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Ask a running job to stop.
    Cancel {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        job_id: String,
    },
    /// The registered guest workloads.
    Workloads {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum LineageCmd {
    /// The chain of one field of one customer back to its origin, as a tree.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        customer: String,
        /// Field name.
        field: String,
    },
    /// Who used one field of one customer, when, for what, under which decision.
    Accesses {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        customer: String,
        /// Field name.
        field: String,
        /// Start of the range, ms since the epoch (default: the beginning).
        #[arg(long, default_value_t = 0)]
        from_ms: i64,
        /// End of the range, ms since the epoch, exclusive (default: now).
        #[arg(long, default_value_t = 0)]
        to_ms: i64,
        /// Most accesses to list (all pages up to this many).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// What was computed from one field of one customer.
    Derived {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        customer: String,
        /// Field name.
        field: String,
    },
    /// Export the tenant's field-level lineage as OpenLineage 2-0-2 RunEvents
    /// (JSON lines, no customer id, pseudonym or value).
    Export {
        #[command(flatten)]
        conn: Conn,
        /// Write OpenLineage RunEvents (the only format so far; required).
        #[arg(long)]
        openlineage: bool,
        /// Output file (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy directory offline (exit 1 naming file, line and problem).
    Validate {
        /// Directory of `*.cedar` files.
        dir: PathBuf,
    },
    /// Show the policy set in force on the server (officer).
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Make the server re-read its policy directory (admin); SIGHUP does the same.
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
    /// May principal P do action A on field F of customer C for purpose X, and why?
    /// Asks the running server (officer token), or evaluates offline with --dir.
    Explain {
        #[command(flatten)]
        conn: Conn,
        /// The principal's configured name.
        #[arg(long)]
        principal: String,
        /// The action (read, reveal, write, search, erase, read_audit, ...).
        #[arg(long)]
        action: String,
        /// The field, for field actions.
        #[arg(long, default_value = "")]
        field: String,
        /// The customer whose consents apply (server mode).
        #[arg(long, default_value = "")]
        customer: String,
        /// The declared purpose.
        #[arg(long, default_value = "")]
        purpose: String,
        /// Approvals to assume.
        #[arg(long, default_value_t = 0)]
        approvals: u32,
        /// Offline: evaluate the policy files in this directory instead of asking a server.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Offline: the configuration that names the principal and the schema.
        #[arg(long, default_value = "sovra-data/config.toml")]
        config: PathBuf,
        /// Offline: a purpose the customer consented to (repeat).
        #[arg(long = "consent")]
        consents: Vec<String>,
        /// Offline: a purpose the customer withdrew (repeat).
        #[arg(long = "withdrawn")]
        withdrawn: Vec<String>,
        /// Offline: the customer's kind (e.g. government).
        #[arg(long, default_value = "")]
        kind: String,
        /// Offline: the customer's contract value.
        #[arg(long, default_value_t = 0)]
        contract_value: i64,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Add a principal and print its token once.
    Add {
        /// Configuration file.
        #[arg(long, default_value = "sovra-data/config.toml")]
        config: PathBuf,
        /// Principal name.
        #[arg(long)]
        name: String,
        /// service, officer, partner or admin.
        #[arg(long)]
        role: String,
        /// Tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Department (policies reveal sensitive fields only to the owning
        /// department).
        #[arg(long, default_value = "")]
        department: String,
        /// A purpose the principal may declare (repeat; none by default).
        #[arg(long = "purpose")]
        purposes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Start a rotation; with --wait, show progress until every data key is re-wrapped.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        /// Wait for the re-wrap job.
        #[arg(long)]
        wait: bool,
    },
    /// Show key versions and rotation progress.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Retire versions below --min-version.
    Retire {
        #[command(flatten)]
        conn: Conn,
        /// Lowest version that stays usable.
        #[arg(long)]
        min_version: u32,
        /// Retire even if data keys remain under older versions (their data becomes unreadable).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Clone)]
struct ConsentArgs {
    #[command(flatten)]
    conn: Conn,
    /// Customer id.
    #[arg(long)]
    customer: String,
    /// Purpose (see `sovra schema`).
    #[arg(long)]
    purpose: String,
    /// Collection channel.
    #[arg(long, default_value = "cli")]
    channel: String,
    /// Legal basis: consent, contract, legal_obligation, vital_interests, public_task, legitimate_interests.
    #[arg(long, default_value = "consent")]
    legal_basis: String,
    /// Version of the privacy notice shown.
    #[arg(long, default_value = "v1")]
    notice_version: String,
    /// Evidence file (signed form, recording): only its SHA-256 is sent.
    #[arg(long, conflicts_with = "evidence_sha256")]
    evidence: Option<PathBuf>,
    /// SHA-256 of the evidence, 64 hex digits.
    #[arg(long)]
    evidence_sha256: Option<String>,
    /// Write the receipt (entry and tlog-proof) to this file.
    #[arg(long)]
    receipt_out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConsentCmd {
    /// Record that a customer gives consent to a purpose; prints the ledger receipt.
    Grant(ConsentArgs),
    /// Record that a customer withdraws consent; reads for the purpose are refused from the next request on.
    Withdraw(ConsentArgs),
    /// Show a customer's current consent per purpose.
    State {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        #[arg(long)]
        customer: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Fetch the latest signed checkpoint (keep it: later bundles must be consistent with it).
    Checkpoint {
        #[command(flatten)]
        conn: Conn,
        /// Write the signed checkpoint note to this file.
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Export a customer's audit bundle (JSON) for offline verification.
    Bundle {
        #[command(flatten)]
        conn: Conn,
        /// Customer id.
        #[arg(long)]
        customer: String,
        /// Only entries at or after this time (ms since the epoch).
        #[arg(long)]
        from_ms: Option<u64>,
        /// Only entries before this time (ms since the epoch).
        #[arg(long)]
        to_ms: Option<u64>,
        /// An older checkpoint file: include a consistency proof from it.
        #[arg(long)]
        since: Option<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Fetch a consistency proof from an older checkpoint to a newer tree size.
    Consistency {
        #[command(flatten)]
        conn: Conn,
        /// The older checkpoint file.
        #[arg(long)]
        since: PathBuf,
        /// The newer tree size (default: the bundle's with --bundle, else the latest checkpoint's).
        #[arg(long)]
        to_size: Option<u64>,
        /// Take the newer tree size from this bundle.
        #[arg(long, conflicts_with = "to_size")]
        bundle: Option<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Verify an audit bundle offline, with no server; exits non-zero naming what failed.
    Verify {
        /// The bundle file.
        bundle: PathBuf,
        /// The log's verifier key (or a file holding it); without it the bundle's own key is used.
        #[arg(long)]
        key: Option<String>,
        /// An older checkpoint file the bundle's log must be consistent with.
        #[arg(long)]
        since: Option<PathBuf>,
        /// A consistency proof file (from `sovra audit consistency`), if the bundle has none.
        #[arg(long)]
        consistency: Option<PathBuf>,
    },
}

enum Failure {
    Vault(VaultError),
    Rpc(tonic::Status),
    Usage(String),
    Verify(String),
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

type CmdResult = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every file any command writes (config, keys, exports, databases) is
    // private to this user, whatever umask it was started with.
    sovra_vault::files::private_umask();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Vault(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Rpc(s)) => {
            eprintln!("error: {:?}: {}", s.code(), s.message());
            ExitCode::from(2)
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(64)
        }
        Err(Failure::Verify(m)) => {
            println!("FAILED: {m}");
            ExitCode::from(1)
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // tonic reports why it closed a connection (a protocol error, a
        // GOAWAY it sent, a reset) at debug level: shown by default.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,tonic::transport::server=debug")
        });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn read_file(p: &std::path::Path, limit: u64) -> Result<Vec<u8>, Failure> {
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

fn write_file(p: &std::path::Path, data: &[u8]) -> Result<(), Failure> {
    std::fs::write(p, data)
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", p.display())))
}

/// The CA certificate and token a client command connects with.
fn credentials(conn: &Conn) -> Result<(Option<Vec<u8>>, Zeroizing<String>), Failure> {
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

async fn connect_policy(conn: &Conn) -> Result<client::PolicyClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_policy(&conn.server, Some(token.as_str()), ca).await?)
}

fn print_policy_status(s: &sovra_proto::policy::v1::PolicyStatus) {
    println!("policy set sha256 {}", s.sha256);
    println!("source            {}", s.source);
    println!("files             {}", s.files.join(", "));
    println!("policies          {}", s.policy_ids.len());
    match s.ledger_index {
        Some(i) => println!("recorded in ledger entry {i}"),
        None => println!("recorded in the ledger by an earlier start"),
    }
}

/// Follows a job until it ends, drawing a progress bar on standard error.
async fn watch_job(
    c: &mut client::SandboxClient,
    job_id: &str,
) -> Result<sovra_proto::sandbox::v1::Job, Failure> {
    use sovra_proto::sandbox::v1 as spb;
    let mut stream = c
        .watch_job(spb::GetJobRequest {
            job_id: job_id.to_owned(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(j) = stream.message().await? {
        eprint!("\r{}", sovra_vault::jobs::view::progress_line(&j));
        last = Some(j);
    }
    eprintln!();
    last.ok_or_else(|| Failure::Usage(format!("job `{job_id}`: the server sent no state")))
}

async fn run_job(cmd: JobCmd) -> CmdResult {
    use sovra_proto::sandbox::v1 as spb;
    use sovra_vault::jobs::view as job_view;
    let connect = |conn: &Conn| {
        let conn = conn.clone();
        async move {
            let (ca, token) = credentials(&conn)?;
            Ok::<_, Failure>(client::connect_sandbox(&conn.server, Some(token.as_str()), ca).await?)
        }
    };
    match cmd {
        JobCmd::Submit {
            conn,
            spec,
            workload,
            no_wait,
        } => {
            let job = match (spec, workload) {
                (_, Some(id)) => spb::submit_job_request::Job::WorkloadId(id),
                (Some(path), None) => {
                    let bytes = read_file(&path, sovra_sandbox::spec::MAX_SPEC_BYTES as u64)?;
                    let text = String::from_utf8(bytes).map_err(|_| {
                        Failure::Usage(format!("{} is not UTF-8 text", path.display()))
                    })?;
                    spb::submit_job_request::Job::SpecToml(text)
                }
                (None, None) => {
                    return Err(Failure::Usage("give a spec file or --workload ID".into()))
                }
            };
            let mut c = connect(&conn).await?;
            let j = c
                .submit_job(spb::SubmitJobRequest { job: Some(job) })
                .await?
                .into_inner();
            print!("{}", job_view::job(&j));
            if no_wait {
                return Ok(());
            }
            let end = watch_job(&mut c, &j.job_id).await?;
            if end.state == spb::JobState::Succeeded as i32 {
                let r = c
                    .get_result(spb::GetJobRequest {
                        job_id: j.job_id.clone(),
                    })
                    .await?
                    .into_inner();
                print!("{}", job_view::result(&r, 20));
            } else {
                print!("{}", job_view::job(&end));
                return Err(Failure::Usage(format!(
                    "job {} ended {}",
                    end.job_id,
                    job_view::state(&end)
                )));
            }
        }
        JobCmd::Watch { conn, job_id } => {
            let mut c = connect(&conn).await?;
            let end = watch_job(&mut c, &job_id).await?;
            print!("{}", job_view::job(&end));
        }
        JobCmd::Result {
            conn,
            job_id,
            limit,
        } => {
            let r = connect(&conn)
                .await?
                .get_result(spb::GetJobRequest { job_id })
                .await?
                .into_inner();
            if let Some(j) = &r.job {
                print!("{}", job_view::job(j));
            }
            print!("{}", job_view::result(&r, limit));
        }
        JobCmd::Cancel { conn, job_id } => {
            let j = connect(&conn)
                .await?
                .cancel_job(spb::GetJobRequest { job_id })
                .await?
                .into_inner();
            print!("{}", job_view::job(&j));
        }
        JobCmd::Workloads { conn } => {
            let w = connect(&conn)
                .await?
                .list_workloads(spb::ListWorkloadsRequest {})
                .await?
                .into_inner();
            for w in w.workloads {
                println!(
                    "{}  purpose {}, {} output, owned by {}\n  features: {}\n  spec sha256 {}\n  {}",
                    w.id,
                    w.purpose,
                    w.output_class,
                    w.department,
                    w.features.join(", "),
                    w.spec_sha256,
                    w.description
                );
            }
        }
    }
    Ok(())
}

async fn run_lineage(cmd: LineageCmd) -> CmdResult {
    use sovra_proto::lineage::v1 as lpb;
    use sovra_vault::lineage::view as lineage_view;
    let connect = |conn: &Conn| {
        let conn = conn.clone();
        async move {
            let (ca, token) = credentials(&conn)?;
            Ok::<_, Failure>(client::connect_lineage(&conn.server, Some(token.as_str()), ca).await?)
        }
    };
    match cmd {
        LineageCmd::Show {
            conn,
            customer,
            field,
        } => {
            let l = connect(&conn)
                .await?
                .get_field_lineage(lpb::GetFieldLineageRequest {
                    customer_id: customer.clone(),
                    field,
                })
                .await?
                .into_inner();
            print!("{}", lineage_view::field_tree(&customer, &l));
        }
        LineageCmd::Accesses {
            conn,
            customer,
            field,
            from_ms,
            to_ms,
            limit,
        } => {
            let mut c = connect(&conn).await?;
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let want = limit.saturating_sub(all.len()).min(1000);
                if want == 0 {
                    break;
                }
                let page = c
                    .list_accesses(lpb::ListAccessesRequest {
                        customer_id: customer.clone(),
                        field: field.clone(),
                        from_ms,
                        to_ms,
                        limit: want as u32,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.accesses);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            print!("{}", lineage_view::accesses(&field, &all));
        }
        LineageCmd::Derived {
            conn,
            customer,
            field,
        } => {
            let d = connect(&conn)
                .await?
                .get_derived(lpb::GetDerivedRequest {
                    customer_id: customer,
                    field: field.clone(),
                })
                .await?
                .into_inner();
            print!("{}", lineage_view::derived(&field, &d.derived));
        }
        LineageCmd::Export {
            conn,
            openlineage,
            out,
        } => {
            if !openlineage {
                return Err(Failure::Usage(
                    "choose an export format: --openlineage".into(),
                ));
            }
            let e = connect(&conn)
                .await?
                .export_lineage(lpb::ExportLineageRequest {})
                .await?
                .into_inner();
            let events = sovra_vault::lineage::openlineage::run_events(&e);
            let text = sovra_vault::lineage::openlineage::to_json_lines(&events);
            match out {
                Some(path) => {
                    std::fs::write(&path, text).map_err(|e| {
                        Failure::Usage(format!("cannot write {}: {e}", path.display()))
                    })?;
                    eprintln!(
                        "wrote {} OpenLineage RunEvents to {}",
                        events.len(),
                        path.display()
                    );
                }
                None => print!("{text}"),
            }
        }
    }
    Ok(())
}

async fn run_policy(cmd: PolicyCmd) -> CmdResult {
    use sovra_proto::policy::v1 as ppb;
    match cmd {
        PolicyCmd::Validate { dir } => match sovra_policy::Policies::load_dir(&dir) {
            Ok(p) => {
                for w in p.warnings() {
                    eprintln!("warning: {w}");
                }
                println!(
                    "OK: {} policies in {} files, sha256 {}",
                    p.len(),
                    p.files().len(),
                    p.sha256_hex()
                );
            }
            Err(sovra_policy::PolicyError::Invalid(e)) => {
                let lines: Vec<String> = e.problems().iter().map(|p| format!("  {p}")).collect();
                return Err(Failure::Verify(format!(
                    "{} problem(s) in {}:\n{}",
                    lines.len(),
                    dir.display(),
                    lines.join("\n")
                )));
            }
            Err(e) => return Err(Failure::Verify(e.to_string())),
        },
        PolicyCmd::Status { conn } => {
            let mut c = connect_policy(&conn).await?;
            let s = c
                .get_policy_status(ppb::GetPolicyStatusRequest {})
                .await?
                .into_inner();
            print_policy_status(&s);
        }
        PolicyCmd::Reload { conn } => {
            let mut c = connect_policy(&conn).await?;
            let r = c
                .reload_policies(ppb::ReloadPoliciesRequest {})
                .await?
                .into_inner();
            println!(
                "{}",
                if r.changed {
                    "reloaded: a new policy set is in force"
                } else {
                    "unchanged: the files are the set already in force"
                }
            );
            if let Some(s) = &r.status {
                print_policy_status(s);
            }
        }
        PolicyCmd::Explain {
            conn,
            principal,
            action,
            field,
            customer,
            purpose,
            approvals,
            dir,
            config,
            consents,
            withdrawn,
            kind,
            contract_value,
        } => {
            let e = match dir {
                None => {
                    let mut c = connect_policy(&conn).await?;
                    c.explain(ppb::ExplainRequest {
                        principal,
                        action,
                        field,
                        customer_id: customer,
                        purpose,
                        approvals,
                    })
                    .await?
                    .into_inner()
                }
                Some(dir) => sovra_vault::access::policy::explain_offline(
                    &dir,
                    &config,
                    &sovra_vault::access::policy::OfflineQuestion {
                        principal,
                        action,
                        field,
                        purpose,
                        approvals,
                        customer: sovra_policy::CustomerAttrs {
                            consents: consents.into_iter().collect(),
                            withdrawn: withdrawn.into_iter().collect(),
                            kind,
                            contract_value,
                        },
                    },
                )?,
            };
            println!("{}", if e.allowed { "ALLOW" } else { "DENY" });
            if !e.disclosure.is_empty() {
                println!("disclosure  {}", e.disclosure);
            }
            println!("because     {}", e.summary);
            println!("policy set  {}", e.policy_sha256);
        }
    }
    Ok(())
}

async fn connect_ledger(conn: &Conn) -> Result<client::LedgerClient, Failure> {
    let (ca, token) = credentials(conn)?;
    Ok(client::connect_ledger(&conn.server, Some(token.as_str()), ca).await?)
}

fn consent_request(
    a: &ConsentArgs,
    action: lpb::ConsentAction,
) -> Result<lpb::RecordConsentRequest, Failure> {
    use sha2::Digest as _;
    let evidence = match (&a.evidence, &a.evidence_sha256) {
        (Some(p), _) => sha2::Sha256::digest(read_file(p, 1 << 30)?).to_vec(),
        (None, Some(h)) => hex::decode(h.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Failure::Usage("--evidence-sha256 must be 64 hex digits".into()))?,
        (None, None) => {
            return Err(Failure::Usage(
                "give the consent evidence: --evidence FILE (only its SHA-256 is sent) or --evidence-sha256 HEX".into(),
            ))
        }
    };
    Ok(lpb::RecordConsentRequest {
        customer_id: a.customer.clone(),
        purpose: a.purpose.clone(),
        action: action as i32,
        channel: a.channel.clone(),
        legal_basis: a.legal_basis.clone(),
        notice_version: a.notice_version.clone(),
        evidence_sha256: evidence,
    })
}

async fn run_consent(cmd: ConsentCmd) -> CmdResult {
    let (a, action) = match cmd {
        ConsentCmd::Grant(a) => (a, lpb::ConsentAction::Grant),
        ConsentCmd::Withdraw(a) => (a, lpb::ConsentAction::Withdraw),
        ConsentCmd::State { conn, customer } => {
            let mut c = connect_ledger(&conn).await?;
            let s = c
                .get_consent_state(lpb::GetConsentStateRequest {
                    customer_id: customer,
                })
                .await?
                .into_inner();
            println!("customer {} (pseudonym {})", s.customer_id, s.subject);
            if s.purposes.is_empty() {
                println!("  no consent recorded");
            }
            for p in &s.purposes {
                let what = if p.action == lpb::ConsentAction::Grant as i32 {
                    "granted"
                } else {
                    "withdrawn"
                };
                println!(
                    "  {:<16} {:<9} ledger entry {} at {} ms",
                    p.purpose, what, p.index, p.timestamp_ms
                );
            }
            return Ok(());
        }
    };
    let req = consent_request(&a, action)?;
    let mut c = connect_ledger(&a.conn).await?;
    let r = c.record_consent(req).await?.into_inner();
    println!(
        "recorded: consent {} for `{}` (customer {}) is ledger entry {}",
        if action == lpb::ConsentAction::Grant {
            "granted"
        } else {
            "withdrawn"
        },
        a.purpose,
        a.customer,
        r.index
    );
    let (_, cp) = sovra_ledger::verify_receipt(&r.entry, r.proof.as_bytes(), &r.verifier_key)
        .map_err(|e| Failure::Verify(format!("the server's receipt does not verify: {e}")))?;
    println!(
        "  receipt verified against checkpoint of tree size {}",
        cp.size
    );
    if let Some(out) = &a.receipt_out {
        let doc = serde_json::json!({
            "entry": base64::Engine::encode(&base64::prelude::BASE64_STANDARD, &r.entry),
            "proof": r.proof,
            "verifier_key": r.verifier_key,
        });
        write_file(out, doc.to_string().as_bytes())?;
        println!("  receipt written to {}", out.display());
    }
    Ok(())
}

fn read_key(key: &str) -> Result<String, Failure> {
    let p = std::path::Path::new(key);
    if !key.contains('+') && p.exists() {
        return Ok(String::from_utf8_lossy(&read_file(p, 4096)?)
            .trim()
            .to_owned());
    }
    Ok(key.trim().to_owned())
}

fn verify_offline(
    bundle: &std::path::Path,
    key: Option<&str>,
    since: Option<&std::path::Path>,
    consistency: Option<&std::path::Path>,
) -> CmdResult {
    let json = read_file(bundle, sovra_ledger::bundle::MAX_BUNDLE_BYTES as u64)?;
    let key = key.map(read_key).transpose()?;
    let since = since.map(|p| read_file(p, 1 << 20)).transpose()?;
    let proof = match consistency {
        Some(p) => Some(
            sovra_ledger::ConsistencyProof::parse(&read_file(p, 1 << 20)?)
                .map_err(|e| Failure::Verify(e.to_string()))?,
        ),
        None => None,
    };
    let v = sovra_ledger::verify_bundle(
        &json,
        sovra_ledger::VerifyOptions {
            trusted_key: key.as_deref(),
            since: since.as_deref(),
            consistency: proof.as_ref(),
        },
    )
    .map_err(|e| Failure::Verify(e.to_string()))?;
    println!("VERIFIED: {}", bundle.display());
    println!(
        "  checkpoint: origin {}, tree size {}, signature valid ({})",
        v.checkpoint.origin,
        v.checkpoint.size,
        if v.key_pinned {
            "with the key you gave"
        } else {
            "with the bundle's own key: pass --key to prove it is from the log you trust"
        }
    );
    println!(
        "  {} entries included in that tree; hash chain checked across {} adjacent pairs",
        v.entries, v.chain_links
    );
    if let Some(old) = v.consistent_since {
        println!("  the log is consistent with your older checkpoint of tree size {old}");
    }
    if let Ok(b) = serde_json::from_slice::<sovra_ledger::AuditBundle>(&json) {
        for e in &b.entries {
            let d = &e.decoded;
            let mut line = format!("  #{:<6} {}", e.index, d["kind"].as_str().unwrap_or("?"));
            for k in ["purpose", "decision", "actor"] {
                if let Some(v) = d[k].as_str() {
                    line.push_str(&format!(" {k}={v}"));
                }
            }
            println!("{line}");
        }
    }
    Ok(())
}

async fn run_audit(cmd: AuditCmd) -> CmdResult {
    match cmd {
        AuditCmd::Verify {
            bundle,
            key,
            since,
            consistency,
        } => verify_offline(
            &bundle,
            key.as_deref(),
            since.as_deref(),
            consistency.as_deref(),
        ),
        AuditCmd::Checkpoint { conn, out } => {
            let mut c = connect_ledger(&conn).await?;
            let cp = c
                .get_checkpoint(lpb::GetCheckpointRequest {})
                .await?
                .into_inner();
            sovra_ledger::verify_checkpoint(cp.note.as_bytes(), &cp.verifier_key).map_err(|e| {
                Failure::Verify(format!("the server's checkpoint does not verify: {e}"))
            })?;
            match out {
                Some(p) => {
                    write_file(&p, cp.note.as_bytes())?;
                    println!(
                        "checkpoint of tree size {} written to {}",
                        cp.tree_size,
                        p.display()
                    );
                }
                None => print!("{}", cp.note),
            }
            println!("verifier key: {}", cp.verifier_key);
            Ok(())
        }
        AuditCmd::Bundle {
            conn,
            customer,
            from_ms,
            to_ms,
            since,
            out,
        } => {
            let since_size = match since {
                Some(p) => checkpoint_size(&read_file(&p, 1 << 20)?)?,
                None => 0,
            };
            let mut c = connect_ledger(&conn).await?;
            let b = c
                .export_audit_bundle(lpb::ExportAuditBundleRequest {
                    customer_id: customer.clone(),
                    from_ms: from_ms.unwrap_or(0),
                    to_ms: to_ms.unwrap_or(0),
                    consistency_from_size: since_size,
                })
                .await?
                .into_inner();
            write_file(&out, b.json.as_bytes())?;
            println!(
                "audit bundle of customer {customer}: {} entries against tree size {}, written to {}",
                b.entries,
                b.tree_size,
                out.display()
            );
            println!(
                "verify it offline: sovra audit verify {} --key <verifier key>",
                out.display()
            );
            Ok(())
        }
        AuditCmd::Consistency {
            conn,
            since,
            to_size,
            bundle,
            out,
        } => {
            let from = checkpoint_size(&read_file(&since, 1 << 20)?)?;
            let to = match (to_size, bundle) {
                (Some(n), _) => n,
                (None, Some(b)) => {
                    let b: sovra_ledger::AuditBundle = serde_json::from_slice(&read_file(
                        &b,
                        sovra_ledger::bundle::MAX_BUNDLE_BYTES as u64,
                    )?)
                    .map_err(|e| Failure::Usage(format!("not an audit bundle: {e}")))?;
                    checkpoint_size(b.checkpoint.as_bytes())?
                }
                (None, None) => 0,
            };
            let mut c = connect_ledger(&conn).await?;
            let p = c
                .get_consistency_proof(lpb::GetConsistencyProofRequest {
                    from_size: from,
                    to_size: to,
                })
                .await?
                .into_inner();
            let hashes = p
                .hashes
                .iter()
                .map(|h| <[u8; 32]>::try_from(h.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    Failure::Verify("the server sent a hash that is not 32 bytes".into())
                })?;
            let doc = sovra_ledger::ConsistencyProof::new(p.from_size, p.to_size, &hashes);
            let json = serde_json::to_string_pretty(&doc)
                .map_err(|e| Failure::Usage(format!("cannot render the proof: {e}")))?;
            write_file(&out, json.as_bytes())?;
            println!(
                "consistency proof from tree size {} to {} written to {}",
                p.from_size,
                p.to_size,
                out.display()
            );
            Ok(())
        }
    }
}

/// The tree size of a checkpoint note, read without checking its signature
/// (the verifier checks it).
fn checkpoint_size(note: &[u8]) -> Result<u64, Failure> {
    std::str::from_utf8(note)
        .ok()
        .and_then(|t| t.lines().nth(1))
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| {
            Failure::Usage("not a checkpoint: its second line must be the tree size".into())
        })
}

async fn connect(conn: &Conn) -> Result<Client, Failure> {
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

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

fn parse_value(spec: &pb::FieldSpec, raw: &str) -> Result<pb::Value, Failure> {
    use pb::value::Kind;
    let kind = match spec.r#type.as_str() {
        "integer" => Kind::Integer(
            raw.trim()
                .parse()
                .map_err(|_| Failure::Usage(format!("field `{}` takes an integer", spec.name)))?,
        ),
        "timestamp" => Kind::TimestampMs(raw.trim().parse().map_err(|_| {
            Failure::Usage(format!(
                "field `{}` takes a timestamp in ms since the Unix epoch",
                spec.name
            ))
        })?),
        _ => Kind::Text(raw.to_owned()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

async fn schema_map(c: &mut Client) -> Result<HashMap<String, pb::FieldSpec>, Failure> {
    let s = c
        .describe_schema(pb::DescribeSchemaRequest {})
        .await?
        .into_inner();
    Ok(s.fields.into_iter().map(|f| (f.name.clone(), f)).collect())
}

fn print_status(s: &pb::KeyStatus) {
    println!(
        "tenant {}: active v{}, minimum decryption v{}",
        s.tenant, s.active_version, s.min_version
    );
    for (v, n) in &s.data_keys_by_version {
        println!("  v{v}: {n} data keys");
    }
    if let Some(j) = &s.job {
        println!(
            "  rotation to v{}: {}/{} re-wrapped{}",
            j.target_version,
            j.rewrapped,
            j.total,
            if j.done { ", done" } else { ", running" }
        );
    }
}

async fn run(cmd: Cmd) -> CmdResult {
    match cmd {
        Cmd::Init { dir, listen } => {
            let i = config::init(&dir, &listen)?;
            println!("Initialised {}", dir.display());
            println!("  configuration: {}", i.config_path.display());
            println!("  root key:      {} (mode 0600; back it up offline: without it nothing can be decrypted)", dir.join("root.key").display());
            println!("  schema:        {}", dir.join("schema.toml").display());
            println!(
                "  ledger key:    {} (mode 0600; signs the audit log's checkpoints)",
                dir.join("ledger.key").display()
            );
            if i.fhe_key {
                println!("  TFHE key:      made for tenant `default` (tfhe's {} parameters), stored wrapped under the root key", sovra_sandbox::params::PARAMETER_SET_NAME);
            }
            println!();
            println!("Ledger verifier key (give it to compliance officers to pin for `sovra audit verify --key`):");
            println!("  {}", i.verifier_key);
            println!();
            println!("Admin token (shown once, only its hash is stored):");
            println!("  {}", i.admin_token.token.as_str());
            println!();
            println!("Next: sovra serve --config {}", i.config_path.display());
        }
        Cmd::Serve { config } => {
            let cfg = Config::load(&config)?;
            init_logs(cfg.log_format == "json");
            let srv = server::start(&cfg, None, shutdown_signal()).await?;
            srv.wait().await?;
        }
        Cmd::Token {
            cmd:
                TokenCmd::Add {
                    config,
                    name,
                    role,
                    tenant,
                    department,
                    purposes,
                },
        } => {
            let role: Role = role.parse()?;
            let mut cfg = Config::load(&config)?;
            let purposes: Vec<&str> = purposes.iter().map(String::as_str).collect();
            let t = cfg.add_principal_with(&name, role, &tenant, &department, &purposes)?;
            config::write_config(&cfg, &config)?;
            println!(
                "Added principal `{name}` (role {}, tenant {tenant}, department `{department}`, purposes [{}]). Token, shown once:",
                role.as_str(),
                purposes.join(", ")
            );
            println!("  {}", t.token.as_str());
            println!("Restart the server to apply.");
        }
        Cmd::Put {
            conn,
            customer,
            channel,
            collector,
            consent_ref,
            fields,
        } => {
            let mut c = connect(&conn).await?;
            let specs = schema_map(&mut c).await?;
            let mut values = HashMap::new();
            for f in &fields {
                let (name, raw) = f
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("`{f}`: expected FIELD=VALUE")))?;
                let spec = specs.get(name).ok_or_else(|| {
                    Failure::Usage(format!("unknown field `{name}` (see `sovra schema`)"))
                })?;
                values.insert(name.to_owned(), parse_value(spec, raw)?);
            }
            let r = c
                .put_record(pb::PutRecordRequest {
                    idempotency_key: String::new(),
                    customer_id: customer,
                    fields: values,
                    source: Some(pb::CollectionSource {
                        channel,
                        collector,
                        consent_ref,
                    }),
                })
                .await?
                .into_inner();
            println!(
                "{} {}",
                if r.created { "created" } else { "updated" },
                r.customer_id
            );
            for v in r.versions {
                println!("  {} v{}", v.field, v.version);
            }
        }
        Cmd::Get {
            conn,
            customer,
            purpose,
            fields,
        } => {
            let mut c = connect(&conn).await?;
            let r = c
                .get_fields(pb::GetFieldsRequest {
                    customer_id: customer,
                    fields,
                    purpose,
                })
                .await?
                .into_inner();
            println!("customer {}", r.customer_id);
            for f in &r.fields {
                let src = f
                    .source
                    .as_ref()
                    .map(|s| format!("{}/{}", s.channel, s.collector))
                    .unwrap_or_default();
                println!(
                    "  {:<20} v{:<3} {}   [{}]",
                    f.field,
                    f.version,
                    client::display(f),
                    src
                );
            }
        }
        Cmd::Search {
            conn,
            field,
            value,
            limit,
            purpose,
        } => {
            let mut c = connect(&conn).await?;
            let specs = schema_map(&mut c).await?;
            let spec = specs.get(&field).ok_or_else(|| {
                Failure::Usage(format!("unknown field `{field}` (see `sovra schema`)"))
            })?;
            let v = parse_value(spec, &value)?;
            let r = c
                .search(pb::SearchRequest {
                    field,
                    value: Some(v),
                    limit,
                    purpose,
                })
                .await?
                .into_inner();
            for id in &r.customer_ids {
                println!("{id}");
            }
            if r.truncated {
                eprintln!("(more matches; raise --limit)");
            }
        }
        Cmd::Erase {
            conn,
            customer,
            reason,
        } => {
            let mut c = connect(&conn).await?;
            let r = c
                .erase_customer(pb::EraseCustomerRequest {
                    customer_id: customer,
                    reason,
                })
                .await?
                .into_inner();
            println!("erased {}: receipt {}", r.customer_id, r.receipt_id);
            println!(
                "  {} fields, {} index entries removed; data key (wrapped under v{}) destroyed",
                r.fields_erased, r.index_entries_removed, r.data_key_wrap_version
            );
        }
        Cmd::Keys { cmd } => match cmd {
            KeysCmd::Rotate { conn, wait } => {
                let mut c = connect(&conn).await?;
                let s = c
                    .rotate_tenant_key(pb::RotateTenantKeyRequest {})
                    .await?
                    .into_inner();
                println!(
                    "tenant {}: v{} is now active for new data keys",
                    s.tenant, s.active_version
                );
                if wait {
                    loop {
                        let s = c
                            .get_key_status(pb::GetKeyStatusRequest {})
                            .await?
                            .into_inner();
                        let Some(j) = s.job else { break };
                        let pct = if j.total == 0 {
                            100.0
                        } else {
                            100.0 * j.rewrapped as f64 / j.total as f64
                        };
                        eprint!(
                            "\r  re-wrapping: {}/{} ({pct:.0}%)   ",
                            j.rewrapped, j.total
                        );
                        let _ = std::io::stderr().flush();
                        if j.done {
                            eprintln!();
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    let s = c
                        .get_key_status(pb::GetKeyStatusRequest {})
                        .await?
                        .into_inner();
                    print_status(&s);
                } else {
                    println!("  re-wrap job started; follow it with `sovra keys status`");
                }
            }
            KeysCmd::Status { conn } => {
                let mut c = connect(&conn).await?;
                print_status(
                    &c.get_key_status(pb::GetKeyStatusRequest {})
                        .await?
                        .into_inner(),
                );
            }
            KeysCmd::Retire {
                conn,
                min_version,
                force,
            } => {
                let mut c = connect(&conn).await?;
                let s = c
                    .retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
                        min_version,
                        force,
                    })
                    .await?
                    .into_inner();
                print_status(&s);
            }
        },
        Cmd::Consent { cmd } => run_consent(cmd).await?,
        Cmd::Audit { cmd } => run_audit(cmd).await?,
        Cmd::Policy { cmd } => run_policy(cmd).await?,
        Cmd::Lineage { cmd } => run_lineage(cmd).await?,
        Cmd::Job { cmd } => run_job(cmd).await?,
        Cmd::Schema { conn } => {
            let mut c = connect(&conn).await?;
            let s = c
                .describe_schema(pb::DescribeSchemaRequest {})
                .await?
                .into_inner();
            println!("schema {} v{}", s.name, s.version);
            for f in &s.fields {
                println!(
                    "  {:<20} {:<9} {:<9} {:<7} mask={:<7} {}",
                    f.name,
                    f.r#type,
                    f.sensitivity,
                    if f.indexed { "indexed" } else { "" },
                    f.mask,
                    f.description
                );
            }
            println!("purposes: {}", s.purposes.join(", "));
        }
        Cmd::Demo {
            customers,
            seed,
            openlineage_out,
        } => {
            if customers == 0 || customers > 1_000_000 {
                return Err(Failure::Usage("--customers must be 1..=1000000".into()));
            }
            let mut out = std::io::stdout();
            demo::run(
                &demo::DemoOptions {
                    customers,
                    seed,
                    openlineage_out,
                },
                &mut out,
            )
            .await?;
        }
    }
    Ok(())
}
