//! `sovra lineage`: where a field's value came from, who used it, what was
//! derived from it; the tenant's OpenLineage export.

use std::path::PathBuf;

use clap::Subcommand;
use sovra_proto::lineage::v1 as lpb;
use sovra_vault::lineage::{openlineage, view as lineage_view};

use crate::common::{connect_lineage, CmdResult, Conn, Failure};

#[derive(Subcommand)]
pub enum LineageCmd {
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

/// Runs a `sovra lineage` command.
pub async fn run(cmd: LineageCmd) -> CmdResult {
    match cmd {
        LineageCmd::Show {
            conn,
            customer,
            field,
        } => {
            let l = connect_lineage(&conn)
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
            let mut c = connect_lineage(&conn).await?;
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
            let d = connect_lineage(&conn)
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
        } => export(&conn, openlineage, out).await?,
    }
    Ok(())
}

/// `sovra lineage export`: OpenLineage RunEvents, to a file or standard
/// output.
async fn export(conn: &Conn, openlineage: bool, out: Option<PathBuf>) -> CmdResult {
    if !openlineage {
        return Err(Failure::Usage(
            "choose an export format: --openlineage".into(),
        ));
    }
    let e = connect_lineage(conn)
        .await?
        .export_lineage(lpb::ExportLineageRequest {})
        .await?
        .into_inner();
    let events = openlineage::run_events(&e);
    let text = openlineage::to_json_lines(&events);
    match out {
        Some(path) => {
            std::fs::write(&path, text)
                .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", path.display())))?;
            eprintln!(
                "wrote {} OpenLineage RunEvents to {}",
                events.len(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}
