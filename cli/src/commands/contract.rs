//! `sovra contract`: CRM contracts, offline. `validate` checks a manifest
//! and its guest module (every problem at `file:line:column`); `test` runs
//! it over an events file and prints what it would decide and do, and each
//! obligation's outcome, with no side effect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use sovra_contracts::{
    dry_run_decided, ActionDecision, CelType, ContractError, CustomerFacts, Manifest, Planned,
};
use sovra_policy::{CustomerAttrs, Policies};
use sovra_vault::schema::Schema;
use sovra_vault::VaultError;

use sovra_proto::contracts::v1 as cpb;

use crate::common::{connect_contracts, read_file, CmdResult, Conn, Failure};

/// Longest events file `sovra contract test` reads.
const MAX_EVENTS_FILE: u64 = 16 * 1024 * 1024;
/// Longest manifest and guest module `sovra contract register` sends.
const MAX_MANIFEST_FILE: u64 = sovra_contracts::manifest::MAX_MANIFEST_LEN as u64;
const MAX_GUEST_FILE: u64 = sovra_contracts::manifest::MAX_GUEST_LEN as u64;

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ContractCmd {
    /// Register a contract on the server (admin): the manifest and the guest
    /// module it names, checked there and recorded in the ledger.
    Register {
        #[command(flatten)]
        conn: Conn,
        /// The manifest (TOML); its `[guest] module` is read from beside it.
        manifest: PathBuf,
    },
    /// List the tenant's contracts (service, officer or admin).
    List {
        #[command(flatten)]
        conn: Conn,
        /// Include disabled contracts.
        #[arg(long)]
        all: bool,
    },
    /// Show one contract and its manifest.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// The contract's id.
        id: String,
        /// The version (default: the latest).
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Disable a contract id, every version (admin); recorded in the ledger.
    Disable {
        #[command(flatten)]
        conn: Conn,
        /// The contract's id.
        id: String,
        /// Why (recorded in the ledger entry).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Send a business signal about a customer to the tenant's contracts
    /// (service): prints each instance it started and its actions.
    Signal {
        #[command(flatten)]
        conn: Conn,
        /// The signal's name (`poc_report_signed`).
        name: String,
        /// The customer it is about.
        #[arg(long)]
        customer: String,
        /// Only this contract.
        #[arg(long, default_value = "")]
        contract: String,
        /// An idempotency key: a retry with it starts nothing new.
        #[arg(long, default_value = "")]
        key: String,
        /// An attribute, `NAME=VALUE` (an integer, `true`/`false`, or text); repeatable.
        #[arg(long = "attr")]
        attrs: Vec<String>,
    },
    /// List contract instances and their actions (service, officer or admin).
    Instances {
        #[command(flatten)]
        conn: Conn,
        /// Only this contract's.
        #[arg(long, default_value = "")]
        contract: String,
        /// Only this customer's.
        #[arg(long, default_value = "")]
        customer: String,
        /// Only instances with obligations outstanding.
        #[arg(long)]
        open: bool,
        /// At most this many (newest first).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Export an instance's evidence report (verified before it is written),
    /// or verify a report offline with `--verify`.
    Evidence {
        #[command(flatten)]
        conn: Conn,
        /// The instance to export.
        #[arg(long, required_unless_present = "verify", conflicts_with = "verify")]
        instance: Option<u64>,
        /// Write the report here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Verify this report offline instead (no server).
        #[arg(long)]
        verify: Option<PathBuf>,
        /// The log's verifier key as you hold it (a file); without it the
        /// report's own key is used, which proves integrity but not origin.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Check a manifest and its guest module offline (exit 1 naming file, line and problem).
    Validate {
        /// The manifest (TOML); its `[guest] module` is read from beside it.
        manifest: PathBuf,
        /// The schema whose fields it may read (default: the built-in CRM schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Dry run: evaluate a manifest on the events of a JSON-lines file, decide
    /// each action with the policies for the contract's workload principal,
    /// and print decisions, actions and obligations, with no side effects.
    Test {
        /// The manifest (TOML).
        manifest: PathBuf,
        /// Events, one JSON object per line: `{"at_ms", "on", "name", "attrs", "fields"}`,
        /// or a completion `{"at_ms", "complete": "ACTION_ID"}`.
        #[arg(long)]
        events: PathBuf,
        /// Report obligations as of this time (ms since the epoch; default: the last line's).
        #[arg(long)]
        until: Option<i64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The schema whose fields it may read (default: the built-in CRM schema).
        #[arg(long)]
        schema: Option<PathBuf>,
        /// A policy directory to decide actions with (default: the built-in set).
        #[arg(long)]
        policies: Option<PathBuf>,
    },
}

/// Runs a `sovra contract` command.
pub async fn run(cmd: ContractCmd) -> CmdResult {
    match cmd {
        ContractCmd::Register { conn, manifest } => register(&conn, &manifest).await,
        ContractCmd::List { conn, all } => list(&conn, all).await,
        ContractCmd::Show { conn, id, version } => {
            let mut c = connect_contracts(&conn).await?;
            let r = c
                .get_contract(cpb::GetContractRequest { id, version })
                .await?
                .into_inner();
            if let Some(k) = &r.contract {
                print_contract(k);
            }
            println!("guest wasm   {} bytes", r.guest_wasm.len());
            println!("--- manifest");
            print!("{}", r.manifest);
            Ok(())
        }
        ContractCmd::Disable { conn, id, reason } => {
            let mut c = connect_contracts(&conn).await?;
            let r = c
                .disable_contract(cpb::DisableContractRequest { id, reason })
                .await?
                .into_inner();
            print_contract(&r);
            Ok(())
        }
        ContractCmd::Signal {
            conn,
            name,
            customer,
            contract,
            key,
            attrs,
        } => signal(&conn, name, customer, contract, key, &attrs).await,
        ContractCmd::Instances {
            conn,
            contract,
            customer,
            open,
            limit,
        } => {
            instances(
                &conn,
                cpb::ListInstancesRequest {
                    contract,
                    customer_id: customer,
                    open_only: open,
                    limit,
                },
            )
            .await
        }
        ContractCmd::Evidence {
            conn,
            instance,
            out,
            verify,
            key,
        } => evidence(&conn, instance, out, verify, key).await,
        ContractCmd::Validate { manifest, schema } => {
            let m = load(&manifest, schema.as_deref())?;
            println!(
                "OK: contract {} v{} ({} trigger(s), {} action(s){}), sha256 {}",
                m.id,
                m.version,
                m.triggers.len(),
                m.actions.len(),
                if m.guest.is_some() {
                    ", a guest module"
                } else {
                    ""
                },
                hex::encode(m.hash())
            );
            Ok(())
        }
        ContractCmd::Test {
            manifest,
            events,
            until,
            json,
            schema,
            policies,
        } => {
            let m = load(&manifest, schema.as_deref())?;
            let text = read_file(&events, MAX_EVENTS_FILE)?;
            let text = String::from_utf8(text)
                .map_err(|_| Failure::Usage(format!("{}: not UTF-8", events.display())))?;
            let pol = match &policies {
                Some(d) => Policies::load_dir(d),
                None => Policies::embedded(),
            }
            .map_err(VaultError::from)?;
            let schema = match &schema {
                Some(p) => Schema::load(p)?,
                None => Schema::default_crm(),
            };
            let mut decide = |p: &Planned, c: &CustomerFacts| decide(&pol, &schema, &m, p, c);
            let report =
                dry_run_decided(&m, &text, until, Some(&mut decide)).map_err(|e| match e {
                    ContractError::Event(e) => Failure::Usage(format!("{}: {e}", events.display())),
                    other => Failure::Verify(other.to_string()),
                })?;
            if json {
                let out = serde_json::to_string_pretty(&report)
                    .map_err(|e| Failure::Local(format!("cannot encode the report: {e}")))?;
                println!("{out}");
            } else {
                print_report(&report);
            }
            Ok(())
        }
    }
}

/// The schema's fields as CEL types, as the server checks them.
fn field_types(schema: Option<&Path>) -> Result<BTreeMap<String, CelType>, Failure> {
    let s = match schema {
        Some(p) => Schema::load(p)?,
        None => Schema::default_crm(),
    };
    Ok(sovra_vault::contracts::field_types(&s))
}

/// Sends a manifest and the guest module it names to the server.
async fn register(conn: &Conn, manifest: &Path) -> CmdResult {
    let text = read_file(manifest, MAX_MANIFEST_FILE)?;
    let text = String::from_utf8(text)
        .map_err(|_| Failure::Usage(format!("{}: not UTF-8", manifest.display())))?;
    let guest = match sovra_contracts::manifest::guest_module_name(&text) {
        Some(m) if !sovra_contracts::manifest::is_bare_file_name(&m) => {
            return Err(Failure::Usage(format!(
                "{}: `[guest] module` must be a file name beside the manifest, not `{m:.80}`",
                manifest.display()
            )))
        }
        Some(m) => {
            let p = manifest.parent().unwrap_or(Path::new(".")).join(m);
            read_file(&p, MAX_GUEST_FILE)?
        }
        None => Vec::new(),
    };
    let mut c = connect_contracts(conn).await?;
    let r = c
        .register_contract(cpb::RegisterContractRequest {
            manifest: text,
            guest,
            file_name: manifest.display().to_string(),
        })
        .await?
        .into_inner();
    print_contract(&r);
    Ok(())
}

/// Most `--attr` a signal carries.
const MAX_ATTRS: usize = 32;

async fn signal(
    conn: &Conn,
    name: String,
    customer: String,
    contract: String,
    key: String,
    attrs: &[String],
) -> CmdResult {
    if attrs.len() > MAX_ATTRS {
        return Err(Failure::Usage(format!("at most {MAX_ATTRS} --attr")));
    }
    let mut map = std::collections::HashMap::new();
    for a in attrs {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("--attr `{a:.80}`: expected NAME=VALUE")))?;
        let kind = if let Ok(i) = v.parse::<i64>() {
            cpb::value::Kind::Integer(i)
        } else if let Ok(b) = v.parse::<bool>() {
            cpb::value::Kind::Boolean(b)
        } else {
            cpb::value::Kind::Text(v.to_owned())
        };
        map.insert(k.to_owned(), cpb::Value { kind: Some(kind) });
    }
    let mut c = connect_contracts(conn).await?;
    let r = c
        .signal(cpb::SignalRequest {
            name,
            customer_id: customer,
            contract,
            idempotency_key: key,
            attrs: map,
        })
        .await?
        .into_inner();
    if r.replayed {
        println!("replayed: this key was used before; nothing new was started");
    }
    if r.instances.is_empty() {
        println!("no enabled contract is triggered by this signal");
    }
    for i in &r.instances {
        print_instance(i);
    }
    Ok(())
}

async fn list(conn: &Conn, all: bool) -> CmdResult {
    let mut c = connect_contracts(conn).await?;
    let r = c
        .list_contracts(cpb::ListContractsRequest {
            include_disabled: all,
        })
        .await?
        .into_inner();
    if r.contracts.is_empty() {
        println!("no contracts");
    }
    for k in &r.contracts {
        println!(
            "{} v{}{} sha256 {} purpose {} triggers {}",
            k.id,
            k.version,
            if k.disabled { " (disabled)" } else { "" },
            k.sha256,
            k.purpose,
            k.triggers.join(",")
        );
    }
    Ok(())
}

async fn instances(conn: &Conn, req: cpb::ListInstancesRequest) -> CmdResult {
    let mut c = connect_contracts(conn).await?;
    let r = c.list_instances(req).await?.into_inner();
    if r.instances.is_empty() {
        println!("no instances");
    }
    for i in &r.instances {
        print_instance(i);
    }
    Ok(())
}

fn print_instance(i: &cpb::Instance) {
    println!(
        "instance {} {} v{} {} {}{}",
        i.id,
        i.contract,
        i.version,
        i.trigger,
        i.state,
        if i.failure.is_empty() {
            String::new()
        } else {
            format!(": {}", i.failure)
        }
    );
    for a in &i.actions {
        println!(
            "  {} {} {}{}{}",
            a.handle,
            a.kind,
            a.state,
            if a.due_at_ms > 0 {
                format!(" due {}", a.due_at_ms)
            } else {
                String::new()
            },
            if a.completed_by.is_empty() {
                String::new()
            } else {
                format!(" by {}", a.completed_by)
            }
        );
    }
}

/// Largest evidence report `--verify` reads.
const MAX_REPORT_FILE: u64 = sovra_vault::contracts::evidence::MAX_REPORT_BYTES as u64;

async fn evidence(
    conn: &Conn,
    instance: Option<u64>,
    out: Option<PathBuf>,
    verify: Option<PathBuf>,
    key: Option<PathBuf>,
) -> CmdResult {
    use sovra_vault::contracts::evidence;
    let key = match &key {
        Some(p) => Some(
            String::from_utf8(read_file(p, 64 * 1024)?)
                .map_err(|_| Failure::Usage(format!("{}: not UTF-8", p.display())))?,
        ),
        None => None,
    };
    let json = match (&verify, instance) {
        (Some(path), _) => read_file(path, MAX_REPORT_FILE)?,
        (None, Some(id)) => {
            let mut c = connect_contracts(conn).await?;
            c.get_evidence(cpb::GetEvidenceRequest { instance: id })
                .await?
                .into_inner()
                .json
                .into_bytes()
        }
        (None, None) => return Err(Failure::Usage("--instance or --verify".into())),
    };
    let v = evidence::verify(&json, key.as_deref()).map_err(|e| match e {
        VaultError::InvalidArgument(_) => Failure::Usage(e.to_string()),
        e => Failure::Verify(format!("REFUSED: {e}")),
    })?;
    if verify.is_none() {
        match &out {
            Some(p) => std::fs::write(p, &json)
                .map_err(|e| Failure::Local(format!("{}: {e}", p.display())))?,
            None => println!("{}", String::from_utf8_lossy(&json)),
        }
    }
    if verify.is_some() || out.is_some() {
        println!(
            "OK: {} entries proven against a checkpoint of size {} ({})",
            v.entries,
            v.tree_size,
            if v.key_pinned {
                "your key"
            } else {
                "the report's own key: pin yours with --key to prove origin"
            }
        );
        for o in &v.obligations {
            let due = if o.due_ms > 0 {
                format!("due {}", o.due_ms)
            } else {
                "no deadline".to_owned()
            };
            let mut line = format!("  {} ({}) {due}: {}", o.action, o.kind, o.outcome);
            if o.at_ms > 0 {
                line.push_str(&format!(" at {}", o.at_ms));
            }
            if !o.by.is_empty() {
                line.push_str(&format!(" by {}", o.by));
            }
            if !o.escalated_to.is_empty() {
                line.push_str(&format!(
                    ", escalated to {} (entry {})",
                    o.escalated_to, o.escalated_entry
                ));
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// Decides one action for the contract's workload principal, as the
/// server will: a customer action on the customer, a field action on each
/// field, a workload submission on the tenant. An error is a denial.
pub(crate) fn decide(
    pol: &Policies,
    schema: &Schema,
    m: &Manifest,
    p: &Planned,
    c: &CustomerFacts,
) -> ActionDecision {
    let customer = CustomerAttrs {
        consents: c.consents.clone(),
        withdrawn: c.withdrawn.clone(),
        kind: c.kind.clone(),
        contract_value: c.contract_value,
    };
    let principal = sovra_vault::contracts::runtime::contract_principal(m);
    let (allowed, policies) = sovra_vault::contracts::runtime::decide(
        pol, schema, &principal, "default", m, p, &customer,
    );
    ActionDecision { allowed, policies }
}

fn load(manifest: &Path, schema: Option<&Path>) -> Result<Manifest, Failure> {
    let fields = field_types(schema)?;
    Manifest::load(manifest, &fields).map_err(|e| Failure::Verify(e.to_string()))
}

fn print_contract(k: &cpb::Contract) {
    println!("contract     {} v{}", k.id, k.version);
    println!("sha256       {}", k.sha256);
    println!("purpose      {} (department {})", k.purpose, k.department);
    println!("triggers     {}", k.triggers.join(", "));
    println!("capabilities {}", k.capabilities.join(", "));
    println!("actions      {}", k.actions.join(", "));
    println!("guest        {}", if k.has_guest { "yes" } else { "no" });
    println!(
        "registered   by {} at {} (ledger entry {})",
        k.registered_by, k.registered_at_ms, k.registered_entry
    );
    if k.disabled {
        println!("disabled     yes (ledger entry {})", k.disabled_entry);
    }
}

fn print_report(r: &sovra_contracts::DryRun) {
    println!("contract {} sha256 {}", r.contract, r.hash);
    for s in &r.steps {
        if let Some(id) = &s.completed {
            println!("line {:>3} at {}: completed {id}", s.line, s.at_ms);
            continue;
        }
        if let Some(e) = &s.error {
            println!("line {:>3} at {}: FAILED instance: {e}", s.line, s.at_ms);
            continue;
        }
        let Some(ev) = &s.evaluation else { continue };
        if !ev.triggered {
            println!("line {:>3} at {}: not triggered", s.line, s.at_ms);
            continue;
        }
        let cond = match ev.condition {
            Some(true) => "condition true",
            Some(false) => "condition false",
            None => "no condition",
        };
        println!(
            "line {:>3} at {}: triggered, {cond}, fuel {}, input sha256 {}, {} action(s)",
            s.line,
            s.at_ms,
            ev.fuel_used,
            ev.input_digest,
            ev.actions.len()
        );
        for a in &ev.actions {
            let due = a
                .due_ms
                .map(|d| {
                    format!(
                        ", due {d}, escalate to {}",
                        a.escalate_to.as_deref().unwrap_or("?")
                    )
                })
                .unwrap_or_default();
            let from = if a.from_guest { " (guest)" } else { "" };
            let decision = match &a.decision {
                Some(d) if d.allowed => format!(" [allowed by {}]", d.policies.join(", ")),
                Some(d) => format!(" [DENIED by {}: not taken]", d.policies.join(", ")),
                None => String::new(),
            };
            println!("    {} {}{from} {}{due}{decision}", a.kind, a.id, a.detail);
        }
    }
    if !r.obligations.is_empty() {
        println!("obligations:");
        for o in &r.obligations {
            let when = o.at_ms.map(|t| format!(" at {t}")).unwrap_or_default();
            let to = o
                .escalated_to
                .as_deref()
                .filter(|_| o.outcome == "escalated")
                .map(|t| format!(" to {t}"))
                .unwrap_or_default();
            let late = o
                .completed_late_ms
                .map(|t| format!(", completed late at {t}"))
                .unwrap_or_default();
            println!(
                "    instance {} {} due {}: {}{when}{to}{late}",
                o.instance, o.action, o.due_ms, o.outcome
            );
        }
    }
}
