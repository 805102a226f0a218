//! `sovra policy`: validate a policy directory, show or reload the set in
//! force, and explain a decision, on the server or offline from files.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use sovra_policy::{Action, CustomerAttrs, Policies};
use sovra_proto::policy::v1 as ppb;
use sovra_vault::access::policy::{context, explain};
use sovra_vault::config::Config;
use sovra_vault::VaultError;

use crate::common::{connect_policy, CmdResult, Conn, Failure};

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum PolicyCmd {
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

/// Runs a `sovra policy` command.
pub async fn run(cmd: PolicyCmd) -> CmdResult {
    match cmd {
        PolicyCmd::Validate { dir } => validate(&dir),
        PolicyCmd::Status { conn } => {
            let mut c = connect_policy(&conn).await?;
            let s = c
                .get_policy_status(ppb::GetPolicyStatusRequest {})
                .await?
                .into_inner();
            print_policy_status(&s);
            Ok(())
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
            Ok(())
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
                Some(dir) => explain_offline(
                    &dir,
                    &config,
                    &OfflineQuestion {
                        principal,
                        action,
                        field,
                        purpose,
                        approvals,
                        customer: CustomerAttrs {
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
            Ok(())
        }
    }
}

/// `sovra policy validate`: loads the directory as the server would.
fn validate(dir: &Path) -> CmdResult {
    match Policies::load_dir(dir) {
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
            Ok(())
        }
        Err(sovra_policy::PolicyError::Invalid(e)) => {
            let lines: Vec<String> = e.problems().iter().map(|p| format!("  {p}")).collect();
            Err(Failure::Verify(format!(
                "{} problem(s) in {}:\n{}",
                lines.len(),
                dir.display(),
                lines.join("\n")
            )))
        }
        Err(e) => Err(Failure::Verify(e.to_string())),
    }
}

fn print_policy_status(s: &ppb::PolicyStatus) {
    println!("policy set sha256 {}", s.sha256);
    println!("source            {}", s.source);
    println!("files             {}", s.files.join(", "));
    println!("policies          {}", s.policy_ids.len());
    match s.ledger_index {
        Some(i) => println!("recorded in ledger entry {i}"),
        None => println!("recorded in the ledger by an earlier start"),
    }
}

/// A question for [`explain_offline`].
#[derive(Debug, Clone)]
pub struct OfflineQuestion {
    /// The principal's configured name.
    pub principal: String,
    /// The Cedar action id.
    pub action: String,
    /// The field ("" for none).
    pub field: String,
    /// The declared purpose ("" for none).
    pub purpose: String,
    /// Approvals to assume.
    pub approvals: u32,
    /// The customer's attributes, as given.
    pub customer: CustomerAttrs,
}

/// Explains a decision from files alone: the policies in `dir`, the
/// principal and schema named by the configuration at `config_path`. It
/// evaluates exactly as the server's `Explain` does (the vault's
/// `access::policy::explain`), so an operator can try a policy change
/// before deploying it.
pub fn explain_offline(
    dir: &Path,
    config_path: &Path,
    q: &OfflineQuestion,
) -> Result<ppb::Explanation, Failure> {
    let pol = Policies::load_dir(dir).map_err(VaultError::from)?;
    let cfg = Config::load(config_path)?;
    let schema = cfg.load_schema()?;
    let auth = cfg.authenticator()?;
    // Worded as the vault's invalid-argument errors are.
    let subject = auth.by_name(&q.principal).ok_or_else(|| {
        Failure::Local(format!(
            "invalid `principal`: no principal named `{}` in {}",
            q.principal,
            config_path.display()
        ))
    })?;
    let action = Action::from_name(&q.action).ok_or_else(|| {
        Failure::Local(format!(
            "invalid `action`: unknown action; one of {}",
            Action::ALL.map(Action::name).join(", ")
        ))
    })?;
    if !q.purpose.is_empty() {
        schema.check_purpose(&q.purpose)?;
    }
    let field = match action.target() {
        sovra_policy::Target::Field => Some(&schema.field(&q.field)?.policy),
        _ => None,
    };
    let ctx = context(&q.purpose, i64::from(q.approvals));
    Ok(explain(&pol, &subject, action, field, &q.customer, &ctx)?)
}
