//! `sovra contract validate` and `sovra contract test`, the real binary on
//! the shipped CRM contracts and on broken manifests, events files and
//! guests: exit codes, `file:line` errors, and the dry run's report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::SOVRA;

fn sovra(args: &[&str]) -> Output {
    Command::new(SOVRA).args(args).output().unwrap()
}

fn crm(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contracts/crm")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_shipped_contracts_validate_and_pin_their_guest() {
    for name in [
        "poc-activation",
        "gov-export-approvals",
        "lead-score-alert",
        "marketing-consent-stop",
    ] {
        let o = sovra(&["contract", "validate", &crm(&format!("{name}.toml"))]);
        assert!(o.status.success(), "{name}: {}", out(&o));
        assert!(
            out(&o).starts_with(&format!("OK: contract {name} v1")),
            "{}",
            out(&o)
        );
    }
    let o = sovra(&["contract", "validate", &crm("lead-score-alert.toml")]);
    assert!(out(&o).contains("a guest module"), "{}", out(&o));
}

#[test]
fn the_poc_dry_run_shows_the_missed_obligation_escalated() {
    let o = sovra(&[
        "contract",
        "test",
        &crm("poc-activation.toml"),
        "--events",
        &crm("events/poc-activation.jsonl"),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("completed send_activation_link"), "{text}");
    assert!(
        text.contains("raise_receivable due 1700259200000: escalated at 1700259200000 to department:customer_success_director"),
        "{text}"
    );
    // Only the first three lines, as of a time before the deadline: the
    // receivable is still pending; as of a time after it, escalated.
    let lines: Vec<String> = std::fs::read_to_string(crm("events/poc-activation.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .take(3)
        .map(str::to_owned)
        .collect();
    let (_d, events) = scratch(&[("e.jsonl", &lines.join("\n"))]);
    let outcomes = |until: &str| -> Vec<String> {
        let o = sovra(&[
            "contract",
            "test",
            &crm("poc-activation.toml"),
            "--events",
            events.to_str().unwrap(),
            "--until",
            until,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["obligations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["outcome"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(outcomes("1700100000000"), ["kept", "kept", "pending"]);
    assert_eq!(outcomes("1700300000000"), ["kept", "kept", "escalated"]);
}

#[test]
fn the_dry_run_decides_each_action_with_the_policies_for_the_contract_s_principal() {
    let o = sovra(&[
        "contract",
        "test",
        &crm("lead-score-alert.toml"),
        "--events",
        &crm("events/lead-score-alert.jsonl"),
        "--json",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let decisions: Vec<(bool, String)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["evaluation"]["actions"].as_array())
        .flatten()
        .map(|a| {
            (
                a["decision"]["allowed"].as_bool().unwrap(),
                a["decision"]["policies"].to_string(),
            )
        })
        .collect();
    // The consenting hot lead's alert is allowed; the one who withdrew
    // consent to lead scoring is denied by the consent rules, not taken,
    // and sets no deadline.
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert!(decisions[0].0 && decisions[0].1.contains("contract-act-for-its-purpose"));
    assert!(!decisions[1].0 && decisions[1].1.contains("contract-consent-withdrawn"));
    assert_eq!(v["obligations"].as_array().unwrap().len(), 1);

    // A policy directory without the contract rules: every action is denied.
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if !p.ends_with("95-contracts.cedar") {
            std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let trigger = "{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"poc_report_signed\"}\n";
    let (_e, events) = scratch(&[("e.jsonl", trigger)]);
    let o = sovra(&[
        "contract",
        "test",
        &crm("poc-activation.toml"),
        "--events",
        events.to_str().unwrap(),
        "--policies",
        d.path().to_str().unwrap(),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert_eq!(text.matches("DENIED").count(), 3, "{text}");
    assert!(!text.contains("obligations:"), "{text}");
}

fn scratch(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    let p = d.path().join(files[0].0);
    (d, p)
}

#[test]
fn broken_manifests_guests_and_events_exit_non_zero_naming_file_and_line() {
    let good = std::fs::read_to_string(crm("lead-score-alert.toml")).unwrap();
    let wat = std::fs::read_to_string(crm("lead-score-alert.wat")).unwrap();

    // An unknown capability, at its line.
    let bad = good.replace("\"set_timer\"]", "\"set_timer\", \"delete_everything\"]");
    let (_d, p) = scratch(&[("c.toml", &bad), ("lead-score-alert.wat", &wat)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let text = out(&o);
    assert!(text.contains("c.toml:9:"), "{text}");
    assert!(
        text.contains("unknown capability `delete_everything`"),
        "{text}"
    );

    // A guest that imports WASI.
    let wasi = wat.replace(
        "(import \"sovra\" \"emit\"",
        "(import \"wasi\" \"fd_write\"",
    );
    let (_d, p) = scratch(&[("c.toml", &good), ("lead-score-alert.wat", &wasi)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("wasi.fd_write"), "{}", out(&o));

    // A missing guest file.
    let (_d, p) = scratch(&[("c.toml", &good)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("lead-score-alert.wat"), "{}", out(&o));

    // A condition that does not type-check.
    let gov = std::fs::read_to_string(crm("gov-export-approvals.toml")).unwrap();
    let bad = gov.replace(
        "fields.contract_value > 5000000",
        "fields.contract_value > 'big'",
    );
    let (_d, p) = scratch(&[("g.toml", &bad)]);
    let o = sovra(&["contract", "validate", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("g.toml:12:13: condition: `>` cannot take (int, string)"),
        "{}",
        out(&o)
    );

    // An events file with a bad line: usage error (64) naming the line.
    let (_d, e) = scratch(&[("e.jsonl", "{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"lead_scored\", \"attrs\": {\"score\": 900}}\n{\"at_ms\": 2, \"on\": \"meteor\"}\n")]);
    let o = sovra(&[
        "contract",
        "test",
        &crm("lead-score-alert.toml"),
        "--events",
        e.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", out(&o));
    assert!(out(&o).contains("line 2"), "{}", out(&o));

    // A guest that fails on one event fails that instance, not the run.
    let (_d, e) = scratch(&[("e.jsonl", "{\"at_ms\": 1, \"on\": \"signal\", \"name\": \"lead_scored\"}\n{\"at_ms\": 2, \"on\": \"signal\", \"name\": \"lead_scored\", \"attrs\": {\"score\": 900}}\n")]);
    let o = sovra(&[
        "contract",
        "test",
        &crm("lead-score-alert.toml"),
        "--events",
        e.to_str().unwrap(),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("FAILED instance: guest failed: `run` returned 1"),
        "{text}"
    );
    assert!(text.contains("notify alert_rep (guest)"), "{text}");
}

// --- the registry, through the real gRPC server ---------------------------

use prost::Message;
use sovra_proto::contracts::v1 as cpb;
use sovra_testkit::*;
use sovra_vault::access::auth::Role;
use sovra_vault::client::{self, ContractsClient};
use sovra_vault::store::ContractRecord;
use tonic::Code;

fn register_req(name: &str) -> cpb::RegisterContractRequest {
    let manifest = std::fs::read_to_string(crm(&format!("{name}.toml"))).unwrap();
    let guest = sovra_contracts::manifest::guest_module_name(&manifest)
        .map(|m| std::fs::read(crm(&m)).unwrap())
        .unwrap_or_default();
    cpb::RegisterContractRequest {
        manifest,
        guest,
        file_name: format!("{name}.toml"),
    }
}

/// The pin `sovra contract validate` computes offline.
fn offline_pin(name: &str) -> String {
    let types = sovra_vault::contracts::field_types(&sovra_vault::schema::Schema::default_crm());
    let m =
        sovra_contracts::Manifest::load(Path::new(&crm(&format!("{name}.toml"))), &types).unwrap();
    hex::encode(m.hash())
}

async fn contracts_client(url: &str, token: &str) -> ContractsClient {
    client::connect_contracts(url, Some(token), None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_are_registered_listed_and_disabled_through_grpc_with_ledger_entries() {
    let env = Env::new();
    let mut cfg = env.config();
    let admin_b = cfg.add_principal("admin-b", Role::Admin, "beta").unwrap();
    let svc_b = cfg
        .add_principal_with("svc-b", Role::Service, "beta", "sales", SERVICE_PURPOSES)
        .unwrap();
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    let mut adm = contracts_client(&srv.url, &env.admin).await;

    // Registered, pinned as offline, in the ledger.
    let poc = adm
        .register_contract(register_req("poc-activation"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((poc.id.as_str(), poc.version), ("poc-activation", 1));
    assert_eq!(poc.sha256, offline_pin("poc-activation"));
    assert_eq!(poc.triggers, ["signal:poc_report_signed"]);
    assert!(!poc.has_guest && !poc.disabled);
    let lead = adm
        .register_contract(register_req("lead-score-alert"))
        .await
        .unwrap()
        .into_inner();
    assert!(lead.has_guest);
    assert_eq!(lead.sha256, offline_pin("lead-score-alert"));
    let entries = ledger_entries(&srv.url, &env.officer).await;
    let registered: Vec<&serde_json::Value> = entries
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["kind"] == "contract_event" && e["step"] == "registered")
        .collect();
    assert_eq!(registered.len(), 2, "{registered:?}");
    assert_eq!(registered[0]["contract_sha256"], poc.sha256);
    assert_eq!(registered[0]["actor"], "admin");
    assert_eq!(
        registered[0]["subject"],
        sovra_vault::contracts::registry_subject("default", "poc-activation").to_hex()
    );
    let at = |entries: &[(u64, serde_json::Value)], i: u64| {
        entries
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, e)| e.clone())
            .unwrap()
    };
    assert_eq!(at(&entries, poc.registered_entry)["step"], "registered");

    // The same registration again is the same; another pin for the same
    // version is refused.
    let again = adm
        .register_contract(register_req("poc-activation"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.registered_entry, poc.registered_entry);
    let mut changed = register_req("poc-activation");
    changed.manifest = changed.manifest.replace("\"72h\"", "\"48h\"");
    let s = expect_code(
        adm.register_contract(changed.clone()).await,
        Code::AlreadyExists,
    );
    assert!(
        s.message().contains("register a higher version"),
        "{}",
        s.message()
    );

    // Malformed input: the manifest's line, or the guest's fault.
    let mut bad = register_req("poc-activation");
    bad.manifest = bad
        .manifest
        .replace("\"set_timer\"]", "\"set_timer\", \"teleport\"]");
    let s = expect_code(adm.register_contract(bad).await, Code::InvalidArgument);
    assert!(
        s.message().contains("poc-activation.toml:10:"),
        "{}",
        s.message()
    );
    assert!(
        s.message().contains("unknown capability `teleport`"),
        "{}",
        s.message()
    );
    let mut looping = register_req("lead-score-alert");
    looping.guest = b"(module (import \"env\" \"clock\" (func)) (memory (export \"memory\") 1) (func (export \"run\") (result i32) (i32.const 0)))".to_vec();
    let s = expect_code(adm.register_contract(looping).await, Code::InvalidArgument);
    assert!(s.message().contains("env.clock"), "{}", s.message());
    let mut purpose = register_req("poc-activation");
    purpose.manifest = purpose
        .manifest
        .replace("customer_service", "world_domination");
    let s = expect_code(adm.register_contract(purpose).await, Code::InvalidArgument);
    assert!(s.message().contains("world_domination"), "{}", s.message());
    let mut named = register_req("poc-activation");
    named.file_name = "x".repeat(300);
    let s = expect_code(adm.register_contract(named).await, Code::InvalidArgument);
    assert!(s.message().contains("file_name"), "{}", s.message());
    let mut huge = register_req("poc-activation");
    huge.manifest
        .push_str(&format!("# {}\n", "x".repeat(70_000)));
    expect_code(adm.register_contract(huge).await, Code::InvalidArgument);

    // Roles: services list, partners do not; only admins register.
    let mut svc = contracts_client(&srv.url, &env.service).await;
    let list = svc
        .list_contracts(cpb::ListContractsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.contracts.len(), 2);
    expect_code(
        svc.register_contract(register_req("gov-export-approvals"))
            .await,
        Code::PermissionDenied,
    );
    let mut partner = contracts_client(&srv.url, &env.partner).await;
    expect_code(
        partner
            .list_contracts(cpb::ListContractsRequest::default())
            .await,
        Code::PermissionDenied,
    );

    // Tenants: beta sees none of default's contracts and cannot disable them.
    let mut b = contracts_client(&srv.url, &admin_b.token).await;
    let mut bs = contracts_client(&srv.url, &svc_b.token).await;
    assert!(bs
        .list_contracts(cpb::ListContractsRequest {
            include_disabled: true
        })
        .await
        .unwrap()
        .into_inner()
        .contracts
        .is_empty());
    expect_code(
        bs.get_contract(cpb::GetContractRequest {
            id: "poc-activation".into(),
            version: 0,
        })
        .await,
        Code::NotFound,
    );
    expect_code(
        b.disable_contract(cpb::DisableContractRequest {
            id: "poc-activation".into(),
            reason: String::new(),
        })
        .await,
        Code::NotFound,
    );
    let beta_poc = b
        .register_contract(register_req("poc-activation"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beta_poc.sha256, poc.sha256);

    // Disabled: in the ledger, out of the list, idempotent; a higher
    // version enables the id again.
    let d = adm
        .disable_contract(cpb::DisableContractRequest {
            id: "lead-score-alert".into(),
            reason: "campaign_over".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.disabled && d.disabled_entry > 0);
    for reason in [
        "x".repeat(200),
        "over\u{202E}ride".to_owned(),
        "line\nbreak".to_owned(),
    ] {
        let s = expect_code(
            adm.disable_contract(cpb::DisableContractRequest {
                id: "poc-activation".into(),
                reason,
            })
            .await,
            Code::InvalidArgument,
        );
        assert!(s.message().contains("reason"), "{}", s.message());
    }
    let d2 = adm
        .disable_contract(cpb::DisableContractRequest {
            id: "lead-score-alert".into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d2.disabled_entry, d.disabled_entry);
    let e = at(
        &ledger_entries(&srv.url, &env.officer).await,
        d.disabled_entry,
    );
    assert_eq!(
        (e["step"].as_str(), e["detail"].as_str()),
        (Some("disabled"), Some("campaign_over"))
    );
    let list = svc
        .list_contracts(cpb::ListContractsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.contracts
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        ["poc-activation"]
    );
    let detail = svc
        .get_contract(cpb::GetContractRequest {
            id: "lead-score-alert".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(detail.contract.unwrap().disabled);
    assert!(detail.manifest.contains("lead-score-alert.wat"));
    assert!(detail.guest_wasm.starts_with(b"\0asm"));
    expect_code(
        svc.get_contract(cpb::GetContractRequest {
            id: "nothing".into(),
            version: 0,
        })
        .await,
        Code::NotFound,
    );
    let mut v2 = register_req("lead-score-alert");
    v2.manifest = v2.manifest.replace("version = 1", "version = 2");
    let r2 = adm.register_contract(v2).await.unwrap().into_inner();
    assert!(!r2.disabled);
    // Versions only go up: v3 after v4 is refused, so an old version can
    // never outrank a disabling.
    let version = |v: u32| {
        let mut r = register_req("lead-score-alert");
        r.manifest = r.manifest.replace("version = 1", &format!("version = {v}"));
        r
    };
    adm.register_contract(version(4)).await.unwrap();
    let s = expect_code(
        adm.register_contract(version(3)).await,
        Code::FailedPrecondition,
    );
    assert!(
        s.message().contains("register a version above it"),
        "{}",
        s.message()
    );
    // Bounded: 16 versions of one id (1, 2, 4, and 5 to 17).
    for v in 5..=17 {
        adm.register_contract(version(v)).await.unwrap();
    }
    let r = version(18);
    expect_code(adm.register_contract(r).await, Code::ResourceExhausted);
    srv.stop().await;

    // A restart keeps all of it.
    let srv = env.start().await;
    let mut svc = contracts_client(&srv.url, &env.service).await;
    let list = svc
        .list_contracts(cpb::ListContractsRequest {
            include_disabled: true,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<(String, u32, bool)> = list
        .contracts
        .iter()
        .map(|c| (c.id.clone(), c.version, c.disabled))
        .collect();
    assert_eq!(
        ids,
        [
            ("lead-score-alert".to_string(), 17, false),
            ("poc-activation".to_string(), 1, false)
        ]
    );
    srv.stop().await;
}

/// Rewrites the record of `id` v`version` of tenant `default` in a stopped
/// server's database; returns the record as it was.
fn tamper(
    env: &Env,
    id: &str,
    version: u32,
    f: impl FnOnce(&mut ContractRecord),
) -> ContractRecord {
    let db = open_raw(&env.data_dir());
    let t = db.open_tree("contracts").unwrap();
    let mut key = b"default\0".to_vec();
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    let old = ContractRecord::decode(&t.get(&key).unwrap().unwrap()[..]).unwrap();
    let mut new = old.clone();
    f(&mut new);
    t.insert(&key, new.encode_to_vec()).unwrap();
    db.flush().unwrap();
    old
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_changed_on_disk_is_refused_or_disabled_again_at_start() {
    let env = Env::new();
    let srv = env.start().await;
    let mut adm = contracts_client(&srv.url, &env.admin).await;
    adm.register_contract(register_req("poc-activation"))
        .await
        .unwrap();
    adm.register_contract(register_req("lead-score-alert"))
        .await
        .unwrap();
    adm.disable_contract(cpb::DisableContractRequest {
        id: "lead-score-alert".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    srv.stop().await;

    // A manifest changed in place (a deadline stretched): refused, naming it.
    let old = tamper(&env, "poc-activation", 1, |r| {
        r.manifest = r.manifest.replace("\"72h\"", "\"720h\"")
    });
    let e = serve(&env.config())
        .await
        .err()
        .expect("the server started on an altered manifest")
        .to_string();
    assert!(
        e.contains("contract `poc-activation` v1") && e.contains("does not match its pin"),
        "{e}"
    );
    // A registration entry pointed elsewhere: refused, naming the entry.
    tamper(&env, "poc-activation", 1, |r| {
        *r = old.clone();
        r.registered_entry = 0;
    });
    let e = serve(&env.config())
        .await
        .err()
        .expect("the server started on a forged entry")
        .to_string();
    assert!(
        e.contains("names ledger entry 0 as its registration"),
        "{e}"
    );
    // The summary List and Get show, edited to hide a capability: refused.
    tamper(&env, "poc-activation", 1, |r| {
        *r = old.clone();
        r.capabilities.retain(|c| c != "create_task");
    });
    let e = serve(&env.config())
        .await
        .err()
        .expect("the server started on an edited summary")
        .to_string();
    assert!(
        e.contains("differs from its manifest and ledger entry"),
        "{e}"
    );
    tamper(&env, "poc-activation", 1, |r| *r = old.clone());

    // A disabled contract brought back to life on disk: the ledger's
    // disabling is applied again.
    tamper(&env, "lead-score-alert", 1, |r| r.disabled_entry = 0);
    let srv = env.start().await;
    let mut svc = contracts_client(&srv.url, &env.service).await;
    let list = svc
        .list_contracts(cpb::ListContractsRequest {
            include_disabled: true,
        })
        .await
        .unwrap()
        .into_inner();
    let lead = list
        .contracts
        .iter()
        .find(|c| c.id == "lead-score-alert")
        .unwrap();
    assert!(lead.disabled, "{lead:?}");
    srv.stop().await;
}
