//! Issue 13, attacked as a hostile tenant, officer and local user would:
//! tenant-scoped ledger reads and admin operations, explanations that
//! reveal nothing the caller may not read, private file modes, refused
//! wrong keys and damaged databases, provenance bound to the value, key
//! changes written ahead into the ledger, and refused bidirectional
//! controls. Each test goes through the real server (in-process or the
//! `sovra` binary).

use std::process::Command;
use std::time::Duration;

use prost::Message;
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::policy::v1 as ppb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::access::auth::Role;
use sovra_vault::client;
use sovra_vault::store::StoredField;
use tonic::Code;

use sovra_testkit::*;

use crate::SOVRA;

/// Tokens of tenant `beta`'s service, officer and admin, added to `env`.
struct Beta {
    service: String,
    officer: String,
    admin: String,
}

fn add_beta(env: &Env) -> Beta {
    let mut cfg = env.config();
    let service = cfg
        .add_principal_with("svc-b", Role::Service, "beta", "sales", SERVICE_PURPOSES)
        .unwrap();
    let officer = cfg
        .add_principal_with("dpo-b", Role::Officer, "beta", "compliance", &[])
        .unwrap();
    let admin = cfg.add_principal("admin-b", Role::Admin, "beta").unwrap();
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    Beta {
        service: service.token.to_string(),
        officer: officer.token.to_string(),
        admin: admin.token.to_string(),
    }
}

