//! Ledger fixtures: a consent request, and the caller's view of the log,
//! decoded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovra_proto::ledger::v1 as lpb;
use sovra_vault::client;

/// A consent grant (or withdrawal) of `customer` for `purpose`, from the
/// web form under notice 2026-11.
pub fn consent(customer: &str, purpose: &str, grant: bool) -> lpb::RecordConsentRequest {
    lpb::RecordConsentRequest {
        customer_id: customer.into(),
        purpose: purpose.into(),
        action: if grant {
            lpb::ConsentAction::Grant
        } else {
            lpb::ConsentAction::Withdraw
        } as i32,
        channel: "web_form".into(),
        legal_basis: "consent".into(),
        notice_version: "2026-11".into(),
        evidence_sha256: vec![7; 32],
    }
}

/// Every ledger entry `token` may read (its tenant's and the server-wide
/// ones), streamed with `GetEntries` and decoded: (index, JSON).
pub async fn ledger_entries(url: &str, token: &str) -> Vec<(u64, serde_json::Value)> {
    let mut l = client::connect_ledger(url, Some(token), None)
        .await
        .unwrap();
    let mut s = l
        .get_entries(lpb::GetEntriesRequest { start: 0, end: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        out.push((e.index, serde_json::from_str(&e.decoded_json).unwrap()));
    }
    out
}
