//! Which refused reads reach the ledger: every read the policies refuse,
//! including those refused before the customer is looked up, and none of
//! those shows whether the customer exists.

use sovra_vault::access::auth::Role;
use sovra_vault::config;
use tonic::Code;

use sovra_testkit::*;

/// The `field_revealed` entries of the ledger, decoded.
async fn reveals(url: &str, officer: &str) -> Vec<serde_json::Value> {
    ledger_entries(url, officer)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "field_revealed")
        .collect()
}

/// The parts of a reveal entry a reader could compare.
fn shape(v: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "subject": v["subject"], "actor": v["actor"], "role": v["role"],
        "purpose": v["purpose"], "decision": v["decision"], "reason": v["reason"],
        "fields": v["fields"], "lineage": v["lineage"],
    })
}

#[tokio::test]
async fn refused_reads_are_recorded_without_showing_whether_the_customer_exists() {
    let env = Env::new();
    // A service that may declare only `billing`.
    let mut cfg = env.config();
    let billing = cfg
        .add_principal_with(
            "billing-svc",
            Role::Service,
            "default",
            "sales",
            &["billing"],
        )
        .unwrap()
        .token
        .to_string();
    config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("c-1", &[("phone", text("+33 6 12 34 56 78"))]))
        .await
        .unwrap();
    let before = reveals(&srv.url, &env.officer).await.len();

    // Refused at the pre-check: roles that never read values, and a purpose
    // the principal may not declare; for a customer that exists and one that
    // does not, with the same answer.
    let cases = [
        (&env.officer, "customer_service", "dpo"),
        (&env.partner, "lead_scoring", "partner"),
        (&env.admin, "customer_service", "admin"),
        (&billing, "marketing", "billing-svc"),
    ];
    for (token, purpose, _) in &cases {
        let mut c = srv.client(Some(token)).await;
        let there = c
            .get_fields(get("c-1", &["phone"], purpose))
            .await
            .unwrap_err();
        let absent = c
            .get_fields(get("nobody", &["phone"], purpose))
            .await
            .unwrap_err();
        assert_eq!(there.code(), Code::PermissionDenied, "{}", there.message());
        assert_eq!(absent.code(), there.code());
        assert_eq!(absent.message(), there.message(), "the answer is the same");
    }
    // Not refusals, not recorded: a malformed request, and a read of a
    // customer that does not exist by a caller that could read it.
    let e = svc
        .get_fields(get("c-1", &["phone"], "curiosity"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = svc
        .get_fields(get("nobody", &["phone"], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let all = reveals(&srv.url, &env.officer).await;
    let new = &all[before..];
    assert_eq!(new.len(), 2 * cases.len(), "{new:#?}");
    let zero = "0".repeat(64);
    for (_, purpose, actor) in &cases {
        let mine: Vec<_> = new.iter().filter(|v| v["actor"] == *actor).collect();
        assert_eq!(mine.len(), 2, "{actor}: {new:#?}");
        assert_eq!(shape(mine[0]), shape(mine[1]), "{actor}: indistinguishable");
        let v = mine[0];
        assert_eq!(v["decision"], "denied");
        assert_eq!(v["purpose"], *purpose);
        assert_eq!(v["subject"], zero.as_str());
        assert_eq!(v["lineage"], zero.as_str());
        assert!(
            v["reason"].as_str().unwrap().starts_with("policies:"),
            "{v}"
        );
        assert_eq!(v["fields"][0]["field"], "phone");
        assert_eq!(v["fields"][0]["disclosure"], "withheld");
    }
    srv.stop().await;
}