/// Item 1: a tenant's officer reads only its own tenant's entries (and the
/// server-wide policy changes), gets no proof of another tenant's entry,
/// and a tenant's admin neither reloads the shared policy set nor
/// rebuilds another tenant's consent state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_reads_and_admin_operations_are_tenant_scoped() {
    let env = Env::new();
    let beta = add_beta(&env);
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("cust-a", &[("phone", text("13800000001"))]))
        .await
        .unwrap();
    let mut led_a = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    let a_consent = led_a
        .record_consent(consent("cust-a", "marketing", true))
        .await
        .unwrap()
        .into_inner();
    let mut led_b = client::connect_ledger(&srv.url, Some(&beta.service), None)
        .await
        .unwrap();
    let b_consent = led_b
        .record_consent(consent("cust-b", "marketing", true))
        .await
        .unwrap()
        .into_inner();

    let seen_by_b = ledger_entries(&srv.url, &beta.officer).await;
    let seen_by_a = ledger_entries(&srv.url, &env.officer).await;
    let tenant_of = |v: &serde_json::Value| v["tenant"].as_str().map(str::to_owned);
    assert!(seen_by_b.iter().any(|(i, _)| *i == b_consent.index));
    for (i, v) in &seen_by_b {
        match tenant_of(v) {
            Some(t) => assert_eq!(t, "beta", "entry {i} of another tenant reached beta: {v}"),
            None => assert_eq!(v["kind"], "policy_changed", "entry {i}: {v}"),
        }
        assert!(!v.to_string().contains("cust-a") && !v.to_string().contains("\"svc\""));
    }
    assert!(seen_by_a.iter().any(|(i, _)| *i == a_consent.index));
    assert!(seen_by_a
        .iter()
        .all(|(_, v)| tenant_of(v).is_none_or(|t| t == "default")));
    // Both see the server-wide policy change.
    assert!(seen_by_b.iter().any(|(_, v)| v["kind"] == "policy_changed"));

    // Proofs: of its own entries only; another tenant's index is NOT_FOUND.
    let mut off_b = client::connect_ledger(&srv.url, Some(&beta.officer), None)
        .await
        .unwrap();
    let e = off_b
        .get_inclusion_proof(lpb::GetInclusionProofRequest {
            index: a_consent.index,
            tree_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(!e.message().contains("marketing"), "{}", e.message());
    let own = off_b
        .get_inclusion_proof(lpb::GetInclusionProofRequest {
            index: b_consent.index,
            tree_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.index, b_consent.index);

    // Policies govern every tenant: only the operator tenant's admins reload.
    let mut pol_b = client::connect_policy(&srv.url, Some(&beta.admin), None)
        .await
        .unwrap();
    let e = pol_b
        .reload_policies(ppb::ReloadPoliciesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("operator_tenant"), "{}", e.message());
    let mut pol_a = client::connect_policy(&srv.url, Some(&env.admin), None)
        .await
        .unwrap();
    pol_a
        .reload_policies(ppb::ReloadPoliciesRequest {})
        .await
        .unwrap();
    srv.stop().await;

    // A forged consent record for tenant default's customer, written into
    // the stopped server's ledger database.
    {
        let db = open_raw(&env.data_dir().join("ledger"));
        let log = db.open_tree("log").unwrap();
        let subject = hex::decode(&a_consent.subject).unwrap();
        let mut key = b"c".to_vec();
        key.extend_from_slice(&subject);
        let real = log
            .get([key.as_slice(), b"marketing"].concat())
            .unwrap()
            .unwrap();
        log.insert([key.as_slice(), b"analytics"].concat(), real)
            .unwrap();
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let purposes = |s: lpb::ConsentState| -> Vec<String> {
        s.purposes
            .into_iter()
            .map(|p| p.purpose)
            .collect::<Vec<_>>()
    };
    let mut led_a = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    let state = |c: &str| lpb::GetConsentStateRequest {
        customer_id: c.into(),
    };
    let before = purposes(
        led_a
            .get_consent_state(state("cust-a"))
            .await
            .unwrap()
            .into_inner(),
    );
    // The start derived the view from the entries again: the forgery is
    // gone before anything is served (recovery.rs tests what a forged
    // view does to a read).
    assert_eq!(before, vec!["marketing".to_owned()]);
    // Either tenant's admin may rebuild its own state; nothing is left to
    // correct.
    for admin in [&beta.admin, &env.admin] {
        let mut adm = client::connect_ledger(&srv.url, Some(admin), None)
            .await
            .unwrap();
        let rb = adm
            .rebuild_consent_state(lpb::RebuildConsentStateRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rb.corrected, 0);
    }
    let after = purposes(
        led_a
            .get_consent_state(state("cust-a"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(after, vec!["marketing".to_owned()]);
    srv.stop().await;
}

/// Item 3: an officer's explanation about a real customer is decided
/// without the attributes the officer may not read, says so, and is the
/// same for a government customer with a large contract as for anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reveals_no_attribute_the_caller_may_not_read() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for (id, kind, value) in [
        ("cust-gov", "government", 9_000_000),
        ("cust-ind", "individual", 1_000),
    ] {
        svc.put_record(put(
            id,
            &[
                ("phone", text("13800000009")),
                ("customer_kind", text(kind)),
                ("contract_value", int(value)),
            ],
        ))
        .await
        .unwrap();
        led.record_consent(consent(id, "export", true))
            .await
            .unwrap();
    }
    let mut off = client::connect_policy(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    let ask = |customer: &str| ppb::ExplainRequest {
        principal: "svc".into(),
        action: "read".into(),
        field: "phone".into(),
        customer_id: customer.into(),
        purpose: "export".into(),
        approvals: 0,
    };
    let gov = off.explain(ask("cust-gov")).await.unwrap().into_inner();
    let ind = off.explain(ask("cust-ind")).await.unwrap().into_inner();
    assert!(
        !gov.policies
            .contains(&"government-export-three-approvals".to_owned()),
        "the answer names the policy that only a government customer with a large contract triggers: {gov:?}"
    );
    assert_eq!(gov.allowed, ind.allowed, "{gov:?} / {ind:?}");
    assert_eq!(gov.policies, ind.policies);
    assert_eq!(gov.summary, ind.summary);
    assert!(
        gov.withheld.contains(&"customer_kind".to_owned()),
        "{gov:?}"
    );
    assert!(
        gov.withheld.contains(&"contract_value".to_owned()),
        "{gov:?}"
    );
    assert!(
        gov.withheld_read_by
            .contains(&"government-export-three-approvals".to_owned()),
        "{gov:?}"
    );
    assert!(gov.summary.contains("may differ"), "{}", gov.summary);
    // Without a customer nothing is withheld.
    let none = off.explain(ask("")).await.unwrap().into_inner();
    assert!(none.withheld.is_empty() && none.withheld_read_by.is_empty());
    srv.stop().await;
}

fn sovra(args: &[&str]) -> std::process::Output {
    Command::new(SOVRA)
        .args(args)
        .env_remove("SOVRA_ROOT_KEY")
        .output()
        .unwrap()
}

fn text_of(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `sovra serve --config` expecting it to refuse to start; returns
/// its output. A server that starts is killed after 20 s and fails the test.
pub(crate) fn serve_refused(config: &std::path::Path) -> String {
    let mut child = Command::new(SOVRA)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("SOVRA_ROOT_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            let o = child.wait_with_output().unwrap();
            assert!(!o.status.success());
            assert_ne!(o.status.code(), Some(101), "panicked: {}", text_of(&o));
            return text_of(&o);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    let o = child.wait_with_output().unwrap();
    panic!("serve started: {}", text_of(&o));
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[cfg(unix)]
fn chmod(p: &std::path::Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Every directory 0700 and every file 0600 under `dir`.
#[cfg(unix)]
fn assert_private(dir: &std::path::Path) {
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            assert_private(&p);
        } else {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

/// Item 8: at umask 000 `sovra init` and `sovra serve` still make every
/// directory 0700 and every file 0600; a group- or world-writable config,
/// policy or data file stops `serve`, naming the file.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vault");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec '{SOVRA}' init --dir '{}'",
            dir.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text_of(&o));
    assert_private(&dir);
    let config = dir.join("config.toml");
    // Serve at umask 000: what it creates is private too.
    let port = free_port();
    let text = std::fs::read_to_string(&config).unwrap();
    let listen = text
        .lines()
        .find(|l| l.starts_with("listen"))
        .unwrap()
        .to_owned();
    std::fs::write(
        &config,
        text.replace(&listen, &format!("listen = \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec '{SOVRA}' serve --config '{}'",
            config.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..200 {
        if client::channel(&url, None).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(up, "serve did not start at umask 000");
    assert_private(&dir);

    for (path, bad) in [
        (config.clone(), 0o666),
        (dir.join("policies").join("10-consent.cedar"), 0o646),
        (dir.join("policies"), 0o777),
        (dir.join("data").join("db"), 0o620),
        (dir.join("schema.toml"), 0o602),
    ] {
        let was = mode(&path);
        chmod(&path, bad);
        let out = serve_refused(&config);
        assert!(
            out.contains(&path.display().to_string()) && out.contains("group or others write"),
            "{}: {out}",
            path.display()
        );
        chmod(&path, was);
    }
}

/// Item 9: a wrong root key is refused at start by the key check value
/// stored at init; a database truncated to half is refused naming it, with
/// no panic and no "another serve" hint, which only a held lock gets.
/// A data directory of another storage key format (format 1: ids as keys,
/// no format marker; format 2: one `records` key per field) is refused at
/// start, naming the directory, and nothing is changed: with its marker
/// back, the same directory serves its customer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_storage_key_format_is_refused_and_changes_nothing() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("kf-1", &[("phone", text("13800000001"))]))
        .await
        .unwrap();
    srv.stop().await;
    let set_marker = |v: Option<&[u8]>| {
        let db = open_raw(&env.data_dir());
        let meta = db.open_tree("meta").unwrap();
        let before = meta.get(b"key-format").unwrap().map(|v| v.to_vec());
        match v {
            Some(v) => meta.insert(b"key-format", v).unwrap(),
            None => meta.remove(b"key-format").unwrap(),
        };
        db.flush().unwrap();
        before
    };
    assert_eq!(
        set_marker(Some(&[2])),
        Some(vec![4]),
        "this build writes format 4"
    );
    let out = serve_refused(&env.config_path);
    assert!(
        out.contains("storage key format [2]") && out.contains("reads only format 4"),
        "{out}"
    );
    assert!(out.contains(&env.data_dir().display().to_string()), "{out}");
    set_marker(None);
    let out = serve_refused(&env.config_path);
    assert!(out.contains("storage key format 1"), "{out}");
    set_marker(Some(&[4]));
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let r = svc
        .get_fields(get("kf-1", &["phone"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.fields.len(), 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_root_key_and_damaged_database_are_refused_at_start() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for i in 0..200 {
        svc.put_record(put(&format!("c-{i}"), &[("phone", text("13800000001"))]))
            .await
            .unwrap();
    }
    // A second server on the same directory: the lock hint.
    let cfg_dir = env.config_path.clone();
    let out = serve_refused(&cfg_dir);
    assert!(out.contains("another `sovra serve`"), "{out}");
    srv.stop().await;

    let key_path = env.dir.path().join("root.key");
    let real = std::fs::read(&key_path).unwrap();
    std::fs::write(&key_path, format!("{}\n", "ab".repeat(32))).unwrap();
    let out = serve_refused(&env.config_path);
    assert!(
        out.contains("root key") && out.contains("initialised with"),
        "{out}"
    );
    assert!(!out.contains("another `sovra serve`"), "{out}");
    std::fs::write(&key_path, &real).unwrap();

    // The vault starts again with its own key.
    let srv = env.start().await;
    srv.stop().await;
    if file_backend_only("the rest alters the database files of the data directory") {
        return;
    }

    let db = env.data_dir().join("db");
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&db, &bytes[..bytes.len() / 2]).unwrap();
    let out = serve_refused(&env.config_path);
    assert!(
        out.contains(&env.data_dir().display().to_string()),
        "the message names the database: {out}"
    );
    assert!(!out.contains("another `sovra serve`"), "{out}");

    // The database lost whole (removed, or replaced by an empty one): not
    // taken as an empty vault, since the ledger has recorded its use.
    for e in std::fs::read_dir(env.data_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.file_name().is_some_and(|n| n != "shred.slots") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let out = serve_refused(&env.config_path);
    assert!(
        out.contains("lost, truncated or replaced"),
        "an empty database beside a used ledger: {out}"
    );
}

/// Item 10: channel, collector, consent reference and collection time are
/// bound into the value's associated data: changed on disk, the value is
/// refused as DATA_LOSS instead of served with forged provenance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provenance_changed_on_disk_is_refused() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for id in ["p-1", "p-2", "p-3", "p-4", "p-5"] {
        svc.put_record(put(id, &[("phone", text("13800000001"))]))
            .await
            .unwrap();
    }
    srv.stop().await;
    type Tamper = fn(&mut StoredField);
    let tamper: [(&str, Tamper); 4] = [
        ("p-1", |r| r.collector = "forged".into()),
        ("p-2", |r| r.channel = "branch".into()),
        ("p-3", |r| r.consent_ref = "consent-999".into()),
        ("p-4", |r| r.collected_at_ms -= 86_400_000),
    ];
    {
        let db = open_raw(&env.data_dir());
        let records = db.open_tree("records").unwrap();
        for (id, f) in &tamper {
            let held = get_field(&records, &env, id, "phone").unwrap();
            let mut rec = StoredField::decode(&held[..]).unwrap();
            assert_eq!(rec.format, 2);
            f(&mut rec);
            set_field(&records, &env, id, "phone", &rec.encode_to_vec());
        }
        // A downgrade to the unbound format is refused too.
        let held = get_field(&records, &env, "p-5", "phone").unwrap();
        let mut rec = StoredField::decode(&held[..]).unwrap();
        rec.format = 0;
        set_field(&records, &env, "p-5", "phone", &rec.encode_to_vec());
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for id in ["p-1", "p-2", "p-3", "p-4", "p-5"] {
        let e = svc
            .get_fields(get(id, &["phone"], "customer_service"))
            .await
            .map(|r| r.into_inner())
            .err()
            .map(|e| e.code());
        assert_eq!(e, Some(Code::DataLoss), "{id}");
    }
    srv.stop().await;
}

async fn ledger_kinds(url: &str, officer: &str) -> Vec<serde_json::Value> {
    ledger_entries(url, officer)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "tenant_key_rotated" || v["kind"] == "tenant_key_retired")
        .collect()
}

/// Item 11: every key-state change has its ledger entry, written first.
/// Rotations killed at random moments leave no version in force without
/// its `tenant_key_rotated` entry; a retirement (forced or not) is a
/// `tenant_key_retired` entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_are_in_the_ledger_before_they_take_effect() {
    let env = Env::new();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for round in 0..6u64 {
        let mut child = spawn_server(SOVRA, &env, port).await;
        let mut adm = client::connect(&url, Some(&env.admin), None).await.unwrap();
        let call = tokio::spawn(async move {
            let _ = adm.rotate_tenant_key(pb::RotateTenantKeyRequest {}).await;
        });
        tokio::time::sleep(Duration::from_millis(round * 3)).await;
        child.kill().unwrap(); // SIGKILL, mid-rotation or just after
        child.wait().unwrap();
        let _ = call.await;
    }
    let mut child = spawn_server(SOVRA, &env, port).await;
    let mut adm = client::connect(&url, Some(&env.admin), None).await.unwrap();
    let st = wait_rotation(&mut adm).await;
    let rotated = ledger_kinds(&url, &env.officer).await;
    for v in 2..=st.active_version {
        assert!(
            rotated.iter().any(|e| e["to_version"] == v),
            "version {v} is in force without its tenant_key_rotated entry: {rotated:?}"
        );
    }
    // Retirement, forced: its entry says how many data keys it made
    // unreadable (none here, the job finished).
    let active = st.active_version;
    adm.retire_tenant_key_versions(pb::RetireTenantKeyVersionsRequest {
        min_version: active,
        force: true,
    })
    .await
    .unwrap();
    let kinds = ledger_kinds(&url, &env.officer).await;
    let retired: Vec<_> = kinds
        .iter()
        .filter(|e| e["kind"] == "tenant_key_retired")
        .collect();
    assert_eq!(retired.len(), 1, "{kinds:?}");
    assert_eq!(retired[0]["to_min_version"], active);
    assert_eq!(retired[0]["tenant"], "default");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Item 13: bidirectional controls are refused in principal, tenant and
/// purpose names, with a message naming the character.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_controls_are_refused_in_identifiers() {
    let env = Env::new();
    let c = env.config_path.to_str().unwrap().to_owned();
    for (flag, value) in [
        ("--name", "adm\u{202E}nimda"),
        ("--tenant", "t\u{2066}x"),
        ("--purpose", "mark\u{200F}eting"),
    ] {
        let mut args = vec!["token", "add", "--config", &c, "--role", "service"];
        if flag != "--name" {
            args.extend(["--name", "someone"]);
        }
        args.extend([flag, value]);
        let o = sovra(&args);
        assert!(!o.status.success(), "{flag} accepted");
        assert!(text_of(&o).contains("bidirectional"), "{}", text_of(&o));
    }
    let srv = env.start().await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    let mut bad = consent("cust-1", "marketing", true);
    bad.channel = "web\u{202E}form".into();
    let e = led.record_consent(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("U+202E"), "{}", e.message());
    let mut svc = srv.client(Some(&env.service)).await;
    let e = svc
        .put_record(put("cust\u{202E}1", &[("phone", text("13800000001"))]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("U+202E"), "{}", e.message());
    srv.stop().await;
    // A hand-edited config with one in a tenant name stops `serve`.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        text.replace("\ntenant = \"default\"", "\ntenant = \"def\u{202E}ault\""),
    )
    .unwrap();
    let out = serve_refused(&env.config_path);
    assert!(out.contains("U+202E"), "{out}");
}

/// New configuration keys refuse unusable values at start, naming the key:
/// `[limits]`, `[sandbox]` and `[policy] operator_tenant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_limits_and_operator_tenant_are_refused_at_start() {
    let env = Env::new();
    type Edit = fn(&mut sovra_vault::config::Config);
    let cases: [(Edit, &str); 5] = [
        (|c| c.limits.max_connections = 0, "limits.max_connections"),
        (
            |c| c.limits.handshake_timeout_ms = 1,
            "limits.handshake_timeout_ms",
        ),
        (
            |c| c.limits.max_calls_unauthenticated = 0,
            "limits.max_calls_unauthenticated",
        ),
        (|c| c.sandbox.max_running = 0, "sandbox"),
        (
            |c| c.policy.operator_tenant = "op\u{202E}x".into(),
            "operator_tenant",
        ),
    ];
    for (edit, named) in cases {
        let mut cfg = env.config();
        edit(&mut cfg);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = sovra_vault::server::start(&cfg, Some(l), std::future::pending())
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(named), "{named}: {e}");
    }
}

/// A damaged idempotency record is refused as DATA_LOSS, not taken as
/// absent: the retry does not write the customer a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_idempotency_record_is_refused_not_dropped() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut req = put("idem-1", &[("name", text("n"))]);
    req.idempotency_key = "write-1".into();
    svc.put_record(req.clone()).await.unwrap();
    srv.stop().await;
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("idempotency").unwrap();
        let keys: Vec<_> = t.iter().keys().map(|k| k.unwrap()).collect();
        assert_eq!(keys.len(), 1);
        t.insert(&keys[0], &b"\xff\xff"[..]).unwrap();
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let e = svc.put_record(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    let got = svc
        .get_fields(get("idem-1", &["name"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.fields[0].version, 1, "written twice");
    srv.stop().await;
}
