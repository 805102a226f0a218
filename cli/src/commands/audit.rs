//! `sovra audit`: checkpoints, audit bundles, consistency proofs, and the
//! offline verification of bundles (no server).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use sovra_proto::ledger::v1 as lpb;

use crate::common::{connect_ledger, read_file, write_file, CmdResult, Conn, Failure};

#[derive(Subcommand)]
pub enum AuditCmd {
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

/// Runs a `sovra audit` command.
pub async fn run(cmd: AuditCmd) -> CmdResult {
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
        AuditCmd::Checkpoint { conn, out } => checkpoint(&conn, out).await,
        AuditCmd::Bundle {
            conn,
            customer,
            from_ms,
            to_ms,
            since,
            out,
        } => export_bundle(&conn, customer, from_ms, to_ms, since, &out).await,
        AuditCmd::Consistency {
            conn,
            since,
            to_size,
            bundle,
            out,
        } => consistency(&conn, &since, to_size, bundle, &out).await,
    }
}

/// The verifier key given inline, or read from the file it names (a key
/// holds a `+`, a path need not).
fn read_key(key: &str) -> Result<String, Failure> {
    let p = Path::new(key);
    if !key.contains('+') && p.exists() {
        return Ok(String::from_utf8_lossy(&read_file(p, 4096)?)
            .trim()
            .to_owned());
    }
    Ok(key.trim().to_owned())
}

/// `sovra audit verify`: checks a bundle with no server, printing what it
/// established and each entry.
fn verify_offline(
    bundle: &Path,
    key: Option<&str>,
    since: Option<&Path>,
    consistency: Option<&Path>,
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

/// `sovra audit checkpoint`: the latest signed checkpoint, verified.
async fn checkpoint(conn: &Conn, out: Option<PathBuf>) -> CmdResult {
    let mut c = connect_ledger(conn).await?;
    let cp = c
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await?
        .into_inner();
    sovra_ledger::verify_checkpoint(cp.note.as_bytes(), &cp.verifier_key)
        .map_err(|e| Failure::Verify(format!("the server's checkpoint does not verify: {e}")))?;
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

/// `sovra audit bundle`: a customer's audit bundle, written to `out`.
async fn export_bundle(
    conn: &Conn,
    customer: String,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    since: Option<PathBuf>,
    out: &Path,
) -> CmdResult {
    let since_size = match since {
        Some(p) => checkpoint_size(&read_file(&p, 1 << 20)?)?,
        None => 0,
    };
    let mut c = connect_ledger(conn).await?;
    let b = c
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: customer.clone(),
            from_ms: from_ms.unwrap_or(0),
            to_ms: to_ms.unwrap_or(0),
            consistency_from_size: since_size,
        })
        .await?
        .into_inner();
    write_file(out, b.json.as_bytes())?;
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

/// `sovra audit consistency`: a consistency proof from an older checkpoint
/// to a newer tree size, written to `out`.
async fn consistency(
    conn: &Conn,
    since: &Path,
    to_size: Option<u64>,
    bundle: Option<PathBuf>,
    out: &Path,
) -> CmdResult {
    let from = checkpoint_size(&read_file(since, 1 << 20)?)?;
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
    let mut c = connect_ledger(conn).await?;
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
        .map_err(|_| Failure::Verify("the server sent a hash that is not 32 bytes".into()))?;
    let doc = sovra_ledger::ConsistencyProof::new(p.from_size, p.to_size, &hashes);
    let json = serde_json::to_string_pretty(&doc)
        .map_err(|e| Failure::Usage(format!("cannot render the proof: {e}")))?;
    write_file(out, json.as_bytes())?;
    println!(
        "consistency proof from tree size {} to {} written to {}",
        p.from_size,
        p.to_size,
        out.display()
    );
    Ok(())
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
