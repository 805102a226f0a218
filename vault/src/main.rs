//! The `sovra` command: server, client and demo.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sovra_proto::vault::v1 as pb;
use sovra_vault::auth::Role;
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

enum Failure {
    Vault(VaultError),
    Rpc(tonic::Status),
    Usage(String),
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
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
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
                },
        } => {
            let role: Role = role.parse()?;
            let mut cfg = Config::load(&config)?;
            let t = cfg.add_principal(&name, role, &tenant)?;
            config::write_config(&cfg, &config)?;
            println!(
                "Added principal `{name}` (role {}, tenant {tenant}). Token, shown once:",
                role.as_str()
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
        Cmd::Demo { customers, seed } => {
            if customers == 0 || customers > 1_000_000 {
                return Err(Failure::Usage("--customers must be 1..=1000000".into()));
            }
            let mut out = std::io::stdout();
            demo::run(&demo::DemoOptions { customers, seed }, &mut out).await?;
        }
    }
    Ok(())
}
