//! `sovra contract`: CRM contracts, offline. `validate` checks a manifest
//! and its guest module (every problem at `file:line:column`); `test` runs
//! it over an events file and prints what it would decide and do, and each
//! obligation's outcome, with no side effect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use sovra_contracts::{dry_run, CelType, ContractError, Manifest};
use sovra_vault::schema::{FieldType, Schema};

use crate::common::{read_file, CmdResult, Failure};

/// Longest events file `sovra contract test` reads.
const MAX_EVENTS_FILE: u64 = 16 * 1024 * 1024;

#[derive(Subcommand)]
pub enum ContractCmd {
    /// Check a manifest and its guest module offline (exit 1 naming file, line and problem).
    Validate {
        /// The manifest (TOML); its `[guest] module` is read from beside it.
        manifest: PathBuf,
        /// The schema whose fields it may read (default: the built-in CRM schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Dry run: evaluate a manifest on the events of a JSON-lines file and
    /// print decisions, actions and obligations, with no side effects.
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
    },
}

/// Runs a `sovra contract` command.
pub fn run(cmd: ContractCmd) -> CmdResult {
    match cmd {
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
        } => {
            let m = load(&manifest, schema.as_deref())?;
            let text = read_file(&events, MAX_EVENTS_FILE)?;
            let text = String::from_utf8(text)
                .map_err(|_| Failure::Usage(format!("{}: not UTF-8", events.display())))?;
            let report = dry_run(&m, &text, until).map_err(|e| match e {
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

/// The schema's fields as CEL types (timestamps are integers of ms).
fn field_types(schema: Option<&Path>) -> Result<BTreeMap<String, CelType>, Failure> {
    let s = match schema {
        Some(p) => Schema::load(p)?,
        None => Schema::default_crm(),
    };
    Ok(s.fields()
        .iter()
        .map(|f| {
            let t = match f.ty {
                FieldType::String => CelType::String,
                FieldType::Integer | FieldType::Timestamp => CelType::Int,
            };
            (f.name.clone(), t)
        })
        .collect())
}

fn load(manifest: &Path, schema: Option<&Path>) -> Result<Manifest, Failure> {
    let fields = field_types(schema)?;
    Manifest::load(manifest, &fields).map_err(|e| Failure::Verify(e.to_string()))
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
            println!("    {} {}{from} {}{due}", a.kind, a.id, a.detail);
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
            println!(
                "    instance {} {} due {}: {}{when}{to}",
                o.instance, o.action, o.due_ms, o.outcome
            );
        }
    }
}
