//! The contract runtime through the real gRPC server: the four shipped
//! CRM contracts run end to end (signals and vault events, the outbox,
//! completions, deadlines escalated across a restart, a withdrawal that
//! cancels), the evidence report verified offline and refused when
//! tampered with, and the runtime's bad inputs.

use std::path::Path;
use std::time::Duration;

use sovra_proto::contracts::v1 as cpb;
use sovra_proto::vault::v1 as pb;
use sovra_testkit::*;
use sovra_vault::access::auth::Role;
use sovra_vault::client::{self, ContractsClient};
use sovra_vault::contracts::evidence;
use tonic::Code;

pub(crate) fn crm(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contracts/crm")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

/// A shipped manifest with `edits` (from, to) applied: tests shorten
/// deadlines so that a missed one is seen in seconds.
pub(crate) fn shipped(name: &str, edits: &[(&str, &str)]) -> cpb::RegisterContractRequest {
    let mut manifest = std::fs::read_to_string(crm(&format!("{name}.toml"))).unwrap();
    for (from, to) in edits {
        assert!(manifest.contains(from), "{name}: no `{from}`");
        manifest = manifest.replace(from, to);
    }
    let guest = sovra_contracts::manifest::guest_module_name(&manifest)
        .map(|m| std::fs::read(crm(&m)).unwrap())
        .unwrap_or_default();
    cpb::RegisterContractRequest {
        manifest,
        guest,
        file_name: format!("{name}.toml"),
    }
}

pub(crate) async fn contracts(url: &str, token: &str) -> ContractsClient {
    client::connect_contracts(url, Some(token), None)
        .await
        .unwrap()
}

pub(crate) fn signal(name: &str, customer: &str, key: &str) -> cpb::SignalRequest {
    cpb::SignalRequest {
        name: name.into(),
        customer_id: customer.into(),
        contract: String::new(),
        idempotency_key: key.into(),
        attrs: Default::default(),
    }
}

pub(crate) fn int_attr(i: i64) -> cpb::Value {
    cpb::Value {
        kind: Some(cpb::value::Kind::Integer(i)),
    }
}

/// Takes `n` deliveries from a new `WatchActions` stream (lease `lease` s).
pub(crate) async fn take(c: &mut ContractsClient, n: usize, lease: u32) -> Vec<cpb::Action> {
    let mut s = c
        .watch_actions(cpb::WatchActionsRequest {
            kinds: vec![],
            contract: String::new(),
            lease_seconds: lease,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} actions delivered: {out:?}", out.len()))
            .unwrap()
            .unwrap();
        out.push(d.action.unwrap());
    }
    out
}

/// Polls the instance until `f` holds (10 s at most).
pub(crate) async fn wait_instance(
    c: &mut ContractsClient,
    id: u64,
    f: impl Fn(&cpb::Instance) -> bool,
) -> cpb::Instance {
    for _ in 0..100 {
        let all = c
            .list_instances(cpb::ListInstancesRequest {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .instances;
        if let Some(i) = all.into_iter().find(|i| i.id == id) {
            if f(&i) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("instance {id} never reached the state asked for");
}

fn action<'a>(i: &'a cpb::Instance, id: &str) -> &'a cpb::Action {
    i.actions
        .iter()
        .find(|a| a.action_id == id)
        .unwrap_or_else(|| panic!("no action {id} in {i:?}"))
}

async fn put_customer(url: &str, token: &str, id: &str, fields: &[(&str, pb::Value)]) {
    let mut c = client::connect(url, Some(token), None).await.unwrap();
    c.put_record(put(id, fields)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poc_activation_runs_end_to_end_and_a_missed_deadline_escalates_across_a_restart() {
    let env = Env::new();
    let mut cfg = env.config();
    let other = cfg
        .add_principal_with("svc-2", Role::Service, "default", "sales", SERVICE_PURPOSES)
        .unwrap();
    let beta = cfg
        .add_principal_with("svc-beta", Role::Service, "beta", "sales", SERVICE_PURPOSES)
        .unwrap();
    let beta_officer = cfg
        .add_principal("dpo-beta", Role::Officer, "beta")
        .unwrap();
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    // The shipped contract with its 72 h deadlines shortened to 3 s.
    adm.register_contract(shipped("poc-activation", &[("\"72h\"", "\"3s\"")]))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "cust-poc",
        &[("email", text("ana@example.com"))],
    )
    .await;
    let mut svc = contracts(&srv.url, &env.service).await;

    // The signal starts one instance with its three obligations queued.
    let started = svc
        .signal(signal("poc_report_signed", "cust-poc", "poc-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!started.replayed);
    assert_eq!(started.instances.len(), 1);
    let inst = &started.instances[0];
    assert_eq!(
        (inst.contract.as_str(), inst.state.as_str()),
        ("poc-activation", "open")
    );
    assert_eq!(inst.actions.len(), 3);
    assert!(inst
        .actions
        .iter()
        .all(|a| a.state == "ready" && a.due_at_ms > 0));
    let id = inst.id;

    // The contract's read of the email is in the customer's lineage, by
    // the contract, for its purpose, anchored by the evaluation's entry.
    let mut lin = client::connect_lineage(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let acc = lin
        .list_accesses(sovra_proto::lineage::v1::ListAccessesRequest {
            customer_id: "cust-poc".into(),
            field: "email".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .accesses;
    let by_contract: Vec<_> = acc
        .iter()
        .filter_map(|a| a.activity.as_ref())
        .filter(|a| a.agent == "poc-activation")
        .collect();
    assert_eq!(by_contract.len(), 1, "{acc:?}");
    assert_eq!(by_contract[0].role, "contract");
    assert_eq!(by_contract[0].purpose, "customer_service");
    assert_eq!(
        acc.iter()
            .find(|a| a
                .activity
                .as_ref()
                .is_some_and(|x| x.agent == "poc-activation"))
            .unwrap()
            .ledger_index,
        inst.evaluated_entry
    );

    // A retry with the same key is the same instance; another signal with
    // it is refused; an unknown contract and customer are NOT_FOUND.
    let again = svc
        .signal(signal("poc_report_signed", "cust-poc", "poc-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.instances[0].id, id);
    let e = expect_code(
        svc.signal(signal("poc_report_signed", "cust-other", "poc-1"))
            .await,
        Code::AlreadyExists,
    );
    assert!(e.message().contains("idempotency_key"), "{e:?}");
    let mut unknown = signal("poc_report_signed", "cust-poc", "");
    unknown.contract = "no-such-contract".into();
    let e = expect_code(svc.signal(unknown).await, Code::NotFound);
    assert!(e.message().contains("no-such-contract"), "{e:?}");
    expect_code(
        svc.signal(signal("poc_report_signed", "nobody", "")).await,
        Code::NotFound,
    );

    // The connector gets the three actions with the customer; completes
    // two. A second completion and another principal's are refused.
    let got = take(&mut svc, 3, 60).await;
    assert!(got.iter().all(|a| a.customer_id == "cust-poc"), "{got:?}");
    for a in ["send_activation_link", "open_delivery_task"] {
        let out = svc
            .complete_action(cpb::CompleteActionRequest {
                handle: format!("{id}/{a}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!out.late && out.entry > 0);
        assert_eq!(out.action.unwrap().state, "completed");
    }
    let e = expect_code(
        svc.complete_action(cpb::CompleteActionRequest {
            handle: format!("{id}/send_activation_link"),
        })
        .await,
        Code::AlreadyExists,
    );
    assert!(e.message().contains("completed by `svc`"), "{e:?}");
    let mut svc2 = contracts(&srv.url, &other.token).await;
    let e = expect_code(
        svc2.complete_action(cpb::CompleteActionRequest {
            handle: format!("{id}/raise_receivable"),
        })
        .await,
        Code::PermissionDenied,
    );
    assert!(e.message().contains("sent to another principal"), "{e:?}");
    // Another tenant sees none of it: its handle, instance and evidence
    // are NOT_FOUND there, and its signals do not reach this tenant's
    // contracts.
    let mut b = contracts(&srv.url, &beta.token).await;
    expect_code(
        b.complete_action(cpb::CompleteActionRequest {
            handle: format!("{id}/raise_receivable"),
        })
        .await,
        Code::NotFound,
    );
    let mut bo = contracts(&srv.url, &beta_officer.token).await;
    expect_code(
        bo.get_evidence(cpb::GetEvidenceRequest { instance: id })
            .await,
        Code::NotFound,
    );
    assert!(bo
        .list_instances(cpb::ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances
        .is_empty());
    expect_code(
        b.signal(signal("poc_report_signed", "cust-poc", "")).await,
        Code::NotFound,
    );
    expect_code(
        svc.complete_action(cpb::CompleteActionRequest {
            handle: "not a handle".into(),
        })
        .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.complete_action(cpb::CompleteActionRequest {
            handle: format!("{}/raise_receivable", id + 1000),
        })
        .await,
        Code::NotFound,
    );

    // The server stops before the deadline and starts after it: the timer
    // survived and fires; the missed obligation is escalated.
    srv.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let srv = env.start().await;
    let mut off = contracts(&srv.url, &env.officer).await;
    let inst = wait_instance(&mut off, id, |i| {
        action(i, "raise_receivable").state == "escalated"
    })
    .await;
    assert_eq!(action(&inst, "send_activation_link").state, "completed");
    let esc = action(&inst, "escalate.raise_receivable");
    assert_eq!(esc.kind, "notify");
    assert!(
        esc.detail_json
            .contains("department:customer_success_director"),
        "{esc:?}"
    );

    // The evidence report verifies offline, with the log's key pinned.
    let report = off
        .get_evidence(cpb::GetEvidenceRequest { instance: id })
        .await
        .unwrap()
        .into_inner();
    let key = ledger_key(&srv.url, &env.officer).await;
    let v = evidence::verify(report.json.as_bytes(), Some(&key)).unwrap();
    let outcome = |a: &str| {
        v.obligations
            .iter()
            .find(|o| o.action == a)
            .unwrap_or_else(|| panic!("{a}: {:?}", v.obligations))
            .clone()
    };
    assert_eq!(outcome("send_activation_link").outcome, "kept");
    assert_eq!(outcome("send_activation_link").by, "svc");
    assert_eq!(outcome("raise_receivable").outcome, "escalated");
    assert_eq!(
        outcome("raise_receivable").escalated_to,
        "department:customer_success_director"
    );
    // No customer id or email in it.
    assert!(!report.json.contains("cust-poc") && !report.json.contains("ana@"));

    // Tampered: an obligation claimed kept, an entry dropped, a proof
    // altered: each refused, naming what failed.
    let mut r: serde_json::Value = serde_json::from_str(&report.json).unwrap();
    let o = r["obligations"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|o| o["action"] == "raise_receivable")
        .unwrap();
    o["outcome"] = "kept".into();
    let e = evidence::verify(r.to_string().as_bytes(), Some(&key)).unwrap_err();
    assert!(
        e.to_string().contains("obligation `raise_receivable`"),
        "{e}"
    );
    let mut r: serde_json::Value = serde_json::from_str(&report.json).unwrap();
    r["entries"].as_array_mut().unwrap().remove(0);
    let e = evidence::verify(r.to_string().as_bytes(), Some(&key)).unwrap_err();
    assert!(e.to_string().contains("evaluation"), "{e}");
    let mut r: serde_json::Value = serde_json::from_str(&report.json).unwrap();
    let last = r["entries"].as_array().unwrap().len() - 1;
    r["entries"][last]["decoded"]["actor"] = "someone-else".into();
    let e = evidence::verify(r.to_string().as_bytes(), Some(&key)).unwrap_err();
    assert!(e.to_string().contains("`decoded` part"), "{e}");
    let e = evidence::verify(report.json.as_bytes(), Some("other+key+AAAA")).unwrap_err();
    assert!(e.to_string().contains("different verifier key"), "{e}");
    srv.stop().await;
}

/// The log's verifier key, as an officer fetches it.
pub(crate) async fn ledger_key(url: &str, token: &str) -> String {
    let mut l = client::connect_ledger(url, Some(token), None)
        .await
        .unwrap();
    l.get_checkpoint(sovra_proto::ledger::v1::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
        .verifier_key
}

fn fixture(name: &str) -> cpb::RegisterContractRequest {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/contracts");
    let manifest = std::fs::read_to_string(dir.join(name)).unwrap();
    let guest = sovra_contracts::manifest::guest_module_name(&manifest)
        .map(|m| std::fs::read(dir.join(m)).unwrap())
        .unwrap_or_default();
    cpb::RegisterContractRequest {
        manifest,
        guest,
        file_name: name.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketing_withdrawal_cancels_pending_marketing_actions_and_stops_new_ones() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    adm.register_contract(fixture("marketing-follow-up.toml"))
        .await
        .unwrap();
    adm.register_contract(shipped("poc-activation", &[]))
        .await
        .unwrap();
    adm.register_contract(shipped("marketing-consent-stop", &[]))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "cust-m",
        &[("email", text("m@example.com"))],
    )
    .await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    led.record_consent(consent("cust-m", "marketing", true))
        .await
        .unwrap();
    let mut svc = contracts(&srv.url, &env.service).await;
    let follow = svc
        .signal(signal("campaign_replied", "cust-m", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(action(&follow, "follow_up").state, "ready");
    // A customer-service obligation of the same customer is not marketing's.
    let poc = svc
        .signal(signal("poc_report_signed", "cust-m", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);

    // The withdrawal: the pending marketing action is cancelled, the
    // consent-stop contract runs (it cancels and tells marketing), and the
    // customer-service obligations stay.
    led.record_consent(consent("cust-m", "marketing", false))
        .await
        .unwrap();
    let mut off = contracts(&srv.url, &env.officer).await;
    let f = wait_instance(&mut off, follow.id, |i| {
        action(i, "follow_up").state == "cancelled"
    })
    .await;
    assert_eq!(f.state, "done");
    let stop = wait_instance(&mut off, follow.id + 2, |i| {
        i.contract == "marketing-consent-stop"
    })
    .await;
    assert_eq!(stop.trigger, "consent_withdrawn:marketing");
    assert_eq!(action(&stop, "cancel_marketing").state, "completed");
    assert_eq!(action(&stop, "tell_marketing").state, "ready");
    let p = wait_instance(&mut off, poc.id, |_| true).await;
    assert!(p.actions.iter().all(|a| a.state == "ready"), "{p:?}");
    // The cancellation is in the ledger, by the runtime, with why.
    let entries = ledger_entries(&srv.url, &env.officer).await;
    assert!(entries.iter().any(|(_, e)| e["kind"] == "contract_event"
        && e["step"] == "cancelled"
        && e["action"] == "follow_up"
        && e["detail"]
            .as_str()
            .unwrap()
            .contains("consent for `marketing` withdrawn")));
    // Completing the cancelled action is refused.
    let got = take(&mut svc, 4, 60).await;
    assert!(got.iter().all(|a| a.action_id != "follow_up"), "{got:?}");

    // A new marketing signal: its action is denied by policy, never queued.
    let denied = svc
        .signal(signal("campaign_replied", "cust-m", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    let a = action(&denied, "follow_up");
    assert_eq!(a.state, "denied");
    assert!(
        a.policies.iter().any(|p| p == "contract-consent-withdrawn"),
        "{a:?}"
    );
    expect_code(
        svc.complete_action(cpb::CompleteActionRequest {
            handle: a.handle.clone(),
        })
        .await,
        Code::FailedPrecondition,
    );

    // Erasure cancels the customer's remaining obligations.
    let mut v = client::connect(&srv.url, Some(&env.admin), None)
        .await
        .unwrap();
    v.erase_customer(pb::EraseCustomerRequest {
        customer_id: "cust-m".into(),
        reason: "request".into(),
    })
    .await
    .unwrap();
    let p = wait_instance(&mut off, poc.id, |i| {
        i.actions.iter().all(|a| a.state == "cancelled")
    })
    .await;
    assert_eq!(p.state, "done");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn government_exports_ask_three_approvals_and_hot_leads_alert_sales() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    adm.register_contract(shipped("gov-export-approvals", &[]))
        .await
        .unwrap();
    adm.register_contract(shipped("lead-score-alert", &[]))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "gov-big",
        &[
            ("customer_kind", text("government")),
            ("contract_value", int(6_000_000)),
        ],
    )
    .await;
    put_customer(
        &srv.url,
        &env.service,
        "gov-small",
        &[
            ("customer_kind", text("government")),
            ("contract_value", int(10_000)),
        ],
    )
    .await;
    let mut svc = contracts(&srv.url, &env.service).await;
    let big = svc
        .signal(signal("export_requested", "gov-big", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(big.state, "open", "{big:?}");
    let a = action(&big, "three_approvals");
    assert_eq!(a.kind, "request_approvals");
    assert!(a.detail_json.contains("\"count\":3"), "{a:?}");
    assert!(a.due_at_ms > 0);
    let small = svc
        .signal(signal("export_requested", "gov-small", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(small.state, "not_met");
    assert!(small.actions.is_empty());

    // Lead scoring rests on consent: without it the alert is denied.
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "lead-1",
        &[("email", text("l@example.com"))],
    )
    .await;
    let mut hot = signal("lead_scored", "lead-1", "");
    hot.attrs.insert("score".into(), int_attr(750));
    let no_consent = svc
        .signal(hot.clone())
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(action(&no_consent, "alert_rep").state, "denied");
    led.record_consent(consent("lead-1", "lead_scoring", true))
        .await
        .unwrap();
    let alerted = svc
        .signal(hot)
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    let a = action(&alerted, "alert_rep");
    assert_eq!(a.state, "ready");
    assert!(alerted.fuel_used > 0);
    // Due 300 ms after the event.
    assert!(a.due_at_ms - alerted.created_at_ms == 300, "{alerted:?}");
    let mut cold = signal("lead_scored", "lead-1", "");
    cold.attrs.insert("score".into(), int_attr(120));
    let c = svc
        .signal(cold)
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert!(c.actions.is_empty() && c.state == "done", "{c:?}");
    // A connector of one kind gets only that kind, and one of one
    // contract only that contract's.
    let mut s = svc
        .watch_actions(cpb::WatchActionsRequest {
            kinds: vec!["notify".into()],
            lease_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let d = s.message().await.unwrap().unwrap().action.unwrap();
    assert_eq!(
        (d.kind.as_str(), d.action_id.as_str()),
        ("notify", "alert_rep")
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.message())
            .await
            .is_err()
    );
    drop(s);
    let mut s = svc
        .watch_actions(cpb::WatchActionsRequest {
            contract: "gov-export-approvals".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let d = s.message().await.unwrap().unwrap().action.unwrap();
    assert_eq!(d.action_id, "three_approvals");
    drop(s);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_guest_fails_its_instance_and_a_failing_connector_gets_retries_then_a_person() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    adm.register_contract(fixture("looping.toml"))
        .await
        .unwrap();
    adm.register_contract(fixture("flaky-connector.toml"))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "cust-f",
        &[("email", text("f@example.com"))],
    )
    .await;
    let mut svc = contracts(&srv.url, &env.service).await;
    let looped = svc
        .signal(signal("ping", "cust-f", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(looped.state, "failed");
    assert!(looped.failure.contains("fuel"), "{looped:?}");
    assert!(looped.fuel_used >= 5000, "{looped:?}");
    // The server is unaffected.
    let ok = svc
        .signal(signal("ticket_opened", "cust-f", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    let handle = format!("{}/open_ticket", ok.id);

    // Three failures: retried with backoff twice, then a manual task.
    let mut last = None;
    for attempt in 1..=3 {
        let got = take(&mut svc, 1, 60).await;
        assert_eq!(got[0].handle, handle);
        assert_eq!(got[0].attempt, attempt);
        let out = svc
            .fail_action(cpb::FailActionRequest {
                handle: handle.clone(),
                reason: "ticketing system down".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if attempt < 3 {
            assert!(
                out.retry_at_ms > 0 && out.fallback_handle.is_empty(),
                "{out:?}"
            );
            assert_eq!(out.action.as_ref().unwrap().state, "waiting");
            expect_code(
                svc.complete_action(cpb::CompleteActionRequest {
                    handle: handle.clone(),
                })
                .await,
                Code::FailedPrecondition,
            );
        }
        last = Some(out);
    }
    let out = last.unwrap();
    assert_eq!(out.action.as_ref().unwrap().state, "failed");
    assert_eq!(out.fallback_handle, format!("{}/manual.open_ticket", ok.id));
    // Three failures in a row opened the breaker.
    assert!(out.paused_until_ms > 0, "{out:?}");
    let bad_reason = svc
        .fail_action(cpb::FailActionRequest {
            handle: out.fallback_handle.clone(),
            reason: "a\u{202e}b".into(),
        })
        .await;
    expect_code(bad_reason, Code::InvalidArgument);
    // The manual task goes out while the contract is paused; a new action
    // of it does not.
    svc.signal(signal("ticket_opened", "cust-f", ""))
        .await
        .unwrap();
    let got = take(&mut svc, 1, 60).await;
    assert_eq!(got[0].handle, out.fallback_handle);
    assert_eq!(got[0].kind, "create_task");
    let mut s = svc
        .watch_actions(cpb::WatchActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), s.message())
            .await
            .is_err(),
        "a paused contract's action was delivered"
    );
    // Bad requests to the outbox.
    expect_code(
        svc.watch_actions(cpb::WatchActionsRequest {
            kinds: vec!["launch_missiles".into()],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.watch_actions(cpb::WatchActionsRequest {
            lease_seconds: 100_000,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    let mut bad = signal("Not An Identifier", "cust-f", "");
    expect_code(svc.signal(bad.clone()).await, Code::InvalidArgument);
    bad.name = "ping".into();
    bad.idempotency_key = "k".repeat(200);
    expect_code(svc.signal(bad.clone()).await, Code::InvalidArgument);
    bad.idempotency_key.clear();
    bad.attrs.insert("x".into(), cpb::Value { kind: None });
    expect_code(svc.signal(bad.clone()).await, Code::InvalidArgument);
    bad.attrs.clear();
    bad.attrs.insert(
        "x".into(),
        cpb::Value {
            kind: Some(cpb::value::Kind::Text("y".repeat(300))),
        },
    );
    expect_code(svc.signal(bad).await, Code::InvalidArgument);
    srv.stop().await;
}

/// kill -9 while signals arrive, actions are outstanding, completions are
/// being sent and timers are pending: after the restart every acknowledged
/// instance and completion is there, no completion is recorded twice,
/// what was delivered but not completed is delivered again, and the
/// pending timers fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_actions_outstanding_and_timers_pending_loses_nothing_and_completes_once() {
    use std::sync::{Arc, Mutex};
    let env = Env::new();
    let port = free_port();
    let mut child = spawn_server(crate::SOVRA, &env, port).await;
    let url = format!("http://127.0.0.1:{port}");
    let mut adm = contracts(&url, &env.admin).await;
    adm.register_contract(shipped("poc-activation", &[("\"72h\"", "\"6s\"")]))
        .await
        .unwrap();
    let mut v = client::connect(&url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 0..150 {
        v.put_record(put(&format!("k-{i}"), &[("email", text("k@example.com"))]))
            .await
            .unwrap();
    }
    let acked_instances: Arc<Mutex<Vec<u64>>> = Arc::default();
    let acked_completions: Arc<Mutex<Vec<String>>> = Arc::default();
    // Signals, one after the other, until the process dies.
    let signals = {
        let (url, token, acked) = (url.clone(), env.service.clone(), acked_instances.clone());
        tokio::spawn(async move {
            let mut c = contracts(&url, &token).await;
            for i in 0..150 {
                match c
                    .signal(signal(
                        "poc_report_signed",
                        &format!("k-{i}"),
                        &format!("sig-{i}"),
                    ))
                    .await
                {
                    Ok(r) => acked.lock().unwrap().push(r.into_inner().instances[0].id),
                    Err(_) => return,
                }
            }
        })
    };
    // A connector completing every other delivery, until the process dies.
    let connector = {
        let (url, token, acked) = (url.clone(), env.service.clone(), acked_completions.clone());
        tokio::spawn(async move {
            let mut c = contracts(&url, &token).await;
            let Ok(s) = c
                .watch_actions(cpb::WatchActionsRequest {
                    lease_seconds: 1,
                    ..Default::default()
                })
                .await
            else {
                return;
            };
            let mut s = s.into_inner();
            let mut n = 0;
            while let Ok(Some(d)) = s.message().await {
                n += 1;
                let a = d.action.unwrap();
                if n % 2 == 0 || a.action_id != "send_activation_link" {
                    continue;
                }
                match c
                    .complete_action(cpb::CompleteActionRequest {
                        handle: a.handle.clone(),
                    })
                    .await
                {
                    Ok(_) => acked.lock().unwrap().push(a.handle),
                    Err(_) => return,
                }
            }
        })
    };
    // Killed while signals and completions are in flight.
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let _ = signals.await;
    let _ = connector.await;
    let instances = acked_instances.lock().unwrap().clone();
    let completions = acked_completions.lock().unwrap().clone();
    assert!(
        !instances.is_empty(),
        "no signal was acknowledged before the kill"
    );
    eprintln!(
        "acknowledged before the kill: {} instances, {} completions",
        instances.len(),
        completions.len()
    );

    let port = free_port();
    let mut child = spawn_server(crate::SOVRA, &env, port).await;
    let url = format!("http://127.0.0.1:{port}");
    let mut off = contracts(&url, &env.officer).await;
    let all = off
        .list_instances(cpb::ListInstancesRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    for id in &instances {
        let i = all
            .iter()
            .find(|i| i.id == *id)
            .unwrap_or_else(|| panic!("acknowledged instance {id} lost"));
        assert_eq!(i.actions.len(), 3, "{i:?}");
    }
    for h in &completions {
        let (id, a) = h.split_once('/').unwrap();
        let i = all.iter().find(|i| i.id.to_string() == id).unwrap();
        assert_eq!(
            action(i, a).state,
            "completed",
            "acknowledged completion {h} lost"
        );
    }
    // What is still open is delivered again, and can be completed once.
    let open: usize = all
        .iter()
        .flat_map(|i| &i.actions)
        .filter(|a| a.state == "ready")
        .count();
    let mut svc = contracts(&url, &env.service).await;
    let again = take(&mut svc, open, 60).await;
    let mut seen = std::collections::BTreeSet::new();
    for a in &again {
        assert!(
            seen.insert(a.handle.clone()),
            "delivered twice to one stream: {}",
            a.handle
        );
        assert!(
            !completions.contains(&a.handle),
            "a completed action was delivered again"
        );
    }
    let first = again
        .iter()
        .find(|a| a.action_id == "open_delivery_task")
        .unwrap();
    svc.complete_action(cpb::CompleteActionRequest {
        handle: first.handle.clone(),
    })
    .await
    .unwrap();
    // The pending timers fire after the restart: the rest escalate.
    let last = *instances.last().unwrap();
    wait_instance(&mut off, last, |i| {
        action(i, "raise_receivable").state == "escalated"
    })
    .await;
    // No completion is recorded twice in the ledger.
    let entries = ledger_entries(&url, &env.officer).await;
    let mut completed = std::collections::BTreeMap::new();
    for (_, e) in &entries {
        if e["kind"] == "contract_event" && e["step"] == "action_completed" {
            *completed
                .entry(format!(
                    "{}/{}",
                    e["instance"],
                    e["action"].as_str().unwrap()
                ))
                .or_insert(0) += 1;
        }
    }
    assert!(completed.values().all(|n| *n == 1), "{completed:?}");
    for h in &completions {
        assert_eq!(completed.get(h), Some(&1), "{h} not in the ledger once");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Random manifests (purpose, department, fields read, actions) against
/// random customers (consents granted and withdrawn, kind, contract
/// value), through the real server: every read the contract makes and
/// every action it takes is one the policy set allows its principal, and
/// every one it denies is recorded as denied, never queued. The oracle is
/// the policy crate asked directly, not the server's code.
#[test]
fn a_contract_never_reads_or_acts_beyond_what_policy_allows_its_principal() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use sovra_policy::{
        Action, Context, CustomerAttrs, Disclosure, Policies, Principal, PrincipalKind,
    };
    use std::collections::BTreeSet;

    const PURPOSES: [&str; 9] = [
        "customer_service",
        "sales_followup",
        "marketing",
        "lead_scoring",
        "billing",
        "fraud_prevention",
        "legal_obligation",
        "analytics",
        "export",
    ];
    const DEPTS: [&str; 4] = ["sales", "finance", "legal", "marketing"];
    const FIELDS: [&str; 6] = [
        "email",
        "national_id",
        "budget",
        "customer_kind",
        "contract_value",
        "company",
    ];
    const KINDS: [&str; 4] = [
        "notify",
        "create_task",
        "request_approvals",
        "cancel_actions",
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = Env::new();
    let srv = rt.block_on(env.start());
    let (adm0, svc0, led0, v0) = rt.block_on(async {
        (
            contracts(&srv.url, &env.admin).await,
            contracts(&srv.url, &env.service).await,
            client::connect_ledger(&srv.url, Some(&env.service), None)
                .await
                .unwrap(),
            client::connect(&srv.url, Some(&env.service), None)
                .await
                .unwrap(),
        )
    });
    let pol = Policies::embedded().unwrap();
    let schema = sovra_vault::schema::Schema::default_crm();
    let n = std::cell::Cell::new(0u32);
    // (refused reads, actions allowed, actions denied): each must be seen.
    let seen = std::cell::Cell::new((0u32, 0u32, 0u32));
    let strategy = (
        prop::sample::select(PURPOSES.to_vec()),
        prop::sample::select(DEPTS.to_vec()),
        prop::sample::subsequence(FIELDS.to_vec(), 0..3),
        prop::collection::vec(
            (
                prop::sample::select(KINDS.to_vec()),
                prop::sample::select(PURPOSES.to_vec()),
            ),
            1..4,
        ),
        prop::sample::subsequence(PURPOSES.to_vec(), 0..4),
        prop::sample::subsequence(PURPOSES.to_vec(), 0..3),
        prop::sample::select(vec!["government", "enterprise", "individual"]),
        prop::sample::select(vec![1_000i64, 6_000_000]),
    );
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &strategy,
            |(purpose, dept, reads, actions, granted, withdrawn, kind, value)| {
                n.set(n.get() + 1);
                let id = n.get();
                let mut caps: BTreeSet<&str> = actions.iter().map(|(k, _)| *k).collect();
                if !reads.is_empty() {
                    caps.insert("read_fields");
                }
                let mut m = format!(
                    "id = \"prop-{id}\"\nversion = 1\npurpose = \"{purpose}\"\ndepartment = \"{dept}\"\nreads = {reads:?}\ncapabilities = {:?}\n\n[[triggers]]\non = \"signal\"\nname = \"prop_{id}\"\n",
                    caps.iter().collect::<Vec<_>>()
                );
                for (i, (k, p)) in actions.iter().enumerate() {
                    m.push_str(&format!("\n[[actions]]\nid = \"a{i}\"\nkind = \"{k}\"\n"));
                    m.push_str(match *k {
                        "notify" => "to = \"department:ops\"\ntemplate = \"t\"\n",
                        "create_task" => "assignee = \"department:ops\"\ntitle = \"t\"\n",
                        "request_approvals" => "count = 2\nof = \"role:officer\"\n",
                        _ => "",
                    });
                    if *k == "cancel_actions" {
                        m.push_str(&format!("purpose = \"{p}\"\n"));
                    }
                }
                let customer = format!("prop-cust-{id}");
                let (mut adm, mut svc, mut led, mut v) =
                    (adm0.clone(), svc0.clone(), led0.clone(), v0.clone());
                let inst = rt.block_on(async {
                    adm.register_contract(cpb::RegisterContractRequest {
                        manifest: m.clone(),
                        guest: Vec::new(),
                        file_name: format!("prop-{id}.toml"),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{m}\n{e:?}"));
                    v.put_record(put(
                        &customer,
                        &[
                            ("email", text("p@example.com")),
                            ("national_id", text("11010519491231002X")),
                            ("budget", int(250_000)),
                            ("customer_kind", text(kind)),
                            ("contract_value", int(value)),
                            ("company", text("Acme")),
                        ],
                    ))
                    .await
                    .unwrap();
                    for p in granted.iter().chain(&withdrawn) {
                        led.record_consent(consent(&customer, p, true)).await.unwrap();
                    }
                    for p in &withdrawn {
                        led.record_consent(consent(&customer, p, false)).await.unwrap();
                    }
                    svc.signal(signal(&format!("prop_{id}"), &customer, ""))
                        .await
                        .unwrap()
                        .into_inner()
                        .instances
                        .remove(0)
                });
                // The oracle.
                let principal = Principal {
                    kind: PrincipalKind::Workload,
                    name: format!("prop-{id}"),
                    department: dept.to_owned(),
                    purposes: [purpose.to_owned()].into(),
                };
                let w: BTreeSet<String> = withdrawn.iter().map(|s| s.to_string()).collect();
                let attrs = CustomerAttrs {
                    consents: granted
                        .iter()
                        .map(|s| s.to_string())
                        .filter(|s| !w.contains(s))
                        .collect(),
                    withdrawn: w,
                    kind: kind.to_owned(),
                    contract_value: value,
                };
                let ctx = |p: &str| Context {
                    purpose: p.to_owned(),
                    time_ms: 0,
                    approvals: 0,
                    cohort_size: 0,
                };
                let defs: Vec<_> = reads.iter().map(|f| schema.field(f).unwrap()).collect();
                let fattrs: Vec<_> = defs.iter().map(|d| &d.policy).collect();
                let scope = pol.scope(&principal, "default", &attrs, &fattrs).unwrap();
                let disclosed = pol.read_fields(&scope, &fattrs, &ctx(purpose)).unwrap();
                let read_refused = disclosed.iter().zip(&defs).any(|(d, def)| {
                    d.disclosure == Disclosure::Denied
                        || (d.disclosure == Disclosure::Masked
                            && def.ty != sovra_vault::schema::FieldType::String)
                });
                if read_refused {
                    let (r, a, d) = seen.get();
                    seen.set((r + 1, a, d));
                    prop_assert_eq!(&inst.state, "failed", "{}", m);
                    prop_assert!(inst.failure.contains("policy"), "{:?}", inst);
                    prop_assert!(inst.actions.is_empty());
                    return Ok(());
                }
                prop_assert_ne!(&inst.state, "failed", "{:?}\n{}", inst, m);
                for (i, (k, p)) in actions.iter().enumerate() {
                    let a = action(&inst, &format!("a{i}"));
                    let (act, purpose_of) = match *k {
                        "notify" => (Action::Notify, purpose),
                        "create_task" => (Action::CreateTask, purpose),
                        "request_approvals" => (Action::RequestApprovals, purpose),
                        _ => (Action::CancelActions, *p),
                    };
                    let allowed = pol
                        .decide(&scope, act, None, &ctx(purpose_of))
                        .unwrap()
                        .allowed();
                    let (r, al, d) = seen.get();
                    seen.set(if allowed { (r, al + 1, d) } else { (r, al, d + 1) });
                    if allowed {
                        prop_assert!(
                            a.state == "ready" || a.state == "completed",
                            "{:?} allowed by policy but {}",
                            a,
                            a.state
                        );
                    } else {
                        prop_assert_eq!(&a.state, "denied", "{:?}\n{}", a, m);
                    }
                }
                Ok(())
            },
        )
        .unwrap();
    let (refused, allowed, denied) = seen.get();
    assert!(
        refused > 0 && allowed > 0 && denied > 0,
        "the cases did not cover refused reads, allowed and denied actions: {:?}",
        seen.get()
    );
    rt.block_on(srv.stop());
}

/// `sovra contract signal`, `instances` and `evidence` (export, and
/// `--verify` offline with the key pinned) through the real binary; a
/// tampered report exits 1 naming what failed, a report that is not one
/// exits 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_signals_lists_exports_and_verifies_evidence() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    adm.register_contract(shipped("poc-activation", &[]))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "cli-c",
        &[("email", text("c@example.com"))],
    )
    .await;
    let run = |args: &[&str], token: &str| {
        let o = std::process::Command::new(crate::SOVRA)
            .args(args)
            .env("SOVRA_SERVER", &srv.url)
            .env("SOVRA_TOKEN", token)
            .output()
            .unwrap();
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (code, out) = run(
        &[
            "contract",
            "signal",
            "poc_report_signed",
            "--customer",
            "cli-c",
            "--key",
            "k1",
            "--attr",
            "poc_id=41",
        ],
        &env.service,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("instance 1 poc-activation v1 signal:poc_report_signed open"),
        "{out}"
    );
    assert!(
        out.contains("1/raise_receivable create_task ready due "),
        "{out}"
    );
    let (_, out) = run(
        &[
            "contract",
            "signal",
            "poc_report_signed",
            "--customer",
            "cli-c",
            "--key",
            "k1",
            "--attr",
            "poc_id=41",
        ],
        &env.service,
    );
    assert!(out.contains("replayed"), "{out}");
    let (code, out) = run(
        &[
            "contract",
            "signal",
            "poc_report_signed",
            "--customer",
            "cli-c",
            "--attr",
            "oops",
        ],
        &env.service,
    );
    assert_eq!(code, Some(64), "{out}");
    let (code, out) = run(&["contract", "instances", "--open"], &env.officer);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("instance 1 poc-activation"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("evidence.json");
    let key = dir.path().join("log.key");
    std::fs::write(&key, ledger_key(&srv.url, &env.officer).await).unwrap();
    let (code, out) = run(
        &[
            "contract",
            "evidence",
            "--instance",
            "1",
            "--out",
            report.to_str().unwrap(),
        ],
        &env.officer,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OK: 4 entries proven"), "{out}");
    let (code, out) = run(
        &[
            "contract",
            "evidence",
            "--verify",
            report.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("your key") && out.contains("raise_receivable (create_task) due "),
        "{out}"
    );
    assert!(out.contains(": pending"), "{out}");
    // Tampered: a pending obligation claimed kept.
    let mut r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    r["obligations"][0]["outcome"] = "kept".into();
    std::fs::write(&report, r.to_string()).unwrap();
    let (code, out) = run(
        &[
            "contract",
            "evidence",
            "--verify",
            report.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("REFUSED") && out.contains("obligation `"),
        "{out}"
    );
    std::fs::write(&report, "{\"not\": \"a report\"}").unwrap();
    let (code, out) = run(
        &["contract", "evidence", "--verify", report.to_str().unwrap()],
        "",
    );
    assert_eq!(code, Some(64), "{out}");
    srv.stop().await;
}

/// Rewrites one record of the `contract_runtime` tree of a stopped server.
fn tamper_runtime(env: &Env, prefix: u8, f: impl FnOnce(&mut serde_json::Value)) {
    let db = open_raw(&env.data_dir());
    let t = db.open_tree("contract_runtime").unwrap();
    let (k, v) = t
        .iter()
        .map(|i| i.unwrap())
        .find(|(k, v)| k[0] == prefix && v.starts_with(b"{"))
        .unwrap();
    let mut j: serde_json::Value = serde_json::from_slice(&v).unwrap();
    f(&mut j);
    t.insert(k, serde_json::to_vec(&j).unwrap()).unwrap();
    db.flush().unwrap();
}

/// The outbox is not trusted: a completion the ledger does not hold, an
/// instance pointed at another entry, a damaged record and a deleted
/// action each refuse the start, naming the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_changed_on_disk_is_refused_at_start_naming_the_record() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    adm.register_contract(shipped("poc-activation", &[]))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "t-c",
        &[("email", text("t@example.com"))],
    )
    .await;
    let mut svc = contracts(&srv.url, &env.service).await;
    svc.signal(signal("poc_report_signed", "t-c", ""))
        .await
        .unwrap();
    srv.stop().await;
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&env.data_dir(), copy.path());
    let restore = || {
        std::fs::remove_dir_all(env.data_dir()).unwrap();
        copy_dir(copy.path(), &env.data_dir());
    };

    // A forged completion: the record says completed, the ledger does not.
    tamper_runtime(&env, b'a', |a| {
        a["state"] = "completed".into();
        a["completed_by"] = "mallory".into();
    });
    let e = serve(&env.config())
        .await
        .err()
        .expect("started on a forged completion")
        .to_string();
    assert!(
        e.contains("outbox action 1/") && e.contains("says it is completed"),
        "{e}"
    );
    restore();
    // An instance pointed at another ledger entry.
    tamper_runtime(&env, b'i', |i| i["evaluated_entry"] = 0.into());
    let e = serve(&env.config())
        .await
        .err()
        .expect("started on a forged instance")
        .to_string();
    assert!(
        e.contains("contract instance 1 of tenant `default`") && e.contains("as its evaluation"),
        "{e}"
    );
    restore();
    // A record that does not decode.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("contract_runtime").unwrap();
        let k = t
            .iter()
            .map(|i| i.unwrap().0)
            .find(|k| k[0] == b'a')
            .unwrap();
        t.insert(k, &b"\x00garbage"[..]).unwrap();
        db.flush().unwrap();
    }
    let e = serve(&env.config())
        .await
        .err()
        .expect("started on a damaged record")
        .to_string();
    assert!(
        e.contains("outbox action 1/") && e.contains("contract_runtime"),
        "{e}"
    );
    restore();
    // An action deleted.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("contract_runtime").unwrap();
        let k = t
            .iter()
            .map(|i| i.unwrap().0)
            .find(|k| k[0] == b'a')
            .unwrap();
        t.remove(k).unwrap();
        db.flush().unwrap();
    }
    let e = serve(&env.config())
        .await
        .err()
        .expect("started on a deleted action")
        .to_string();
    assert!(
        e.contains("is missing from the vault's `contract_runtime` tree"),
        "{e}"
    );
    restore();
    // Restored, it starts and the instance is as it was.
    let srv = env.start().await;
    let mut off = contracts(&srv.url, &env.officer).await;
    let i = wait_instance(&mut off, 1, |_| true).await;
    assert!(i.actions.iter().all(|a| a.state == "ready"), "{i:?}");
    srv.stop().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), &p).unwrap();
        }
    }
}

/// `write_field` is taken by the vault: the derived value is written to
/// the customer's record with the contract as its lineage agent, the
/// outbox and the ledger never hold it, and a write the policy denies (a
/// sensitive field) is recorded denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derived_field_is_written_by_the_vault_with_lineage_and_never_sent() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts(&srv.url, &env.admin).await;
    adm.register_contract(fixture("derive-region.toml"))
        .await
        .unwrap();
    put_customer(
        &srv.url,
        &env.service,
        "gov-1",
        &[("company", text("Gov Works"))],
    )
    .await;
    let mut svc = contracts(&srv.url, &env.service).await;
    let i = svc
        .signal(signal("company_checked", "gov-1", ""))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    let set = action(&i, "set_region");
    assert_eq!(set.state, "completed", "{i:?}");
    assert!(!set.detail_json.contains("public_sector"), "{set:?}");
    assert_eq!(action(&i, "set_secret").state, "denied", "{i:?}");
    assert_eq!(i.state, "done");
    // The value is in the record.
    let mut v = client::connect(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    let r = v
        .get_fields(get("gov-1", &["region"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        revealed(&r.fields[0]),
        Some(&pb::value::Kind::Text("public_sector".into()))
    );
    // Its lineage names the contract; the ledger never holds the value.
    let mut lin = client::connect_lineage(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let l = lin
        .get_field_lineage(sovra_proto::lineage::v1::GetFieldLineageRequest {
            customer_id: "gov-1".into(),
            field: "region".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(format!("{l:?}").contains("derive-region"), "{l:?}");
    let entries = ledger_entries(&srv.url, &env.officer).await;
    assert!(!entries
        .iter()
        .any(|(_, e)| e.to_string().contains("public_sector")));
    // Nothing of it reaches a connector.
    let mut s = svc
        .watch_actions(cpb::WatchActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(1200), s.message())
            .await
            .is_err()
    );
    srv.stop().await;
}
