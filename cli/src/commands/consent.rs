//! `sovra consent`: customers' consent on the ledger, with verified
//! receipts.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sovra_proto::ledger::v1 as lpb;

use crate::common::{connect_ledger, read_file, write_file, CmdResult, Conn, Failure};

#[derive(Args, Clone)]
pub struct ConsentArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Customer id.
    #[arg(long)]
    pub customer: String,
    /// Purpose (see `sovra schema`).
    #[arg(long)]
    pub purpose: String,
    /// Collection channel.
    #[arg(long, default_value = "cli")]
    pub channel: String,
    /// Legal basis: consent, contract, legal_obligation, vital_interests, public_task, legitimate_interests.
    #[arg(long, default_value = "consent")]
    pub legal_basis: String,
    /// Version of the privacy notice shown.
    #[arg(long, default_value = "v1")]
    pub notice_version: String,
    /// Evidence file (signed form, recording): only its SHA-256 is sent.
    #[arg(long, conflicts_with = "evidence_sha256")]
    pub evidence: Option<PathBuf>,
    /// SHA-256 of the evidence, 64 hex digits.
    #[arg(long)]
    pub evidence_sha256: Option<String>,
    /// Write the receipt (entry and tlog-proof) to this file.
    #[arg(long)]
    pub receipt_out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ConsentCmd {
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

/// Runs a `sovra consent` command.
pub async fn run(cmd: ConsentCmd) -> CmdResult {
    let (a, action) = match cmd {
        ConsentCmd::Grant(a) => (a, lpb::ConsentAction::Grant),
        ConsentCmd::Withdraw(a) => (a, lpb::ConsentAction::Withdraw),
        ConsentCmd::State { conn, customer } => return state(&conn, customer).await,
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

/// `sovra consent state`: the customer's current consent per purpose.
async fn state(conn: &Conn, customer: String) -> CmdResult {
    let mut c = connect_ledger(conn).await?;
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
    Ok(())
}
